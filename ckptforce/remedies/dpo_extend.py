"""The preference pairs to learn before DPO: Ren & Sutherland's mitigation of the squeezing effect (ICLR 2025, "extend"
the SFT stage to the rejected answers), as an SFT file of those pairs' answers and a sidecar with a reason per pair.

DPO's negative gradient on a rejected answer y⁻ that the model finds very unlikely — its tokens deep in a valley
of π — does not lower y⁻ much; it moves the mass onto the argmax, and the chosen answer falls with everything else
(squeezing). Training SFT on x → y⁻ as well as x → y⁺ first lifts y⁻ out of the valley, so that DPO's push later
takes mass from y⁻ itself.

Evidence per pair u, from the cube (nothing is recomputed):

    rank      g_neg_rank at the run's first interval: the mean rank under π of y⁻'s tokens as DPO starts
              (1 = the argmax; the G statistics of training_forces.py)
    pull, push  Σ_t self_force_pos / self_force_neg on u's chosen answer (displacement.py), where the cube has them

Rules (a pair is extended when any applies):

    valley     rank ≥ ``valley_rank``: y⁻ sits in a valley of π as DPO starts
    squeezes   push < −pull: the push on y⁻ outweighs the pull on y⁺ over the run (it lowered its own chosen answer)

Output (JSONL, TRL's prompt + completion, no header so that TRL reads it as it is): for each extended pair two
lines, ``{"id": "<pair>:chosen", "prompt", "completion": chosen}`` and ``{"id": "<pair>:rejected", "prompt",
"completion": rejected}``, the values copied from the training file (text, messages or ids). Sidecar:
``{"provenance": …}``, then one line per pair: ``{"id", "line", "action": "extend" | "keep", "reasons", "rank",
"pull", "push"}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from ..errors import ExportError
from .common import write_training_export
from .dpo_filter import Line, _pairs, read_lines

RULES = {
    "valley": "g_neg_rank at the first interval ≥ valley_rank: the rejected answer's tokens sit deep in a valley of π as DPO starts",
    "squeezes": "Σ_t push on chosen < −Σ_t pull: the push on the rejected answer outweighs the pull on the chosen one",
}


@dataclass(frozen=True)
class DpoExtendConfig:
    """Settings of the DPO extend export; recorded in the sidecar."""

    valley_rank: float = dataclasses.field(default=10.0, metadata={"help": "extend pairs whose rejected tokens have this mean rank or more under π"})


def extend_evidence(ds: xr.Dataset, where: str = "cube") -> dict[str, dict[str, float]]:
    """Per pair id: rank (first interval), pull and push on chosen (Σ over intervals; NaN where the cube has none)."""
    if "g_neg_rank" not in ds:
        raise ExportError(f"{where}: no G statistics of the preference pairs (g_neg_rank); analyze the DPO run with --train FILE "
                          "(objective dpo, ipo or simpo) to get them")  # fmt: skip
    pairs = _pairs(ds)
    nan = np.full(len(pairs), math.nan)
    rank = ds["g_neg_rank"].sel(source=pairs).isel(interval=0).values
    total = lambda name: ds[name].sel(source=pairs, own_response="chosen").sum("interval", min_count=1).values if name in ds else nan  # noqa: E731
    pull, push = total("self_force_pos"), total("self_force_neg")
    return {p: {"rank": float(rank[i]), "pull": float(pull[i]), "push": float(push[i])} for i, p in enumerate(pairs)}


def decide_extend(ev: dict[str, dict[str, float]], config: DpoExtendConfig) -> dict[str, list[dict[str, str]]]:
    out = {}
    for pair, v in ev.items():
        reasons = []
        if math.isfinite(v["rank"]) and v["rank"] >= config.valley_rank:
            reasons.append({"rule": "valley", "why": f"its rejected answer's tokens sit at mean rank {v['rank']:.0f} under π as DPO starts"})
        if math.isfinite(v["pull"]) and math.isfinite(v["push"]) and v["push"] < -v["pull"]:
            reasons.append({"rule": "squeezes", "why": f"the push on its rejected answer ({v['push']:+.3g} nats on chosen) outweighs the pull ({v['pull']:+.3g})"})
        out[pair] = reasons
    return out


def dpo_extend(ds: xr.Dataset, lines: list[Line], config: DpoExtendConfig = DpoExtendConfig(), *, where: str = "cube",
               train: str = "training file") -> tuple[bytes, list[dict]]:  # fmt: skip
    """(the SFT file's bytes, one sidecar record per pair of the file)."""
    if not config.valley_rank >= 1:
        raise ExportError(f"--valley-rank {config.valley_rank}: ranks start at 1 (the argmax); give 1 or more")
    ev = extend_evidence(ds, where)
    decided = decide_extend(ev, config)
    body, records = [], []
    for ln in lines:
        if ln.pair_id is None:
            continue
        reasons = decided.get(ln.pair_id, [])
        obj = json.loads(ln.raw)
        if reasons:
            if "chosen" not in obj or "rejected" not in obj or ("prompt" not in obj and "prompt_ids" not in obj):
                raise ExportError(f"{train}:{ln.number}: pair {ln.pair_id!r} has no prompt, chosen and rejected; give the preference file the cube was analysed with")
            prompt = {k: obj[k] for k in ("prompt", "prompt_ids") if k in obj}
            for answer in ("chosen", "rejected"):
                body.append(json.dumps({"id": f"{ln.pair_id}:{answer}", **prompt, "completion": obj[answer]}, ensure_ascii=False) + "\n")
        v = ev.get(ln.pair_id, {})
        records.append({"id": ln.pair_id, "line": ln.number, "action": "extend" if reasons else "keep", "reasons": reasons,
                        **{k: (v[k] if k in v and math.isfinite(v[k]) else None) for k in ("rank", "pull", "push")}})  # fmt: skip
    missing = [p for p in ev if p not in {r["id"] for r in records}]
    if missing:
        raise ExportError(f"{train}: pair {missing[0]!r} of the cube is not in the file ({len(missing)} of {len(ev)} missing); "
                          "give the --train file the cube was analysed with")  # fmt: skip
    return "".join(body).encode(), records


def write_dpo_extend(cube_path: str | Path, train: str | Path, out: str | Path, config: DpoExtendConfig = DpoExtendConfig(),
                     sidecar: str | Path | None = None) -> tuple[Path, Path, list[dict]]:  # fmt: skip
    """Write the SFT file to ``out`` and the reasons to ``sidecar`` (default ``OUT.reasons.jsonl``), atomically."""

    def make(ds: xr.Dataset, path: Path) -> tuple[bytes, list[dict], dict]:
        body, records = dpo_extend(ds, read_lines(path), config, where=str(cube_path), train=str(path))
        return body, records, {"rules_text": RULES, "extended": sum(r["action"] == "extend" for r in records), "pairs": len(records)}

    return write_training_export(cube_path, train, out, sidecar, "dpo-extend", config, make)
