"""``ckptforce scan``: what a run directory holds, as a JSON-safe summary and as a terminal table.

In: a ``Run`` and its ``Anatomy``. Out: ``summarise(...)`` — a plain dict (the ``--json`` output, described by
``schemas/scan.schema.json``) — and ``render(summary, console)`` — the readable table. No model is needed.
"""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table

from .io import Run
from .updates import Anatomy

SCHEMA_VERSION = 1


def _num(x: float) -> float | None:
    """JSON has no NaN: missing numbers become null."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def summarise(run: Run, anatomy: Anatomy, *, per_tensor: bool = True) -> dict[str, Any]:
    """The scan as plain data; ``per_tensor`` adds every tensor's statistics per interval."""
    checkpoints = [
        {
            "path": str(ref.path),
            "step": ref.step,
            "step_source": ref.step_source,
            "step_detail": ref.step_detail,
            "layout": ref.layout,
            "dtypes": facts.dtypes,
            "size_bytes": facts.size_bytes,
            "param_count": facts.param_count,
            "tensor_count": facts.tensor_count,
            "tied": facts.tied,
        }
        for ref, facts in zip(anatomy.checkpoints, anatomy.facts)
    ]
    intervals = []
    for iv in anatomy.intervals:
        entry = {
            "step_from": iv.step_from,
            "step_to": iv.step_to,
            "lr": _num(iv.lr),
            "lr_source": iv.lr_source,
            "update_norm": _num(iv.update_norm),
            "param_norm": _num(iv.param_norm),
            "rel_update": _num(iv.rel_update),
            "update_cos": _num(iv.update_cos),
            "zero_frac": _num(_mean_zero(iv)),
        }
        if per_tensor:
            entry["tensors"] = {
                n: {
                    "update_norm": _num(s.update_norm),
                    "param_norm": _num(s.param_norm),
                    "rel_update": _num(s.rel_update),
                    "update_cos": _num(s.update_cos),
                    "zero_frac": _num(s.zero_frac),
                    "nonfinite": s.nonfinite,
                    "dtype": s.dtype,
                }
                for n, s in iv.tensors.items()
            }
        intervals.append(entry)
    optimizers = [
        {
            "step": o.step,
            "kind": o.kind,
            "optimizer_step": _num(o.optimizer_step),
            "lr": [_num(x) for x in o.lr],
            "mapping": o.mapping,
            "exp_avg_norm": _num(o.exp_avg_norm),
            "exp_avg_sq_mean": _num(o.exp_avg_sq_mean),
        }
        for o in anatomy.optimizers
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "run": str(run.root),
        "layout": run.layout,
        "checkpoints": checkpoints,
        "tensors": anatomy.tensor_names,
        "intervals": intervals,
        "optimizers": optimizers,
        "notes": list(run.notes),
        "warnings": list(anatomy.warnings),
    }


def _mean_zero(iv) -> float:
    fracs = [s.zero_frac for s in iv.tensors.values() if not math.isnan(s.zero_frac)]
    return sum(fracs) / len(fracs) if fracs else math.nan


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "—" if x is None else format(x, spec)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render(summary: dict[str, Any], console: Console) -> None:
    """The summary as a table: one row per checkpoint, with the update that led to it."""
    cks = summary["checkpoints"]
    n_params = cks[0]["param_count"] if cks else 0
    console.print(
        f"[bold]{summary['run']}[/]  layout [bold]{summary['layout']}[/], {len(cks)} checkpoint(s), "
        f"{len(summary['tensors'])} tensors, {n_params:,} parameters"
    )
    for w in summary["warnings"]:
        console.print(f"[yellow]warning:[/] {w}")
    for n in summary["notes"]:
        console.print(f"[dim]note:[/] {n}")
    by_to = {iv["step_to"]: iv for iv in summary["intervals"]}
    table = Table(show_edge=False, header_style="bold")
    for col in ("step", "from", "checkpoint", "dtype", "size", "‖Δθ‖", "‖Δθ‖/‖θ‖", "cos prev", "zero Δ", "lr"):
        table.add_column(col, justify="right" if col not in ("from", "checkpoint", "dtype") else "left")
    for c in cks:
        iv = by_to.get(c["step"]) if c is not cks[0] else None
        table.add_row(
            str(c["step"]),
            c["step_source"],
            _short(c["path"], summary["run"]),
            ",".join(c["dtypes"]),
            _size(c["size_bytes"]),
            _fmt(iv["update_norm"]) if iv else "",
            _fmt(iv["rel_update"]) if iv else "",
            _fmt(iv["update_cos"], ".2f") if iv else "",
            _fmt(iv["zero_frac"], ".1%") if iv else "",
            _fmt(iv["lr"]) if iv else "",
        )
    console.print(table)
    if summary["optimizers"]:
        opt = Table(title="saved optimizer state", show_edge=False, header_style="bold", title_justify="left")
        for col in ("step", "kind", "opt. step", "lr (groups)", "‖m‖", "mean v", "matched"):
            opt.add_column(col)
        for o in summary["optimizers"]:
            lrs = ", ".join(_fmt(x) for x in o["lr"])
            opt.add_row(str(o["step"]), o["kind"], _fmt(o["optimizer_step"], ".0f"), lrs, _fmt(o["exp_avg_norm"]), _fmt(o["exp_avg_sq_mean"]), o["mapping"])
        console.print(opt)
    if len(cks) < 2:
        console.print("one checkpoint only: there is no update to measure (add --init with the starting model?)")


def _short(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") or "." if path.startswith(root) else path
