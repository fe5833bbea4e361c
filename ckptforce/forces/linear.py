"""First-order and path-integrated change of log π along a parameter direction.

In: a pure model function ``fn(params, batch) -> logits (B, T, V)``, the parameters θ (a dict), a batch of
teacher-forced rows, and a direction v (a dict over some of θ's names; in practice Δθ = θ_{t+1} − θ_t).

    δz_t        = J_t v                               one JVP (or double VJP) for every row and position
    δ log π_t(y) = δz_t[y] − π_tᵀ δz_t                A_t = I − 1π_tᵀ applied analytically (DESIGN §1)
    Δ_lin       = Σ_m δ log π_m(y_m) = A·J·Δθ          first-order prediction of Δ log π(y|x)
    Δ_path      = ∫₀¹ A J(θ + sΔθ) Δθ ds = Δ_obs       exact on the straight path; Gauss–Legendre, n nodes

The split by parameter tensor uses per-row gradients g_b = ∇θ log π(y_b|x_b) (``vmap`` over rows):
Δ_lin,b,k = ⟨g_b,k, v_k⟩, and Σ_k Δ_lin,b,k = Δ_lin,b.

JVP (forward mode) and double VJP (reverse over reverse: J v = ∂/∂w ⟨Jᵀ w, v⟩) give the same numbers;
``method="auto"`` tries the JVP and falls back to the double VJP on an operator without a forward-mode rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.func import jvp

from ..numerics import release_memory
from .head import SplitLM, at_responses, to_rows
from .observe import Fn, _wide, chunks

METHODS = ("jvp", "double_vjp", "auto")


def _split(params: dict, direction: dict) -> tuple[dict, dict, dict]:
    """(moving params, fixed params, tangents): only tensors with a direction move."""
    moving = {n: p for n, p in params.items() if n in direction}
    fixed = {n: p for n, p in params.items() if n not in direction}
    tangents = {n: direction[n].to(dtype=p.dtype, device=p.device) for n, p in moving.items()}
    return moving, fixed, tangents


def jvp_logits(fn: Fn, params: dict, batch, direction: dict, *, method: str = "auto") -> tuple[torch.Tensor, torch.Tensor, str]:
    """(logits, J·v, method used): both (B, T, V). ``fn`` may return any tensor: ``delta_lin`` passes a
    ``SplitLM``'s ``hidden`` to get (h, δh), both (B, T, H)."""
    moving, fixed, tangents = _split(params, direction)

    def f(p):
        return fn({**fixed, **p}, batch)

    if method in ("jvp", "auto"):
        try:
            logits, dz = jvp(f, (moving,), (tangents,))
            return logits, dz, "jvp"
        except (NotImplementedError, RuntimeError):
            if method == "jvp":
                raise
    with torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in moving.items()}
        logits = f(leaves)
        if not logits.requires_grad:  # nothing that moves reaches the output
            return logits.detach(), torch.zeros_like(logits.detach()), "double_vjp"
        w = torch.zeros_like(logits, requires_grad=True)
        grads = torch.autograd.grad(logits, list(leaves.values()), grad_outputs=w, create_graph=True, allow_unused=True)
        pairs = [(g, tangents[n]) for g, n in zip(grads, leaves) if g is not None]
        if not pairs:  # the output does not depend on the moving tensors (a SplitLM's body and an untied head)
            return logits.detach(), torch.zeros_like(logits.detach()), "double_vjp"
        (dz,) = torch.autograd.grad([g for g, _ in pairs], w, grad_outputs=[t for _, t in pairs])
    return logits.detach(), dz.detach(), "double_vjp"


@dataclass
class LinearChange:
    tok: torch.Tensor  # (B, T) δ log π_t(y_t) at response positions
    total: torch.Tensor  # (B,)
    argmax_tok: torch.Tensor  # (B, T) δ log π_t(y*_t), y* the argmax at θ
    argmax: torch.Tensor  # (B,)
    full: torch.Tensor | None = None  # (B, V) classifiers: δ log π of every class
    method: str = ""


def dlogp_from_dlogits(logits: torch.Tensor, dz: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *, full: bool = False) -> LinearChange:
    """Apply A_t = I − 1π_tᵀ to δz_t (B, T, V) and read off the targets and the argmax."""
    logits, dz = _wide(logits), _wide(dz)
    probs = torch.softmax(logits, dim=-1)  # (B, T, V)
    mean_dz = (probs * dz).sum(-1)  # (B, T)  π_tᵀ δz_t
    m = mask.to(dz.dtype)
    tok = (dz.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - mean_dz) * m
    argmax_ids = logits.argmax(-1)
    argmax_tok = (dz.gather(-1, argmax_ids.unsqueeze(-1)).squeeze(-1) - mean_dz) * m
    return LinearChange(tok, tok.sum(-1), argmax_tok, argmax_tok.sum(-1), (dz - mean_dz.unsqueeze(-1))[:, 0, :] if full else None)


def delta_lin(fn: Fn, params: dict, batch, direction: dict, *, method: str = "auto", chunk_size: int | None = None, full: bool = False) -> LinearChange:
    """Δ_lin = A·J·v for every row of ``batch``, ``chunk_size`` rows per JVP."""
    parts, used = [], ""
    for sub in chunks(batch, chunk_size):
        if isinstance(fn, SplitLM) and not full:
            h, dh, used = jvp_logits(fn.hidden, params, sub, direction, method=method)  # (B, T, H) each
            parts.append(dlogp_split(fn, params, sub, h, dh, direction))
            continue
        logits, dz, used = jvp_logits(fn, params, sub, direction, method=method)
        parts.append(dlogp_from_dlogits(logits, dz, sub.targets, sub.target_mask, full=full))
    out = _cat_changes(parts)
    out.method = used
    return out


def dlogp_split(fn: SplitLM, params: dict, batch, h: torch.Tensor, dh: torch.Tensor, direction: dict) -> LinearChange:
    """``dlogp_from_dlogits``'s numbers at the response positions only: δz = δh Wᵀ + h δWᵀ + δb streamed over the
    vocabulary (``head.head_stats``) from the body's (h, δh) (B, T, H); no (B, T, V) tensor."""
    mask = batch.target_mask
    return change_from_stats(fn.stats(params, at_responses(h, mask), batch.targets[mask], dh=at_responses(dh, mask), direction=direction), mask)


def change_from_stats(st, mask: torch.Tensor) -> LinearChange:
    """A ``LinearChange`` of rows (B, T) from a streamed head's δ log π (N,) at the response positions of ``mask``."""
    tok, argmax_tok = to_rows(st.dlogp, mask), to_rows(st.dlogp_max, mask)  # (B, T)
    return LinearChange(tok, tok.sum(-1), argmax_tok, argmax_tok.sum(-1))


def _cat_changes(parts: list[LinearChange]) -> LinearChange:
    width = max(p.tok.shape[1] for p in parts)

    def pad(x):
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))

    return LinearChange(
        torch.cat([pad(p.tok) for p in parts]),
        torch.cat([p.total for p in parts]),
        torch.cat([pad(p.argmax_tok) for p in parts]),
        torch.cat([p.argmax for p in parts]),
        torch.cat([p.full for p in parts]) if parts[0].full is not None else None,
    )


def contributions_by_tensor(fn: Fn, params: dict, batch, direction: dict, *, chunk_size: int | None = 8,
                            module=None, factored_chunk: int | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor]:  # fmt: skip
    """(names, C (B, K), C* (B, K)): C[b, k] = ⟨∇_{θ_k} log π(y_b|x_b), v_k⟩, and C* the same for y*.

    With ``module`` (the nn.Module ``fn`` evaluates), from backprop factors (``factored.py``: about four
    forwards, ``factored_chunk`` rows at a time), per-row gradients only for the tensors it does not cover.
    Without, per-row gradients by ``torch.func.vmap`` over rows of ``jacrev`` of (log π(y), log π(y*)) — each row a
    batch of one, so padding never mixes rows; memory is chunk_size × 2 × |θ|. Models that vmap cannot trace
    (data-dependent Python control flow) fall back to one batched backward per chunk.
    """
    if module is not None:
        from .factored import factored_contributions

        names, c, c_star, missing = factored_contributions(fn, module, params, batch, direction, chunk_size=factored_chunk)
        return fill_missing(fn, params, batch, direction, (names, c, c_star), missing, chunk_size=chunk_size)
    moving, fixed, tangents = _split(params, direction)
    names = list(moving)
    rows, rows_star = [], []
    for sub in chunks(batch, chunk_size):
        try:
            grads = _vmapped_row_grads(fn, fixed, moving, sub)  # name -> (b, 2, *shape)
        except Exception:  # noqa: BLE001 - vmap refuses many constructs; the slow path handles all
            grads = _autograd_row_grads(fn, fixed, moving, sub)
        c = torch.stack([(grads[n] * tangents[n].unsqueeze(0).unsqueeze(0)).flatten(2).sum(2) for n in names], dim=-1)  # (b, 2, K)
        rows.append(c[:, 0])
        rows_star.append(c[:, 1])
    return names, torch.cat(rows), torch.cat(rows_star)


def fill_missing(fn: Fn, params: dict, batch, direction: dict, split: tuple, missing: list[str], *, chunk_size: int | None = 8) -> tuple:
    """``split`` = (names, C, C*) of the factored split with the columns of ``missing`` (tensors whose module has no
    factored form) filled from per-row gradients, ``chunk_size`` rows at a time."""
    names, c, c_star = split
    if missing:
        rest, c_rest, star_rest = contributions_by_tensor(fn, params, batch, {n: direction[n] for n in missing}, chunk_size=chunk_size)
        at = [names.index(n) for n in rest]
        c[:, at], c_star[:, at] = c_rest, star_rest
    return names, c, c_star


def _row_scores(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(…, 2): Σ_t log π_t(y_t) and Σ_t max_v log π_t(v) over the masked positions."""
    logp = torch.log_softmax(_wide(logits), dim=-1)  # (…, T, V)
    m = mask.to(logp.dtype)
    s = (logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * m).sum(-1)
    s_star = (logp.max(-1).values * m).sum(-1)
    return torch.stack([s, s_star], dim=-1)


def _vmapped_row_grads(fn: Fn, fixed: dict, moving: dict, sub) -> dict[str, torch.Tensor]:
    from types import SimpleNamespace

    from torch.func import jacrev, vmap

    fields = {k: v for k, v in vars(sub).items() if isinstance(v, torch.Tensor)}

    def one_row(p, row):
        single = SimpleNamespace(**{k: v.unsqueeze(0) for k, v in row.items()})  # a batch of one
        return _row_scores(fn({**fixed, **p}, single), single.targets, single.target_mask)[0]  # (2,)

    with torch.enable_grad():
        return vmap(jacrev(one_row), in_dims=(None, 0))(moving, fields)


def _autograd_row_grads(fn: Fn, fixed: dict, moving: dict, sub) -> dict[str, torch.Tensor]:
    with torch.enable_grad():
        leaves = {n: p.detach().requires_grad_(True) for n, p in moving.items()}
        scores = _row_scores(fn({**fixed, **leaves}, sub), sub.targets, sub.target_mask)  # (b, 2)
        per_output = [_batched_grads(scores[:, j], list(leaves.values())) for j in range(2)]
    return {n: torch.stack([per_output[0][i], per_output[1][i]], dim=1) for i, n in enumerate(leaves)}


def _batched_grads(out: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-row gradients of out (b,) w.r.t. inputs: each (b, *shape). Zeros for an input out does not use."""
    eye = torch.eye(out.shape[0], dtype=out.dtype, device=out.device)
    try:
        grads = torch.autograd.grad(out, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=True, allow_unused=True)
    except RuntimeError:  # an operator without a batching rule: one row at a time
        per_row = [torch.autograd.grad(out[b], inputs, retain_graph=True, allow_unused=True) for b in range(out.shape[0])]
        grads = [None if per_row[0][i] is None else torch.stack([r[i] for r in per_row]) for i in range(len(inputs))]
    return [torch.zeros((out.shape[0], *x.shape), dtype=x.dtype, device=x.device) if g is None else g for g, x in zip(grads, inputs)]


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of n-point Gauss–Legendre quadrature on [0, 1] (exact for degree ≤ 2n − 1)."""
    if n < 1:
        raise ValueError(f"quadrature needs at least one node, got {n}")
    x, w = np.polynomial.legendre.leggauss(n)
    return (x + 1) / 2, w / 2


@dataclass
class PathChange:
    total: torch.Tensor  # (B,)   ≈ Δ_obs
    tok: torch.Tensor  # (B, T)
    argmax: torch.Tensor  # (B,)   path integral of d/ds log π(y*(s))
    by_tensor: torch.Tensor | None  # (B, K), sums over k to ``total``
    names: list[str]
    nodes: int
    method: str = ""


def delta_path(
    fn: Fn, params: dict, batch, direction: dict, *, nodes: int = 2, method: str = "auto", chunk_size: int | None = None,
    by_tensor: bool = False, split_chunk: int | None = 8, module=None,
) -> PathChange:
    """Δ_path = Σ_i w_i · A J(θ + s_iΔθ) Δθ, Gauss–Legendre nodes s_i on [0, 1].

    Exact when log π is a polynomial of degree ≤ 2n − 1 along the path; the gap to the observed change
    Δ_obs − Δ_path is the attribution's error and is reported by the caller. With ``by_tensor`` and ``module``
    each node is one factored split (``factored.py``; its columns sum to A·J·Δθ at the node), no JVP, and
    ``tok`` is not computed (zeros).
    """
    s_nodes, weights = gauss_legendre(nodes)
    total = tok = argmax = split = None
    names: list[str] = []
    used = ""
    point = None
    for s, w in zip(s_nodes, weights):
        del point  # one node's θ alive at a time
        release_memory()
        point = {n: p + float(s) * direction[n].to(p) if n in direction else p for n, p in params.items()}
        if by_tensor and module is not None:  # the split at the node sums to A·J·Δθ there (checked at θ by the caller)
            names, c, c_star = contributions_by_tensor(fn, point, batch, direction, module=module, factored_chunk=chunk_size)
            total = w * c.sum(1) if total is None else total + w * c.sum(1)
            argmax = w * c_star.sum(1) if argmax is None else argmax + w * c_star.sum(1)
            split = w * c if split is None else split + w * c
            used = "factored"
            continue
        lin = delta_lin(fn, point, batch, direction, method=method, chunk_size=chunk_size)
        used = lin.method
        total = w * lin.total if total is None else total + w * lin.total
        tok = w * lin.tok if tok is None else _padded_add(tok, w * lin.tok)
        argmax = w * lin.argmax if argmax is None else argmax + w * lin.argmax
        if by_tensor:
            names, c, _ = contributions_by_tensor(fn, point, batch, direction, chunk_size=split_chunk, module=module, factored_chunk=chunk_size)
            split = w * c if split is None else split + w * c
    if tok is None:  # the factored path: per token it is not split (the caller keeps Δ_lin's per-token change)
        tok = torch.zeros_like(batch.target_mask, dtype=total.dtype)
    return PathChange(total, tok, argmax, split, names, nodes, used)


def _padded_add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    width = max(a.shape[1], b.shape[1])
    pad = torch.nn.functional.pad
    return pad(a, (0, width - a.shape[1])) + pad(b, (0, width - b.shape[1]))


def remainder_ratio(observed: torch.Tensor, predicted: torch.Tensor) -> float:
    """‖Δ_obs − Δ_pred‖ / ‖Δ_obs‖ over all rows: how much of the change a prediction misses (0 = all)."""
    denom = float(torch.linalg.vector_norm(observed))
    return float(torch.linalg.vector_norm(observed - predicted)) / denom if denom > 0 else float("nan")
