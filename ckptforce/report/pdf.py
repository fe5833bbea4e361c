"""The PDF report: the same content as the HTML, one page per section (matplotlib's PdfPages, no system libraries).

Page 1 holds the run, the warnings and the summary of verdicts; each section follows on its own A4 landscape
page: title, verdict, the figure, and how to read it.
"""

from __future__ import annotations

import io
import textwrap

import matplotlib.image as mpimg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

from .context import ReportContext

A4_LANDSCAPE = (11.69, 8.27)
_WRAP = 150


def _page(title: str) -> Figure:
    page = Figure(figsize=A4_LANDSCAPE)
    page.text(0.04, 0.955, title, fontsize=16, weight="bold", va="top")
    return page


def _paragraph(page: Figure, y: float, text: str, *, size: float = 9.5, width: int = _WRAP, **kw) -> float:
    """Write wrapped text from height y (figure fraction) down; return the y below it."""
    lines = textwrap.wrap(text, width) or [""]
    page.text(0.04, y, "\n".join(lines), fontsize=size, va="top", family="DejaVu Sans", **kw)
    return y - (len(lines) * size * 1.45 / 72) / A4_LANDSCAPE[1] - 0.012


def _front(ctx: ReportContext) -> Figure:
    page = _page(f"ckptforce report — {ctx.run_name}")
    y = _paragraph(page, 0.905, f"{ctx.run_dir} · steps {ctx.steps[0]}→{ctx.steps[-1]} ({len(ctx.steps)} checkpoints, {ctx.n_probes} probes) "
                   f"· ckptforce {ctx.tool_version} · {ctx.created}", color="#555")  # fmt: skip
    y = _paragraph(page, y - 0.01, "Warnings", size=12, weight="bold")
    for w in ctx.warnings or ["None: the run was read without caveats."]:
        y = _paragraph(page, y, f"• {w}", color="#8a4b00" if ctx.warnings else "black")
    y = _paragraph(page, y - 0.01, "Summary", size=12, weight="bold")
    for number, e in enumerate(ctx.evaluated, start=2):
        state = "not in this cube" if e.result.missing else e.result.verdict
        y = _paragraph(page, y, f"p.{number}  {e.section.title}: {state}", size=9)
    y = _paragraph(page, y - 0.01, "Provenance", size=12, weight="bold")
    for k, v in ctx.provenance:
        y = _paragraph(page, y, f"{k}: {v}", size=8)
    return page


def _section(e) -> Figure:
    page = _page(e.section.title)
    if e.result.missing:
        y = _paragraph(page, 0.88, f"Not in this cube: {e.result.missing}.", size=11, color="#555")
        _paragraph(page, y, e.section.how_to_read)
        return page
    _paragraph(page, 0.895, e.result.verdict, size=11, weight="bold", width=130)
    how = textwrap.wrap("How to read this. " + e.section.how_to_read, _WRAP)
    quoted = [textwrap.shorten(h.plain(), _WRAP + 20) for h in e.result.highlights[:4]]
    bottom = 0.04 + (len(how) * 9.5 + len(quoted) * 8.5) * 1.45 / 72 / A4_LANDSCAPE[1] + 0.012 * len(quoted)
    if e.figure is not None:
        buf = io.BytesIO()
        e.figure.savefig(buf, format="png", dpi=170)
        buf.seek(0)
        ax = page.add_axes((0.04, bottom + 0.02, 0.92, 0.80 - bottom))
        ax.imshow(mpimg.imread(buf, format="png"))
        ax.set_axis_off()
    y = _paragraph(page, bottom, "How to read this. " + e.section.how_to_read)
    for text in quoted:
        y = _paragraph(page, y, text, size=8.5, width=_WRAP + 20, color="#8a1c1c")
    return page


def write(ctx: ReportContext, path) -> None:
    """Write the PDF to ``path`` (the caller makes that atomic)."""
    with PdfPages(path, metadata={"Title": f"ckptforce report — {ctx.run_name}", "Creator": f"ckptforce {ctx.tool_version}"}) as pdf:
        pdf.savefig(_front(ctx))
        for e in ctx.evaluated:
            pdf.savefig(_section(e))
