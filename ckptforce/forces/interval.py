"""One checkpoint interval, all first-order quantities at once: the pure function the pipeline maps over pairs.

In: the model function, θ_t and θ_{t+1} (dicts over the same names), a batch. Out: ``IntervalForces`` —

    Δ_obs  = log π(y|x; θ_{t+1}) − log π(y|x; θ_t)          observed
    Δ_lin  = A·J(θ_t)·Δθ                                    first-order prediction (one JVP)
    Δ_path = Σ_i w_i A·J(θ_t + s_iΔθ)·Δθ                     complete attribution, gap Δ_obs − Δ_path reported
    split of Δ_lin and Δ_path by parameter tensor           (optional; backprop factors, or per-row gradients)

A streamed head (``SplitLM``) with the factored split takes log π(θ_t), Δ_lin and the split at θ_t in one pass
over positions × vocabulary (``factored.factored_tangent``).

for every row, and the same for the argmax response y* of each row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from .factored import factored_tangent
from .head import SplitLM
from .linear import contributions_by_tensor, delta_lin, delta_path, fill_missing, remainder_ratio
from ..numerics import release_memory
from .observe import Fn, Observed, observe

#: Rows per chunk of the per-tensor split: its memory is rows × 2 × |θ| (per-row gradients), so it stays small
#: whatever chunk the forward / JVP uses.
SPLIT_CHUNK = 8

#: Gauss–Legendre nodes used by default. Measured by bench/forces.py on the sample Trainer run (float64):
#: max |Δ_path − Δ_obs| / max |Δ_obs| is 1.2e-1 (tangent), 7.5e-3, 5.7e-5, 4.8e-7, 3.8e-9 for n = 0…4 on
#: steps 2→4 and 1.6e-1, 1.2e-2, 1.7e-4, 2.0e-6, 2.3e-8 on steps 2→6; each node costs one JVP (≈3.3× a
#: forward). n = 2 is the smallest below 1e-3 on both; the gap is measured and stored for every interval.
DEFAULT_NODES = 2


@dataclass
class IntervalForces:
    before: Observed
    after: Observed
    dlogp_obs: torch.Tensor  # (B,)
    dlogp_lin: torch.Tensor  # (B,)
    dlogp_lin_tok: torch.Tensor  # (B, T)
    dlogp_path: torch.Tensor | None  # (B,)
    argmax_obs: torch.Tensor  # (B,) change of log π(y*) (y* re-taken at each end)
    argmax_lin: torch.Tensor  # (B,)
    argmax_path: torch.Tensor | None  # (B,)
    tensor_names: list[str]
    lin_by_tensor: torch.Tensor | None  # (B, K)
    argmax_lin_by_tensor: torch.Tensor | None  # (B, K)
    path_by_tensor: torch.Tensor | None  # (B, K)
    method: str
    nodes: int
    split_method: str = ""  # how the split by tensor was taken ("" without one): SPLIT_FACTORED or SPLIT_PER_ROW

    @staticmethod
    def cat(parts: list["IntervalForces"], width: int) -> "IntervalForces":
        """Rows of several probe batches in order; per-token tensors padded to ``width`` positions."""
        out = {}
        for f in fields(IntervalForces):
            values = [getattr(p, f.name) for p in parts]
            first = values[0]
            if isinstance(first, Observed):
                out[f.name] = Observed.cat(values, width=width)
            elif isinstance(first, torch.Tensor):
                pad = f.name == "dlogp_lin_tok"
                out[f.name] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) if pad else v for v in values])
            elif f.name == "split_method":  # per-row in any part (the fallback ran): say so
                out[f.name] = SPLIT_PER_ROW if SPLIT_PER_ROW in values else first
            else:
                out[f.name] = first  # None, names, method, nodes: the same in every part
        return IntervalForces(**out)

    @property
    def remainder(self) -> torch.Tensor:
        """Δ_obs − Δ_lin: what the first-order prediction misses (the O(η²) part)."""
        return self.dlogp_obs - self.dlogp_lin

    @property
    def remainder_ratio(self) -> float:
        return remainder_ratio(self.dlogp_obs, self.dlogp_lin)

    @property
    def path_gap(self) -> torch.Tensor | None:
        """Δ_obs − Δ_path: the quadrature error of the attribution (its error bound, measured)."""
        return None if self.dlogp_path is None else self.dlogp_obs - self.dlogp_path


#: The split by tensor must add up to the JVP's Δ_lin within this (relative to the largest |Δ_lin|).
SPLIT_SUM_TOL = 1e-4


#: ``IntervalForces.split_method``: from backprop factors (tensors without a factored form still by per-row
#: gradients, ``linear.fill_missing``), or from per-row gradients throughout (no module given, or the factored split
#: of a model the factors misread did not add up to Δ_lin and its per-row twin was taken instead).
SPLIT_FACTORED, SPLIT_PER_ROW = "backprop factors", "per-row gradients"


def _sums_to(split: torch.Tensor, total: torch.Tensor) -> bool:
    """Σ_k C[b, k] = Δ_lin,b for every row, up to rounding: the split's own check."""
    scale = float(total.abs().max()) if total.numel() else 0.0
    return bool(((split.sum(1) - total).abs() <= SPLIT_SUM_TOL * scale + 1e-12).all())


def interval_forces(
    fn: Fn,
    before: dict,
    after: dict,
    batch,
    *,
    nodes: int = DEFAULT_NODES,
    by_tensor: bool = False,
    method: str = "auto",
    chunk_size: int | None = None,
    batch_rows: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    full: bool = False,
    module=None,
    step: dict | None = None,
) -> IntervalForces:
    """Everything first-order about one interval; ``nodes=0`` skips the path integral; ``full`` keeps the whole
    distribution of one-position (classifier) rows in ``before.logp_full`` / ``after.logp_full``.

    Every quantity is per row, so ``batch_rows`` may split the batch into probe batches computed one after
    another (the result is the same); ``progress(rows_done, rows)`` is called after each. ``step`` gives
    Δθ when the caller formed it wider than the parameters (bfloat16 / float16 analyses: the difference of
    two half-precision checkpoints would lose most of a small update).
    """
    if batch_rows and len(batch) > batch_rows:
        parts = []
        for start in range(0, len(batch), batch_rows):
            rows = batch.select(slice(start, start + batch_rows))
            parts.append(interval_forces(fn, before, after, rows, nodes=nodes, by_tensor=by_tensor, method=method, chunk_size=chunk_size,
                                         full=full, module=module, step=step))  # fmt: skip
            if progress:
                progress(min(start + batch_rows, len(batch)), len(batch))
        width = batch.input_ids.shape[1] if hasattr(batch, "input_ids") else batch.targets.shape[1]  # classifier rows: one position
        return IntervalForces.cat(parts, width=width)
    if step is None:
        step = {n: after[n] - before[n] for n, p in before.items() if p.is_floating_point()}
    names, lin_split, star_split = list(step), None, None
    if by_tensor and module is not None and isinstance(fn, SplitLM) and not full:  # observe, Δ_lin and the split: one head pass
        obs_a, lin, split, missing = factored_tangent(fn, module, before, batch, step, chunk_size=chunk_size, method=method)
        names, lin_split, star_split = fill_missing(fn, before, batch, step, split, missing, chunk_size=SPLIT_CHUNK)
    else:
        obs_a = observe(fn, before, batch, chunk_size=chunk_size, full=full)
        lin = delta_lin(fn, before, batch, step, method=method, chunk_size=chunk_size)
        release_memory()
        if by_tensor:
            names, lin_split, star_split = contributions_by_tensor(fn, before, batch, step, chunk_size=SPLIT_CHUNK, module=module, factored_chunk=chunk_size)
    obs_b = observe(fn, after, batch, chunk_size=chunk_size, full=full)
    split_method = ""
    if by_tensor:
        split_method = SPLIT_FACTORED if module is not None else SPLIT_PER_ROW
        if module is not None and not _sums_to(lin_split, lin.total):  # a model the factors misread: the slow twin
            module, split_method = None, SPLIT_PER_ROW
            names, lin_split, star_split = contributions_by_tensor(fn, before, batch, step, chunk_size=SPLIT_CHUNK)
    path = (
        delta_path(fn, before, batch, step, nodes=nodes, method=method, chunk_size=chunk_size, by_tensor=by_tensor, split_chunk=SPLIT_CHUNK,
                   module=module)  # fmt: skip
        if nodes
        else None
    )
    if progress:
        progress(len(batch), len(batch))
    return IntervalForces(
        before=obs_a,
        after=obs_b,
        dlogp_obs=obs_b.logp - obs_a.logp,
        dlogp_lin=lin.total,
        dlogp_lin_tok=lin.tok,
        dlogp_path=None if path is None else path.total,
        argmax_obs=obs_b.argmax_logp - obs_a.argmax_logp,
        argmax_lin=lin.argmax,
        argmax_path=None if path is None else path.argmax,
        tensor_names=names,
        lin_by_tensor=lin_split,
        argmax_lin_by_tensor=star_split,
        path_by_tensor=None if path is None else path.by_tensor,
        method=lin.method,
        nodes=nodes,
        split_method=split_method,
    )
