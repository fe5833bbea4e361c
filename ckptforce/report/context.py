"""What both renderers show, gathered once from a cube: provenance, warnings, probes, evaluated sections."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import xarray as xr

from .figures import colour
from .sections import Evaluated, evaluate

#: Probes listed in the report's table (all stay in the cube).
MAX_PROBE_ROWS = 60
_TEXT = 160


@dataclass
class ReportContext:
    run_name: str
    run_dir: str
    steps: list[int]
    n_probes: int
    tool_version: str
    created: str
    warnings: list[str]
    evaluated: list[Evaluated]
    colours: list[tuple[str, str]]
    probes: list[dict[str, str]]
    probes_left: int
    provenance: list[tuple[str, str]]
    config: str
    fingerprints: str


def _json_attr(ds: xr.Dataset, name: str, default):
    raw = ds.attrs.get(name)
    if raw is None:
        return default
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError:
        return raw


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _TEXT else text[: _TEXT - 1] + "…"


def _probe_rows(ds: xr.Dataset) -> list[dict[str, str]]:
    n = ds.sizes["probe"]
    coord = lambda name: ds[name].values.astype(str) if name in ds.coords else np.full(n, "")  # noqa: E731
    chosen = ds["response_text"].sel(response="chosen").values.astype(str) if "response_text" in ds.coords and "chosen" in ds["response"].values else np.full(n, "")
    delta = np.full(n, np.nan)
    if "logp" in ds and "chosen" in ds["response"].values:
        delta = (ds["logp"].isel(checkpoint=-1) - ds["logp"].isel(checkpoint=0)).sel(response="chosen").values
    ids, split, group, prompt = ds["probe"].values.astype(str), coord("probe_split"), coord("probe_group"), coord("probe_prompt")
    return [
        {"id": ids[i], "split": split[i], "group": group[i], "prompt": _short(prompt[i]) or "(token ids)", "chosen": _short(chosen[i]),
         "delta": "" if not np.isfinite(delta[i]) else f"{delta[i]:+.2f}"}
        for i in range(min(n, MAX_PROBE_ROWS))
    ]  # fmt: skip


def tokenization_summary(t: dict) -> str:
    """One line on how text became token ids (the cube's ``tokenization`` attribute), "" for a cube without it."""
    if not t:
        return ""
    yes = lambda flag, what: what if flag else f"no {what}"  # noqa: E731
    eos = f"EOS {t.get('eos_token', '')!s} appended to " + " and ".join(
        [w for w, f in (("probe responses", t.get("probe_eos")), ("training responses", t.get("train_eos"))) if f] or ["nothing"])
    template = t.get("chat_template", "none")
    if t.get("chat_template_sha256"):
        template += f" (sha256 {t['chat_template_sha256'][:12]})"
    files = f"tokenizer {t.get('tokenizer', '')}" + (f" (files sha256 {t['tokenizer_sha256'][:12]})" if t.get("tokenizer_sha256") else "")
    bos = yes(t.get("bos_added"), f"BOS {t.get('bos_token', '')} added".replace("  ", " "))
    return f"as the trainer (TRL): {bos}; {eos}; chat template: {template}; {files}"


def gather(ds: xr.Dataset, source: Path | None = None, group_by: str | None = None) -> ReportContext:
    """Everything the HTML and PDF show, from one cube (``source``: the file it came from; ``group_by``: the probe
    label the grouped views use)."""
    run_dir = str(ds.attrs.get("run_dir", "(unknown run)"))
    config = _json_attr(ds, "config", {})
    fingerprints = _json_attr(ds, "checkpoint_fingerprints", {})
    provenance = [
        ("cube", str(source) if source else ""), ("run directory", run_dir), ("layout", str(ds.attrs.get("layout", ""))),
        ("steps", ", ".join(str(int(s)) for s in ds["step"].values)), ("step source", str(ds.attrs.get("step_source", ""))),
        ("model", str(ds.attrs.get("model_source", ""))), ("attention", str(ds.attrs.get("attention", ""))),
        ("first-order method", str(ds.attrs.get("jvp_method", ""))), ("split by tensor from", str(ds.attrs.get("split_method", ""))),
        ("device", str(ds.attrs.get("device", ""))),
        ("training objective", str(ds.attrs.get("objective", ""))), ("optimizer preconditioner", str(ds.attrs.get("preconditioner", ""))),
        ("kernels", str(ds.attrs.get("kernel_method", ""))), ("feature layer", str(ds.attrs.get("feature_layer", ""))),
        ("tokenization", tokenization_summary(_json_attr(ds, "tokenization", {}))),
        ("probes grouped by", group_by or ""), ("command line", str(ds.attrs.get("history", ""))), ("ckptforce", str(ds.attrs.get("tool_version", ""))),
        ("cube schema", str(ds.attrs.get("ckptforce_schema", ""))),
    ]  # fmt: skip
    warnings = _json_attr(ds, "warnings", [])
    return ReportContext(
        run_name=Path(run_dir).name or run_dir, run_dir=run_dir, steps=[int(s) for s in ds["step"].values], n_probes=ds.sizes.get("probe", 0),
        tool_version=str(ds.attrs.get("tool_version", "?")), created=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        warnings=[str(w) for w in (warnings if isinstance(warnings, list) else [warnings])], evaluated=evaluate(ds, group_by),
        colours=[(str(r), colour(str(r))) for r in ds["response"].values], probes=_probe_rows(ds),
        probes_left=max(0, ds.sizes.get("probe", 0) - MAX_PROBE_ROWS), provenance=[(k, v) for k, v in provenance if v],
        config=json.dumps(config, indent=2, sort_keys=True), fingerprints=json.dumps(fingerprints, indent=2, sort_keys=True),
    )  # fmt: skip
