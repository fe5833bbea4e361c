"""Saved optimizer state -> per-parameter state under canonical tensor names.

``torch.optim.Optimizer.state_dict()`` indexes parameters by position: ``state[i]`` belongs to the i-th
parameter of the concatenated ``param_groups[*]["params"]`` lists, in the order the training script passed
them. The order is not in the file, so it is rebuilt from how trainers group parameters and *checked*:
every position whose state holds a tensor (``exp_avg``, ``momentum_buffer``, …) must have the shape of the
parameter it is matched to. Orders tried (a reader passes the ones that fit its layout, best first):

* ``exact`` — the trainer's own list, e.g. Hugging Face Trainer's decay / no-decay groups rebuilt from the
  model's config;
* ``in order`` — the state dict's order (plain loops, Lightning's ``self.parameters()``);
* ``matrices first`` — tensors with ≥ 2 dims, then the rest (nanoGPT's ``configure_optimizers``).

Tensors that are not parameters (buffers such as a causal mask) are skipped when their shape does not fit.
An optimizer state saved by name (FSDP / DCP) needs no order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .base import OptimizerState, TensorInfo

Order = Callable[[list[str], dict[str, TensorInfo]], list[str]]


def in_order(names: list[str], info: dict[str, TensorInfo]) -> list[str]:
    return list(names)


def matrices_first(names: list[str], info: dict[str, TensorInfo]) -> list[str]:
    return [n for n in names if len(info[n].shape) >= 2] + [n for n in names if len(info[n].shape) < 2]


DEFAULT_ORDERS: dict[str, Order] = {"in order": in_order, "matrices first": matrices_first}


def map_optimizer_state(
    osd: dict,
    names: list[str],
    info: dict[str, TensorInfo],
    *,
    source: Path,
    orders: dict[str, Order] | None = None,
) -> tuple[OptimizerState | None, str | None]:
    """Match a torch optimizer state dict to tensor names: (state, None), or (None, what went wrong).

    An empty state (saved before the first step) is (None, None): nothing to map, nothing wrong.

    ``names`` are the checkpoint's canonical names in file order; ``info`` their shapes.
    """
    if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
        return None, f"{source}: optimizer state has no 'state' / 'param_groups'; not used"
    state: dict = osd["state"]
    if not state:
        return None, None
    groups = [dict(g) for g in osd["param_groups"]]
    positions = [list(g.get("params", [])) for g in groups]
    floating = [n for n in names if info[n].dtype.is_floating_point]

    if state and all(isinstance(k, str) for k in state):  # saved by name (FSDP / DCP style)
        unknown = [k for k in state if k not in info]
        mapping = {k: k for k in state if k in info}
        how = "by name"
        unmapped = len(unknown)
    else:
        shapes = {i: _state_shape(s) for i, s in state.items()}
        best: tuple[int, str, dict] | None = None
        for label, order in (orders or DEFAULT_ORDERS).items():
            assigned = _assign(order(floating, info), info, positions, shapes)
            if assigned is not None and (best is None or assigned[1] < best[0]):
                best = (assigned[1], label, assigned[0])
        if best is None:
            return None, (
                f"{source}: optimizer state ({sum(map(len, positions))} parameters) does not match the "
                f"checkpoint's tensors in any known order ({', '.join(orders or DEFAULT_ORDERS)}); not used"
            )
        skipped, how, mapping = best
        checked = sum(1 for i in mapping if shapes.get(i) is not None)
        how = f"{how}, shapes checked {checked}/{len(mapping)}"
        unmapped = 0

    per_param: dict[str, dict] = {}
    for key, name in mapping.items():
        per_param[name] = {k: (v if isinstance(v, torch.Tensor) and v.ndim > 0 else _scalar(v)) for k, v in state.get(key, {}).items()}
    for g, pos in zip(groups, positions):
        g["names"] = [mapping[p] for p in pos if p in mapping]
        g.pop("params", None)
    return OptimizerState(source, per_param, groups, how, unmapped), None


def _assign(order: list[str], info: dict[str, TensorInfo], positions: list[list], shapes: dict) -> tuple[dict, int] | None:
    """Walk ``order`` alongside the positions; skip names whose shape does not fit (buffers).

    Returns ({position: name}, number of names skipped), or None when the names run out.
    """
    out: dict = {}
    it = skipped = 0
    for pos in positions:
        for p in pos:
            want = shapes.get(p)
            while it < len(order) and want is not None and info[order[it]].shape != want:
                it, skipped = it + 1, skipped + 1
            if it == len(order):
                return None
            out[p] = order[it]
            it += 1
    return out, skipped


def _state_shape(s: dict) -> tuple[int, ...] | None:
    for v in s.values():
        if isinstance(v, torch.Tensor) and v.ndim > 0:
            return tuple(v.shape)
    return None


def _scalar(v):
    return float(v) if isinstance(v, torch.Tensor) else v
