"""A labelled fast approximation of the training examples' forces for large training sets (``--forces approximate``).

The exact force of example u on probe row o is Δ_u(o) = −c_u ⟨∇θ log π_o, P ⊙ g_u⟩ (attribution.py), with P
Adam's elementwise preconditioner. An elementwise P blocks the ghost inner products (kernels / ghost.py), which
never form a per-row gradient. A rank-one P does not: for a layer whose per-row gradient is G = Σ_t u_t v_tᵀ,

    (r cᵀ) ⊙ (u vᵀ) = (r ⊙ u)(c ⊙ v)ᵀ,

so scaling the training side's ghost factors by r and c gives ⟨G_o, (r cᵀ) ⊙ G_u⟩ from the same products as
the kernel. P is fitted per matrix the way Adafactor factors the second moment (Shazeer & Stern 2018):
with v = (κ/P)² (κ = P's bias-correction numerator, which cancels), R = Σ_j v_ij, C = Σ_i v_ij, S = Σ v,

    P̃_ij = κ √S / √(R_i C_j)          (rank one; exact when v is; ε dropped)

Vectors (biases, norms) and tensors without ghost factors keep P exactly. Every training row is one ghost
product against every probe row, so U examples cost two backward passes over the training rows in chunks and
no JVP per example. The approximation's error is measured on the run itself: the exact forces of a few
examples (``exact_forces`` on a subset) against the approximate ones, stored beside them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..numerics import release_memory
from .ghost import RowGrads, kernel_between, row_grads, row_grads_each
from .kernels import _train_chunks, logp_rows, nll_rows
from .observe import _wide
from .observe import pieces as probe_pieces


def rank_one(p: Tensor) -> tuple[Tensor, Tensor] | None:
    """(r (m,), c (n,)) with r cᵀ ≈ P (m, n) by Adafactor's factoring of v = 1/P²; None where P has zeros
    (frozen entries: P̃ would not be zero there) or is not a matrix."""
    if p.dim() != 2 or not bool((p > 0).all()):
        return None
    v = p.double().pow(-2)
    rows, cols, total = v.sum(1), v.sum(0), v.sum()
    return (total.sqrt() / rows.sqrt()).to(p.dtype), (1 / cols.sqrt()).to(p.dtype)


def _max_logp_rows(logits: Tensor, batch) -> Tensor:
    """Σ_t max_v log π_t(v): the score of y*, the argmax response at θ."""
    logp = torch.log_softmax(_wide(logits), dim=-1)
    return (logp.max(-1).values * batch.target_mask.to(logp.dtype)).sum(-1)


def precondition_rows(grads: RowGrads, scale: dict[str, Tensor]) -> tuple[RowGrads, list[str]]:
    """The training rows' gradients with P̃ applied (a copy: layers share factors, e.g. one input read by three
    projections, so nothing is scaled in place; factors scaled, dense rows multiplied), and the names whose P was
    replaced by its rank-one fit."""
    out = RowGrads(grads.n, grads.dtype, grads.device, shapes=dict(grads.shapes), dense={}, factors={})
    fitted = []
    for name, uses in grads.factors.items():
        p = scale.get(name)
        if p is None:
            out.factors[name] = uses
            continue
        p = p.to(device=grads.device, dtype=grads.dtype)
        if p.dim() == 1:  # a bias: (d, None) uses, P exact
            out.factors[name] = [(u * p, None) for u, _ in uses]
            continue
        fit = rank_one(p)
        if fit is None:  # zeros (frozen entries): per-row gradients with the exact P
            from .ghost import materialise

            out.dense[name] = materialise(grads, name) * p.flatten()
            continue
        r, c = fit
        fitted.append(name)
        scaled = []
        for u, v in uses:
            if u.dtype == torch.long:  # an embedding: one-hot rows, so r[id] scales each position's v
                scaled.append((u, v * c * r[u].unsqueeze(-1)))
            else:
                scaled.append((u * r, v * c))
        out.factors[name] = scaled
    for name, g in grads.dense.items():
        p = scale.get(name)
        out.dense[name] = g if p is None else g * p.to(device=g.device, dtype=g.dtype).flatten()
    return out, fitted


def approximate_forces(fn, params: dict, probes, train_rows, owners: list[int], weights: Tensor, coeff: Tensor, scale: dict[str, Tensor] | None,
                       *, module, names: list[str], chunk_size: int | None = 64, held_bytes: float | None = None,
                       progress=None) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:  # fmt: skip
    """(pos, neg, pos*, neg* — each (U, B) — and the names fitted rank-one): Δ̃_u(o) = −c_u Σ_{r of u, sign}
    ⟨G_o, P̃ ⊙ ∇(w_r · (−log π_r))⟩ over the tensors ``names``; ``scale`` = P (None: SGD, P = I).

    Memory: the probe rows' factors (of log π(y) and of log π(y*)) are captured once and held when all of them
    take at most ``held_bytes`` (estimated from the first chunk; None: always); the training rows then go in
    chunks of half ``chunk_size`` beside them. Otherwise the training rows' factors, captured half ``chunk_size``
    rows at a time, are gathered into blocks of at most ``held_bytes`` (the room the probe factors would have taken),
    and the probe rows, in chunks of half ``chunk_size``, are captured again once per block: the fewer blocks, the
    fewer of those captures, which are most of the work. ``progress(done, total)`` after each block, in training
    rows."""
    n_ex, n_probe = len(coeff), len(probes)
    out = {key: torch.zeros(n_ex, n_probe, dtype=torch.float64) for key in ("pos", "neg", "pos*", "neg*")}
    half = max(1, chunk_size // 2) if chunk_size else None
    pieces = probe_pieces(probes, half)

    def probe_sides(sub) -> dict[str, RowGrads]:  # log π(y) and log π(y*): one forward, a backward each
        y, y_star = row_grads_each(fn, params, sub, [logp_rows, _max_logp_rows], module=module, names=names)
        release_memory()  # the pass's activations, handed back
        return {"": y, "*": y_star}

    first = probe_sides(pieces[0][1])
    per_row = sum(_nbytes(g) for g in first.values()) / len(pieces[0][1])
    held = [first] + [probe_sides(sub) for _, sub in pieces[1:]] if held_bytes is None or per_row * n_probe <= held_bytes else None
    del first
    owner = torch.tensor(owners)
    c_row = coeff.double()[owner]  # (rows,)
    fitted: list[str] = []
    block: list[tuple[slice, Tensor, RowGrads]] = []  # (rows, their loss weights, their preconditioned factors)

    def flush() -> None:  # every probe chunk (held, or captured once for the block) against the block's rows
        for i, (at, probe_sub) in enumerate(pieces):
            sides = held[i] if held is not None else probe_sides(probe_sub)
            for rows, w, g in block:
                who = owner[rows]
                for suffix, side in sides.items():
                    k = sum(kernel_between(side, g).values()).double().cpu()  # (probe rows of the chunk, training rows)
                    contrib = -(k * c_row[rows][None, :]).T  # (r, b)
                    for key, sign in (("pos", w > 0), ("neg", w < 0)):
                        out[key + suffix][:, at].index_add_(0, who[sign], contrib[sign])
            del sides
        block.clear()
        release_memory()  # the block's factors

    start, total, block_bytes = 0, len(train_rows), 0
    for sub in _train_chunks(train_rows, weights.to(torch.float64), half):  # w rides with each row; half: beside the held probes or block
        rows = slice(start, start + len(sub.targets))
        start += len(sub.targets)
        g = row_grads(fn, params, sub, nll_rows, module=module, names=names)  # row r: w_r ∇(−log π_r)
        if scale is not None:
            g, fitted = precondition_rows(g, scale)
        block.append((rows, sub.loss_weight.double().cpu(), g))
        block_bytes += _nbytes(g)
        del g
        room = held is None and block_bytes * (len(block) + 1) / len(block) <= held_bytes  # one more chunk fits
        if not room or start == total:
            flush()
            block_bytes = 0
            if progress is not None:
                progress(start, total)
    return out["pos"], out["neg"], out["pos*"], out["neg*"], fitted


def _nbytes(grads: RowGrads) -> int:
    """Bytes held by a batch's ghost factors and dense per-row gradients."""
    factors = sum(t.numel() * t.element_size() for uses in grads.factors.values() for use in uses for t in use if t is not None)
    return factors + sum(t.numel() * t.element_size() for t in grads.dense.values())


def relative_error(approx: Tensor, exact: Tensor) -> float:
    """‖approx − exact‖_F / ‖exact‖_F (NaN when the exact forces are all zero)."""
    den = float(torch.linalg.vector_norm(exact))
    return float(torch.linalg.vector_norm(approx - exact)) / den if den > 0 else float("nan")
