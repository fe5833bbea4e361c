"""Token weights for a GRPO run's harmful negative tokens (NTHR-style, Deng et al., arXiv 2505.18830): a cube of a
GRPO run analysed with ``--train`` in, a copy of the rollouts file with a ``token_weights`` field per group and a
sidecar with the evidence per token out.

Evidence per group u and token k of its negative-advantage completion i, from the cube (lld.py; nothing is
recomputed here), over the intervals that used u:

    harm      −Σ_t token_force(u, i, k)   how far that token's push lowers u's correct completions (first order,
                                          through the whole model, summed over them)
    pull      Σ_t lld_pos(u) × n_correct  what u's positive completions give its correct ones (the same sum)
    share     harm / pull                 the part of the pull that token alone cancels
    nthr      the paper's last-layer score at the interval's start (mean over the intervals), for comparison

Rule: a token is *harmful* when share ≥ ``min_share`` (and harm > 0); its weight becomes ``weight`` (the factor
its advantage — its gradient — is scaled by), every other token keeps 1. NTHR proper scores the tokens by the
last-layer similarity; here the exact forces choose, and the sidecar gives both.

Output: every line of the training file is copied byte for byte, except the groups with a harmful token, which
get ``"token_weights": [[w per completion token] per completion]`` — one weight per token the trainer scored
(EOS included; the cube's ``rollout_token`` lists them). The sidecar's first line is ``{"provenance": …}``, then
one line per harmful token: ``{"id", "line", "completion", "position", "token", "harm", "pull", "share", "nthr",
"weight"}``.
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
from .dpo_filter import Line, read_lines

NEEDS = ("token_force", "lld_pos", "rollout_advantage", "rollout_token")


@dataclass(frozen=True)
class GrpoWeightsConfig:
    """Settings of the GRPO token weights; recorded in the sidecar."""

    min_share: float = dataclasses.field(default=0.1, metadata={"help": "a token is harmful when it alone cancels this share of its group's pull"})
    weight: float = dataclasses.field(default=0.5, metadata={"help": "the weight of a harmful token (1: unchanged, 0: dropped)"})


def harmful_tokens(ds: xr.Dataset, config: GrpoWeightsConfig = GrpoWeightsConfig(), where: str = "cube") -> list[dict]:
    """Every harmful token (module docstring): {id, completion, position, token, harm, pull, share, nthr}, most
    harmful first."""
    lacking = [n for n in NEEDS if n not in ds]
    if lacking:
        raise ExportError(f"{where}: no GRPO token forces ({', '.join(lacking)} missing); analyze the GRPO run with --train FILE "
                          "(prompt, completions, rewards) to get them")  # fmt: skip
    kind = ds["source_kind"].values.astype(str) if "source_kind" in ds.coords else np.full(ds.sizes["source"], "example")
    groups = [str(s) for s in ds["source"].values[kind == "example"]]
    adv = ds["rollout_advantage"].sel(source=groups)
    harm = -ds["token_force"].sel(source=groups).sum("interval", min_count=1).where(adv < 0)
    pull = ds["lld_pos"].sel(source=groups).sum("interval", min_count=1) * (adv > 0).sum("own_response")
    nthr = ds["nthr"].sel(source=groups).mean("interval", skipna=True) if "nthr" in ds else xr.full_like(harm, math.nan)
    share = harm / pull.where(pull > 0)
    hits = np.argwhere(np.nan_to_num(share.values, nan=-1.0) >= config.min_share)  # NaN (no force, no pull) never hits
    tokens, out = ds["rollout_token"].sel(source=groups).values, []
    for u, i, k in hits:
        if not harm.values[u, i, k] > 0:
            continue
        out.append({"id": groups[u], "completion": int(i), "position": int(k), "token": str(tokens[u, i, k]), "harm": float(harm.values[u, i, k]),
                    "pull": float(pull.values[u]), "share": float(share.values[u, i, k]), "nthr": _finite(float(nthr.values[u, i, k]))})  # fmt: skip
    return sorted(out, key=lambda r: -r["harm"])


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def grpo_weights(ds: xr.Dataset, lines: list[Line], config: GrpoWeightsConfig = GrpoWeightsConfig(), *, where: str = "cube",
                 train: str = "training file") -> tuple[bytes, list[dict]]:  # fmt: skip
    """(the weighted file's bytes, one sidecar record per harmful token)."""
    if not 0 <= config.weight < 1:
        raise ExportError(f"--weight {config.weight}: give a weight in [0, 1) for the harmful tokens (1 would change nothing)")
    if not config.min_share > 0:
        raise ExportError(f"--min-share {config.min_share}: give a share above 0 of the group's pull")
    hits = harmful_tokens(ds, config, where)
    by_line = {ln.pair_id: ln for ln in lines if ln.pair_id is not None}
    missing = sorted({h["id"] for h in hits} - set(by_line))
    if missing:
        raise ExportError(f"{train}: group {missing[0]!r} of the cube is not in the file ({len(missing)} missing); "
                          "give the --train file the cube was analysed with")  # fmt: skip
    width = ds.sizes["completion_token"]
    lengths = (ds["rollout_token"] != "").sum("completion_token")  # tokens the trainer scored, per completion
    weights: dict[str, np.ndarray] = {}
    for h in hits:
        w = weights.setdefault(h["id"], np.ones((ds.sizes["own_response"], width)))
        w[h["completion"], h["position"]] = config.weight
    body = []
    for ln in lines:
        if ln.pair_id not in weights:
            body.append(ln.raw)
            continue
        obj = json.loads(ln.raw)
        n = lengths.sel(source=ln.pair_id).values
        obj["token_weights"] = [[float(x) for x in weights[ln.pair_id][i, : int(n[i])]] for i in range(len(n))]
        body.append((json.dumps(obj, ensure_ascii=False) + ("\n" if ln.raw.endswith(b"\n") else "")).encode())
    records = [{**h, "line": by_line[h["id"]].number, "weight": config.weight} for h in hits]
    return b"".join(body), records


def write_grpo_weights(cube_path: str | Path, train: str | Path, out: str | Path, config: GrpoWeightsConfig = GrpoWeightsConfig(),
                       sidecar: str | Path | None = None) -> tuple[Path, Path, list[dict]]:  # fmt: skip
    """Write the weighted copy to ``out`` and the evidence to ``sidecar`` (default ``OUT.reasons.jsonl``), atomically."""

    def make(ds: xr.Dataset, path: Path) -> tuple[bytes, list[dict], dict]:
        body, records = grpo_weights(ds, read_lines(path), config, where=str(cube_path), train=str(path))
        return body, records, {"harmful_tokens": len(records), "groups": len({r["id"] for r in records})}

    return write_training_export(cube_path, train, out, sidecar, "grpo-weights", config, make)
