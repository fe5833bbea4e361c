"""The HTML report: one self-contained file (figures inline as PNG data URIs, no scripts, works offline).

Rendered with Jinja2 and autoescape on, so any text from the run or the probe file (prompts, responses,
paths) appears as text, never as markup.
"""

from __future__ import annotations

import base64
import io

from jinja2 import Environment, PackageLoader, select_autoescape
from matplotlib.figure import Figure

from .context import ReportContext

_ENV = Environment(loader=PackageLoader("ckptforce.report", "templates"), autoescape=select_autoescape(["html", "j2"]))


def png_base64(fig: Figure, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render(ctx: ReportContext) -> str:
    """The report as one HTML string."""
    evaluated = [
        {"section": e.section, "result": e.result, "image": png_base64(e.figure) if e.figure is not None else None} for e in ctx.evaluated
    ]
    return _ENV.get_template("report.html.j2").render(
        run_name=ctx.run_name, run_dir=ctx.run_dir, steps=ctx.steps, n_checkpoints=len(ctx.steps), n_probes=ctx.n_probes,
        tool_version=ctx.tool_version, created=ctx.created, warnings=ctx.warnings, evaluated=evaluated, colours=ctx.colours,
        probes=ctx.probes, probes_left=ctx.probes_left, provenance=ctx.provenance, config=ctx.config, fingerprints=ctx.fingerprints,
    )  # fmt: skip
