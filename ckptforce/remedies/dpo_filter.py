"""The preference pairs to drop: a cube of a DPO (IPO, SimPO) run with ``--train`` in, a filtered copy of the
training file and a sidecar with a reason per pair out.

Evidence per pair u, from the cube (displacement.py; none of it is recomputed here), over the intervals that used u:

    chosen      Σ_t self_force(u, chosen)    the first-order change of u's own chosen log π caused by u's own updates,
                = pull + push                split into the pull of its positive part (G⁺ on y⁺) and the push of its
                                             negative part (G⁻ on y⁻, which reaches y⁺ through their shared features)
    rejected    Σ_t self_force(u, rejected)  the same on u's own rejected answer
    ches        CHES at the first checkpoint (Razin et al.: the higher, the more the pair displaces its chosen)

Rules (a pair is dropped when any applies; ``reasons`` lists each with its numbers):

    displaces_chosen   chosen < 0: the pair's own updates lower its chosen answer (likelihood displacement); when
                       push < −pull it is the negative gradient on y⁻ that squeezes y⁺ down (Ren & Sutherland §4)
                       [needs self_force; with displaces_chosen alone: it lowered chosen in most intervals it was used]
    rejected_rises     rejected > 0: the pair's own updates raise the answer it should push down
                       [needs self_force]
    high_ches          one of the ``ches_top`` pairs with the highest CHES (off unless --ches-top K)
                       [needs ches]

A pair the cube has no number for (not analysed, or no interval used it) is kept, and the sidecar says so.
The kept lines of the training file are copied byte for byte (header, blank lines and extra fields included).

Sidecar (JSONL): a first line ``{"provenance": …}`` (the cube, its SHA-256, the settings, the rules, the training
file and its SHA-256), then one line per pair: ``{"id", "line", "action": "drop" | "keep", "reasons": [{"rule",
"why"}], "chosen", "pull", "push", "rejected", "ches", "evidence"}``.
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

RULES = {
    "displaces_chosen": "Σ_t self_force(chosen) < 0: the pair's own updates lower its chosen answer",
    "rejected_rises": "Σ_t self_force(rejected) > 0: the pair's own updates raise its rejected answer",
    "high_ches": "among the ches_top pairs with the highest CHES at the first checkpoint",
}
EVIDENCE = ("self_force", "displaces_chosen", "ches")


@dataclass(frozen=True)
class DpoFilterConfig:
    """Settings of the DPO filter; recorded in the sidecar."""

    ches_top: int = dataclasses.field(default=0, metadata={"help": "also drop the K pairs with the highest CHES (0: off)"})
    rules: tuple[str, ...] = dataclasses.field(default=tuple(RULES), metadata={"help": "the rules applied (RULES)"})


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as the training-file reader counts
    raw: bytes  # the line as in the file, with its newline
    pair_id: str | None  # None: a header or blank line (always kept)


def read_lines(path: Path) -> list[Line]:
    """The JSONL training file line by line, raw bytes kept; a pair's id is its ``id`` field, else ``u<line>`` as
    ``ckptforce analyze`` names it."""
    if not path.is_file():
        what = "is a directory (a data set?): dpo-filter copies the lines of a JSONL file" if path.is_dir() else "no such file"
        raise ExportError(f"{path}: {what}; give the JSONL training file the run used (--train)")
    data = path.read_bytes()
    parts = data.split(b"\n")
    lines = []
    for number, chunk in enumerate(parts, start=1):
        if number == len(parts) and not chunk:
            break  # after the last newline
        raw = chunk + (b"\n" if number < len(parts) else b"")
        text = chunk.decode("utf-8", errors="strict") if number > 1 else chunk.decode("utf-8-sig", errors="strict")
        if not text.strip():
            lines.append(Line(number, raw, None))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); give the JSONL file the run used") from e
        is_header = isinstance(obj, dict) and "objective" in obj  # as the training-file reader tells a header
        lines.append(Line(number, raw, None if is_header else str(obj.get("id", f"u{number}")) if isinstance(obj, dict) else None))
    return lines


def _pairs(ds: xr.Dataset) -> list[str]:
    kind = ds["source_kind"].values.astype(str) if "source_kind" in ds.coords else np.full(ds.sizes.get("source", 0), "example")
    return [str(s) for s in ds["source"].values[kind == "example"]] if "source" in ds.dims else []


def evidence(ds: xr.Dataset, where: str = "cube") -> dict[str, dict[str, float]]:
    """Per pair id: chosen, pull, push, rejected (nats, summed over the intervals that used it; NaN: none did),
    displaced_share (share of those intervals where it displaced chosen) and ches (first checkpoint)."""
    have = [n for n in EVIDENCE if n in ds]
    if not have:
        raise ExportError(f"{where}: no per-pair displacement numbers ({', '.join(EVIDENCE)}); analyze the preference run with "
                          "--train FILE (objective dpo, ipo or simpo) to get them")  # fmt: skip
    pairs = _pairs(ds)
    nan = np.full(len(pairs), math.nan)

    def total(name: str, response: str) -> np.ndarray:
        if name not in ds:
            return nan
        return ds[name].sel(source=pairs, own_response=response).sum("interval", min_count=1).values

    share = ds["displaces_chosen"].sel(source=pairs).mean("interval", skipna=True).values if "displaces_chosen" in ds else nan
    ches = ds["ches"].isel(checkpoint=0).sel(source=pairs).values if "ches" in ds else nan
    cols = {"chosen": total("self_force", "chosen"), "pull": total("self_force_pos", "chosen"), "push": total("self_force_neg", "chosen"),
            "rejected": total("self_force", "rejected"), "displaced_share": share, "ches": ches}  # fmt: skip
    return {p: {k: float(v[i]) for k, v in cols.items()} for i, p in enumerate(pairs)}


def _num(x: float) -> str:
    return f"{x:+.3g}"


def decide(ev: dict[str, dict[str, float]], config: DpoFilterConfig) -> dict[str, list[dict[str, str]]]:
    """Per pair id, the rules that drop it (empty: kept), each with a one-line why."""
    top: set[str] = set()
    if config.ches_top > 0:
        finite = [(v["ches"], p) for p, v in ev.items() if math.isfinite(v["ches"])]
        top = {p for _, p in sorted(finite, reverse=True)[: config.ches_top]}
    out = {}
    for pair, v in ev.items():
        reasons = []
        if "displaces_chosen" in config.rules:
            if math.isfinite(v["chosen"]):
                if v["chosen"] < 0:
                    why = f"its own updates lower its chosen answer by {-v['chosen']:.3g} nats over the run"
                    if math.isfinite(v["pull"]) and math.isfinite(v["push"]):
                        why += f" (pull {_num(v['pull'])}, push {_num(v['push'])}"
                        why += ": the push on its rejected answer squeezes chosen down)" if v["push"] < -v["pull"] else ")"
                    reasons.append({"rule": "displaces_chosen", "why": why})
            elif math.isfinite(v["displaced_share"]) and v["displaced_share"] > 0.5:
                reasons.append({"rule": "displaces_chosen",
                                "why": f"its own update lowered its chosen answer in {v['displaced_share']:.0%} of the intervals that used it"})
        if "rejected_rises" in config.rules and math.isfinite(v["rejected"]) and v["rejected"] > 0:
            reasons.append({"rule": "rejected_rises", "why": f"its own updates raise its rejected answer by {v['rejected']:.3g} nats over the run"})
        if "high_ches" in config.rules and pair in top:
            reasons.append({"rule": "high_ches", "why": f"CHES {v['ches']:.4g} is among the {config.ches_top} highest at the first checkpoint"})
        out[pair] = reasons
    return out


def dpo_filter(ds: xr.Dataset, lines: list[Line], config: DpoFilterConfig = DpoFilterConfig(), *, where: str = "cube",
               train: str = "training file") -> tuple[bytes, list[dict]]:  # fmt: skip
    """(the filtered file's bytes, one sidecar record per pair of the file)."""
    unknown = [r for r in config.rules if r not in RULES]
    if unknown:
        raise ExportError(f"rule {unknown[0]!r} is not known; use {', '.join(RULES)}")
    ev = evidence(ds, where)
    in_file = {ln.pair_id for ln in lines if ln.pair_id is not None}
    missing = [p for p in ev if p not in in_file]
    if missing:
        raise ExportError(f"{train}: pair {missing[0]!r} of the cube is not in the file ({len(missing)} of {len(ev)} missing); "
                          "give the --train file the cube was analysed with")  # fmt: skip
    drop = decide(ev, config)
    kept, records = [], []
    for ln in lines:
        if ln.pair_id is None:
            kept.append(ln.raw)
            continue
        reasons = drop.get(ln.pair_id, [])
        numbers = ev.get(ln.pair_id)
        has = numbers is not None and any(math.isfinite(numbers[k]) for k in ("chosen", "displaced_share"))
        if not reasons:
            kept.append(ln.raw)
        records.append({"id": ln.pair_id, "line": ln.number, "action": "drop" if reasons else "keep", "reasons": reasons,
                        **{k: (numbers[k] if numbers and math.isfinite(numbers[k]) else None) for k in ("chosen", "pull", "push", "rejected", "ches")},
                        "evidence": "cube" if has else ("not in the cube" if numbers is None else "no interval used it")})  # fmt: skip
    return b"".join(kept), records


def write_dpo_filter(cube_path: str | Path, train: str | Path, out: str | Path, config: DpoFilterConfig = DpoFilterConfig(),
                     sidecar: str | Path | None = None) -> tuple[Path, Path, list[dict]]:  # fmt: skip
    """Write the filtered copy to ``out`` and the reasons to ``sidecar`` (default ``OUT.reasons.jsonl``), atomically."""

    def make(ds: xr.Dataset, path: Path) -> tuple[bytes, list[dict], dict]:
        body, records = dpo_filter(ds, read_lines(path), config, where=str(cube_path), train=str(path))
        own = {"rules_text": {r: RULES[r] for r in config.rules}, "dropped": sum(r["action"] == "drop" for r in records), "pairs": len(records)}
        return body, records, own

    return write_training_export(cube_path, train, out, sidecar, "dpo-filter", config, make)
