"""The language-model head, streamed: log-softmax statistics, A·δz and ∂ log π/∂h at the response positions only,
in chunks of positions × vocabulary, so that no (B, T, V) tensor is ever formed.

In: the final hidden states at the N response positions h (N, H) — gathered from (B, T, H) by the batch's
``target_mask`` — the head z = h Wᵀ + b (W (V, H), b (V,)), the targets y (N,), and optionally a tangent
(δh (N, H), δW (V, H), δb (V,)) or a request for the gradient at h. Out: ``HeadStats``, every field per position.

Per position, over the vocabulary in chunks c with an online softmax (running max μ, s = Σ_v e^{z_v − μ}, every
accumulator rescaled by e^{μ_old − μ_new} when μ grows):

    lse          = μ + log s                         log π(v) = z_v − lse
    log π(y*)    = −log s,   y* = argmax_v z_v        (the first maximiser, as ``torch.max``)
    H            = log s − Σ_v e^{z_v − μ}(z_v − μ) / s
    Σ_v π_v²     = Σ_v e^{2(z_v − μ)} / s²            peakiness ‖A‖_F² = V Σ π² + V − 2
    δz           = δh Wᵀ + h δWᵀ + δb                 (the head's JVP; δh from the body's)
    δ log π(y)   = δz_y − πᵀ δz,  likewise for y*     A = I − 1πᵀ applied analytically (DESIGN §1)
                   and, on request, its parts along δW alone (δz_W = h δWᵀ) and δb alone: the head's columns of a split
    ∂ log π(y)/∂h = W_y − πᵀ W,  likewise for y*      (the backward of the scores, for the factored split)

Memory: ``budget.HEAD_COPIES`` tensors of (positions per chunk, vocabulary per chunk) at once, whatever T and V.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..numerics import wide as _wide

@dataclass(frozen=True)
class SplitLM:
    """A causal LM whose logits are one linear map of its last hidden states, z = h Wᵀ + b.

    Called as ``fn(params, batch)`` it gives the model's own (B, T, V) logits, so every force function takes it
    where it takes a logits function; ``observe``, ``delta_lin`` and the factored split see ``hidden`` and the
    head's names and never form (B, T, V). ``positions`` × ``vocab`` is the chunk of the head (None: all)."""

    logits: Callable  # (params, batch) -> (B, T, V), the model's own
    hidden: Callable  # (params, batch) -> (B, T, H), what the head reads (after the final norm)
    weight: str  # name of W (V, H) in params (a tied input embedding keeps its own name)
    bias: str | None = None  # name of b (V,), if the head has one
    positions: int | None = None
    vocab: int | None = None

    def __call__(self, params: dict, batch) -> torch.Tensor:
        return self.logits(params, batch)

    def stats(self, params: dict, h: torch.Tensor, targets: torch.Tensor, *, dh: torch.Tensor | None = None,
              direction: dict | None = None, grad: bool = False, parts: bool = False) -> "HeadStats":  # fmt: skip
        """``head_stats`` with this head's W, b, chunks, and δW, δb read from ``direction`` (when it moves them)."""
        w = params[self.weight]
        b = params[self.bias] if self.bias else None
        direction = direction or {}
        dw = direction[self.weight].to(w) if self.weight in direction else None
        db = direction[self.bias].to(w) if self.bias and self.bias in direction else None
        tangent = (dh, dw, db) if direction or dh is not None else None
        return head_stats(h, w, b, targets, tangent=tangent, grad=grad, parts=parts, positions=self.positions, vocab=self.vocab)


@dataclass
class HeadStats:
    lse: torch.Tensor  # (N,) log Σ_v e^{z_v}
    logp: torch.Tensor  # (N,) log π(y)
    argmax: torch.Tensor  # (N,) y*, long
    logp_max: torch.Tensor  # (N,) log π(y*)
    entropy: torch.Tensor  # (N,) nats
    sumsq: torch.Tensor  # (N,) Σ_v π_v²
    dlogp: torch.Tensor | None = None  # (N,) δ log π(y) along the tangent
    dlogp_max: torch.Tensor | None = None  # (N,) δ log π(y*)
    grad: torch.Tensor | None = None  # (N, H) ∂ log π(y)/∂h
    grad_max: torch.Tensor | None = None  # (N, H) ∂ log π(y*)/∂h
    dlogp_w: torch.Tensor | None = None  # (N,) δ log π(y) along δW alone (``parts``): the head weight's column
    dlogp_max_w: torch.Tensor | None = None  # (N,) δ log π(y*) along δW alone
    dlogp_b: torch.Tensor | None = None  # (N,) δ log π(y) along δb alone (``parts``): the head bias's column
    dlogp_max_b: torch.Tensor | None = None  # (N,) δ log π(y*) along δb alone


def head_stats(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, *,
               tangent: tuple | None = None, grad: bool = False, parts: bool = False, positions: int | None = None,
               vocab: int | None = None) -> HeadStats:  # fmt: skip
    """The module docstring's statistics of z = h Wᵀ + b (h (N, H), W (V, H)), ``positions`` × ``vocab`` at a time.

    ``tangent`` = (δh (N, H) | None, δW (V, H) | None, δb (V,) | None) adds δ log π(y), δ log π(y*); with
    ``parts`` also their parts along δW alone, δz_W = h δWᵀ (``dlogp_w``), and along δb alone (``dlogp_b``): the
    head's columns of a split by tensor, when the same pass takes the whole tangent. ``grad`` adds ∂ log π/∂h for
    both. Reductions run in float32 at least (float64 stays float64)."""
    n = h.shape[0]
    step = positions or max(n, 1)
    done = [_stats_chunk(h[i : i + step], weight, bias, targets[i : i + step], _rows(tangent, i, i + step), grad, parts, vocab)
            for i in range(0, n, step)]  # fmt: skip
    if not done:
        done = [_stats_chunk(h, weight, bias, targets, tangent, grad, parts, vocab)]
    out = {}
    for name in HeadStats.__dataclass_fields__:
        values = [getattr(p, name) for p in done]
        out[name] = None if values[0] is None else torch.cat(values)
    return HeadStats(**out)


def _rows(tangent: tuple | None, start: int, stop: int) -> tuple | None:
    if tangent is None:
        return None
    dh, dw, db = tangent
    return (None if dh is None else dh[start:stop], dw, db)


def _stats_chunk(h, weight, bias, y, tangent, grad: bool, parts: bool, vocab: int | None) -> HeadStats:
    """One chunk of positions (P, H) over the whole vocabulary, ``vocab`` entries at a time (online softmax)."""
    p, V = h.shape[0], weight.shape[0]
    wide = _wide(torch.empty((), dtype=h.dtype)).dtype
    new = lambda: torch.zeros(p, dtype=wide, device=h.device)  # noqa: E731
    mu = torch.full((p,), float("-inf"), dtype=wide, device=h.device)  # running max of z
    s, u, q, z_y = new(), new(), new(), new()  # Σ e^{z−μ}, Σ e^{z−μ}(z−μ), Σ e^{2(z−μ)}, z_y
    best = torch.zeros(p, dtype=torch.long, device=h.device)
    along = along_w = along_b = None  # (Σ e^{z−μ} δz, δz_y, δz_{y*}) of the tangent, and of its parts along δW, δb alone
    apart_w = apart_b = False  # δz_W, δz_b apart from the rest of δz: only when there is a rest
    if tangent is not None:
        dh, dw, db = tangent
        along = (new(), new(), new())
        apart_w = parts and dw is not None and (dh is not None or db is not None)
        apart_b = parts and db is not None and (dh is not None or dw is not None)
        along_w = (new(), new(), new()) if apart_w else None
        along_b = (new(), new(), new()) if apart_b else None
    acc = torch.zeros(p, h.shape[1], dtype=wide, device=h.device) if grad else None  # Σ e^{z−μ} W_v  (P, H)
    step = _vocab_step(vocab, V)
    for v0 in range(0, V, step):
        v1 = min(v0 + step, V)
        w_c = weight[v0:v1]  # (V_c, H)
        z = h @ w_c.T  # (P, V_c)
        if bias is not None:
            z = z + bias[v0:v1]
        z = _wide(z)
        c_max, c_idx = z.max(-1)  # (P,)
        mu_new = torch.maximum(mu, c_max)
        d = mu - mu_new  # ≤ 0; −inf on the first chunk, where every accumulator is still 0
        scale = torch.exp(d)
        d = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
        take = c_max > mu  # strictly: the first maximiser wins
        best = torch.where(take, c_idx + v0, best)
        inside = (y >= v0) & (y < v1)
        local = (y - v0).clamp(0, v1 - v0 - 1).unsqueeze(-1)
        z_y = torch.where(inside, z.gather(-1, local).squeeze(-1), z_y)
        shifted = z.sub_(mu_new.unsqueeze(-1))  # z − μ in place: z is not read again
        e = torch.exp(shifted)  # (P, V_c)
        u = scale * (u + d * s) + _dot(e, shifted)
        s = scale * s + e.sum(-1)
        q = scale.square() * q + _dot(e, e)
        if tangent is not None:
            if apart_b:
                dz_b = _wide(db[v0:v1]).to(z.dtype).expand_as(z)  # (P, V_c), a view
                along_b = _accumulate(along_b, dz_b, e, scale, inside, local, take, c_idx)
            dz = None
            if apart_w:
                dz = _head_tangent(h, None, w_c, dw, None, v0, v1, z)  # δz_W (P, V_c)
                along_w = _accumulate(along_w, dz, e, scale, inside, local, take, c_idx)  # δz_W is read: the rest joins it in place
            rest = (dh, None if apart_w else dw, None if apart_b else db)
            if dz is None or any(r is not None for r in rest):
                more = _head_tangent(h, rest[0], w_c, rest[1], rest[2], v0, v1, z)  # (P, V_c)
                dz = more if dz is None else dz.add_(more)
            if apart_b:
                dz = dz.add_(dz_b)
            along = _accumulate(along, dz, e, scale, inside, local, take, c_idx)
        if grad:
            acc = scale.unsqueeze(-1) * acc + e @ w_c.to(wide)
        mu = mu_new
    log_s = torch.log(s)
    lse = mu + log_s
    out = HeadStats(lse=lse, logp=z_y - lse, argmax=best, logp_max=-log_s, entropy=log_s - u / s, sumsq=q / s.square())
    if tangent is not None:
        out.dlogp, out.dlogp_max = _directional(along, s)
        if parts and dw is not None:
            out.dlogp_w, out.dlogp_max_w = _directional(along_w, s) if apart_w else (out.dlogp, out.dlogp_max)
        if parts and db is not None:
            out.dlogp_b, out.dlogp_max_b = _directional(along_b, s) if apart_b else (out.dlogp, out.dlogp_max)
    if grad:
        mean_w = acc / s.unsqueeze(-1)  # πᵀ W  (P, H)
        wide_w = weight.to(wide)
        out.grad, out.grad_max = wide_w[y] - mean_w, wide_w[best] - mean_w
    return out


def _accumulate(along: tuple, dz: torch.Tensor, e: torch.Tensor, scale: torch.Tensor, inside: torch.Tensor, local: torch.Tensor,
                take: torch.Tensor, c_idx: torch.Tensor) -> tuple:  # fmt: skip
    """(Σ e^{z−μ} δz rescaled to the new μ, δz_y, δz_{y*}) after one vocabulary chunk's δz (P, V_c)."""
    w_sum, dz_y, dz_best = along
    return (scale * w_sum + _dot(e, dz), torch.where(inside, dz.gather(-1, local).squeeze(-1), dz_y),
            torch.where(take, dz.gather(-1, c_idx.unsqueeze(-1)).squeeze(-1), dz_best))  # fmt: skip


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[p, v] b[p, v] (P,). In float64 a batched product. In float32 one running sum over a whole vocabulary
    loses ~1e-4 (entropy off by ~1e-3 nats at V = 152k), so on a CPU the products run over blocks of ``_DOT_BLOCK``
    entries and the blocks' partial sums (P, V_c / block) are added in float64: as exact as ``sum``'s pairwise
    reduction of the elementwise product (~1e-7) and ~4× faster than it (bench/README.md, stop 28). The blocks are a
    view only when V_c is a multiple of the block (``_vocab_step`` makes every chunk but the last one so); else
    einsum copies a and b. Elsewhere (a GPU) the elementwise product and ``sum``, which TF32 matmuls cannot touch."""
    if a.dtype == torch.float64:
        return torch.einsum("pv,pv->p", a, b)
    if a.device.type != "cpu":
        return (a * b).sum(-1)
    whole = a.shape[-1] // _DOT_BLOCK * _DOT_BLOCK
    out = torch.einsum("pv,pv->p", a[:, whole:], b[:, whole:]).double()  # the last, partial block
    if whole:
        blocks = lambda x: x[:, :whole].unflatten(1, (-1, _DOT_BLOCK))  # noqa: E731  (P, V_c / block, block)
        out += torch.einsum("pnk,pnk->pn", blocks(a), blocks(b)).double().sum(-1)
    return out.to(a.dtype)


_DOT_BLOCK = 128  # entries per float32 partial sum (blocks of 512 and more ran 2–8× slower on this CPU: bench/head_pass.py)


def _vocab_step(vocab: int | None, V: int) -> int:
    """Entries per vocabulary chunk: ``vocab`` (None: all V), rounded down to a multiple of ``_DOT_BLOCK`` when
    larger, so that ``_dot``'s blocks of every chunk but the last are views (GPT-2's 50,257: 50,176 + 81)."""
    step = max(1, min(vocab or V, V))
    return step - step % _DOT_BLOCK if step > _DOT_BLOCK else step


def _directional(along: tuple, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(δ log π(y), δ log π(y*)) = δz_y − πᵀ δz, δz_{y*} − πᵀ δz, with πᵀ δz = Σ e^{z−μ} δz / s."""
    w_sum, dz_y, dz_best = along
    mean_dz = w_sum / s
    return dz_y - mean_dz, dz_best - mean_dz


def _head_tangent(h, dh, w_c, dw, db, v0: int, v1: int, like: torch.Tensor) -> torch.Tensor:
    """δz of one vocabulary chunk: δh W_cᵀ + h δW_cᵀ + δb_c, (P, V_c) in ``like``'s dtype (0 without a tangent)."""
    dz = None  # summed as the parts come: no zero (P, V_c) to add them to
    for part in (None if dh is None else dh @ w_c.T, None if dw is None else h @ dw[v0:v1].T):
        if part is not None:
            dz = _wide(part) if dz is None else dz.add_(_wide(part))
    if db is not None:
        dz = _wide(db[v0:v1]).to(like.dtype).expand_as(like) if dz is None else dz.add_(_wide(db[v0:v1]))
    return torch.zeros_like(like) if dz is None else dz.to(like.dtype)


def head_probs(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lse: torch.Tensor, *, positions: int | None = None) -> torch.Tensor:
    """π = exp(h Wᵀ + b − lse) (N, V), ``positions`` rows at a time, in the reductions' dtype (float32 at least)."""
    step = positions or max(1, h.shape[0])
    parts = []
    for i in range(0, h.shape[0], step):
        z = _wide(h[i : i + step] @ weight.T)
        if bias is not None:
            z = z + _wide(bias)
        parts.append(torch.exp(z - lse[i : i + step].unsqueeze(-1)))
    return torch.cat(parts) if parts else h.new_zeros(0, weight.shape[0])


def head_directional(h: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, best: torch.Tensor, *, dw: torch.Tensor | None = None,
                     db: torch.Tensor | None = None, positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(δ log π(y) (N,), δ log π(y*) (N,)) along a move of the head alone, δz = h δWᵀ + δb, with π (N, V) given
    (``head_probs``): δz_y − πᵀ δz, one product per direction instead of the head's statistics again."""
    step = positions or max(1, h.shape[0])
    out_y, out_best = [], []
    for i in range(0, h.shape[0], step):
        p = probs[i : i + step]
        dz = torch.zeros_like(p)
        if dw is not None:
            dz = dz + _wide(h[i : i + step] @ dw.T)
        if db is not None:
            dz = dz + _wide(db)
        mean = (p * dz).sum(-1)
        out_y.append(dz.gather(-1, targets[i : i + step, None]).squeeze(-1) - mean)
        out_best.append(dz.gather(-1, best[i : i + step, None]).squeeze(-1) - mean)
    empty = probs.new_zeros(0)
    return (torch.cat(out_y) if out_y else empty), (torch.cat(out_best) if out_best else empty)


def at_responses(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(N, …) the entries of x (B, T, …) at the response positions of ``mask`` (B, T), row-major."""
    return x[mask]


def to_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) with ``values`` (N,) at the response positions of ``mask`` and 0 elsewhere (inverse of ``at_responses``)."""
    out = values.new_zeros(mask.shape)
    out[mask] = values
    return out
