"""Reports from a cube: diagnostics (cube → tables, verdicts), figures (tables → matplotlib), HTML and PDF.

    from ckptforce.report import write_report
    write_report("cube.h5", "report/", html=True, pdf=True)   # -> [report/report.html, report/report.pdf]

Nothing here imports torch: a report needs only the cube.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path

from ..atomic import write_atomic
from ..cube import open_cube
from ..errors import CkptforceError
from ..labels import label_name

HTML_NAME = "report.html"
PDF_NAME = "report.pdf"


def output_dir(out: str | Path, *run_dirs: str | None) -> Path:
    """The report folder: created if its parent exists; never inside the analysed run (or the folder named as it)."""
    out = Path(out).resolve()
    for run_dir in filter(None, run_dirs):
        if Path(run_dir).resolve() == out or Path(run_dir).resolve() in out.parents:
            raise CkptforceError(f"{out}: the report would be written into the run directory {run_dir}; choose an -o outside it")
    if not out.parent.is_dir():
        what = "is a file, not a directory" if out.parent.exists() else "no such directory"
        raise CkptforceError(f"{out.parent}: {what}; create it first or choose another -o")
    try:
        out.mkdir(exist_ok=True)
    except OSError as e:
        raise CkptforceError(f"{out}: cannot create the report folder ({e.strerror}); choose another -o") from e
    if not os.access(out, os.W_OK):
        raise CkptforceError(f"{out}: the folder is not writable; choose another -o")
    return out


def check_group_by(name: str, available: list[str]) -> str:
    """``name`` as the cube stores labels (``labels.label_name``), or a one-line error listing what there is."""
    label = label_name(name)
    if label in available:
        return label
    close = difflib.get_close_matches(label, available, n=1)
    raise CkptforceError(f"--group-by {name}: the probes have no such label (they have: {', '.join(available)})"
                         + (f"; did you mean '{close[0]}'?" if close else "; give one of them, or add the field to the "
                            "probe file (under \"meta\", or as a column)"))  # fmt: skip


def write_report(cube_path: str | Path, out: str | Path, *, html: bool = True, pdf: bool = True, group_by: str | None = None) -> list[Path]:
    """Read the cube at ``cube_path`` and write ``report.html`` and/or ``report.pdf`` into ``out``; ``group_by`` (a
    probe label: split, group, meta.attr …) groups the forgetting and hallucination views."""
    from . import html as html_mod
    from . import pdf as pdf_mod
    from .context import gather
    from .diagnostics import groupings

    ds = open_cube(cube_path)
    if group_by:
        group_by = check_group_by(group_by, groupings(ds))
    out = output_dir(out, ds.attrs.get("run_dir"), _config(ds).get("run_dir"))
    ctx = gather(ds, Path(cube_path), group_by)
    written = []
    if html:
        text = html_mod.render(ctx)
        written.append(write_atomic(out / HTML_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8")))
    if pdf:
        written.append(write_atomic(out / PDF_NAME, lambda tmp: pdf_mod.write(ctx, tmp)))
    return written


def _config(ds) -> dict:
    try:
        config = json.loads(ds.attrs.get("config", "{}"))
    except (TypeError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


__all__ = ["HTML_NAME", "PDF_NAME", "check_group_by", "write_report"]
