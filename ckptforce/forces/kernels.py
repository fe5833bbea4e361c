"""Pairwise kernels between probe rows and training examples (DESIGN §2, "Pairwise kernels"; DESIGN §1 for K).

In: a model function ``fn(params, batch) -> logits (B, T, V)`` (``BoundModel.logits``; (B, 1, V) for a
classifier), θ (a dict), a batch of probe rows and a batch of training rows (``TokenBatch`` or ``ClassBatch``),
optionally the ``nn.Module`` that ``fn`` evaluates (for ghost inner products). Out: tensors, no I/O.

    f_o        = log π(y_o|x_o) = Σ_m log π_m(y_o,m)             the probe row's score (``logp_rows``)
    L_u        = −Σ_l w_l log π_l(y_u,l)                          a training row's loss (``nll_rows``), or any
                                                                 per-row ``loss_rows(logits, batch) -> (U,)``
    K[o, u]    = ⟨∇θ f_o, ∇θ L_u⟩                                 (O, U)   ``gradient_kernel``
    cos[o, u]  = K[o, u] / (‖∇θ f_o‖ ‖∇θ L_u‖)                    (O, U)
    TracIn     = Σ_t η_t K_t[o, u]                                (O, U)   ``tracin_kernel``, one K per checkpoint

Sign: one SGD step θ' = θ − η ∇L_u moves the probe by Δf_o ≈ −η K[o, u], so K > 0 means training on u pushes
f_o *down*. TracIn / Captum's ``TracInCP`` use the loss on both sides: pass ``probe_score=nll_rows`` for
their sign convention (then K[o, u] = ⟨∇L_o, ∇L_u⟩).

How ⟨∇θ f_o, ∇θ L_u⟩ is computed, per parameter tensor (exact unless a ``Projection`` is asked for):
- ghost inner products (``ghost.py``) for ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Embedding``, tied uses
  (GPT-2's lm_head / wte) included, from one batched backward — no per-example gradient is formed (for long
  rows of small layers, where T² exceeds the layer's size over its width, ``products="auto"`` forms the
  per-row gradients from the same factors instead: fewer operations, the same numbers);
- per-row gradients by ``torch.func.vmap`` for every other tensor (LayerNorm, GPT-2's position embedding,
  which is called with a (1, T) index shared by all rows, custom modules).
``Projection`` replaces the exact products by seeded sketches of the per-row gradients (``approximate=True``).

Small-vocabulary classifiers also get the full V×V matrices: ``class_forces`` (A, K = J_o J_uᵀ, G) and
``sgd_prediction`` (−η Σ_u A_o K_ou G_u, DESIGN §1).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from .ghost import PRODUCTS, RowGrads, kernel_between, materialise, row_grads, sq_norms
from .observe import Fn, _wide, chunks

LossRows = Callable[[Tensor, object], Tensor]  # (logits (B, T, V), batch) -> (B,): one scalar per row


def logp_rows(logits: Tensor, batch) -> Tensor:
    """log π(y|x) per row (B,): Σ_t target_mask · log_softmax(logits)[t, target_t]. The default probe score."""
    logp = torch.log_softmax(_wide(logits), dim=-1)  # (B, T, V)
    tok = logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.target_mask.to(logp.dtype)  # (B, T)
    return tok.sum(-1)


def nll_rows(logits: Tensor, batch) -> Tensor:
    """−log π(y|x) per row (B,): cross-entropy summed over the response tokens. The default training loss.

    A batch carrying ``loss_weight`` ((B,) per row or (B, T) per token, as ``gradient_kernel(train_loss=w)``
    attaches it) gives −Σ_t w_t log π_t(y_t).
    """
    logp = torch.log_softmax(_wide(logits), dim=-1)  # (B, T, V)
    tok = -logp.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.target_mask.to(logp.dtype)  # (B, T)
    w = getattr(batch, "loss_weight", None)
    if w is None:
        return tok.sum(-1)
    w = w.to(tok.dtype)
    return (tok * w).sum(-1) if w.dim() == 2 else tok.sum(-1) * w


@dataclass(frozen=True)
class Projection:
    """A seeded random sketch of per-row gradients: kernels become approximate (and are labelled so).

    Every parameter tensor with more than ``dim`` entries is mapped to ``dim`` coordinates by its own matrix S
    (seeded by ``seed`` and the tensor's name, so probe and training rows see the same S) with E[SᵀS] = I, so
    ⟨Sg, Sg'⟩ is an unbiased estimate of ⟨g, g'⟩ with a standard deviation of about √(2/dim)·‖g‖‖g'‖ (less for
    nearly orthogonal g, g'). Smaller tensors are kept exactly. The per-row gradient of one tensor is formed
    (rows × its size) to be sketched.
    """

    dim: int  # sketch size per parameter tensor
    seed: int = 0
    kind: str = "sign"  # "sign": CountSketch (one ±1 per column, O(size) per row); "gaussian": N(0, 1/dim)

    def __post_init__(self):
        if self.dim < 1 or self.kind not in ("sign", "gaussian"):
            raise ValueError(f"Projection(dim={self.dim}, kind={self.kind!r}): need dim ≥ 1 and kind 'sign' or 'gaussian'")


def sketch(grads: RowGrads, projection: Projection) -> tuple[Tensor, dict[str, slice], bool]:
    """(S·g per row (B, D), name -> its columns, whether any tensor was actually projected)."""
    parts, where, approximate, at = [], {}, False, 0
    for name in sorted(grads.names):
        g = grads.dense[name] if name in grads.dense else materialise(grads, name)  # (B, P)
        size = g.shape[1]
        if size > projection.dim:
            gen = torch.Generator().manual_seed(projection.seed * 1_000_003 + zlib.crc32(name.encode()))
            g, approximate = _project(g, projection, gen), True
        parts.append(g)
        where[name] = slice(at, at + g.shape[1])
        at += g.shape[1]
    return torch.cat(parts, 1), where, approximate


def _project(g: Tensor, projection: Projection, gen: torch.Generator) -> Tensor:
    k, size = projection.dim, g.shape[1]
    if projection.kind == "sign":  # CountSketch: column i -> bucket h(i) with sign σ(i); E[SᵀS] = I
        bucket = torch.randint(0, k, (size,), generator=gen).to(g.device)
        sign = (torch.randint(0, 2, (size,), generator=gen) * 2 - 1).to(g)
        return torch.zeros(g.shape[0], k, dtype=g.dtype, device=g.device).index_add_(1, bucket, g * sign)
    out = torch.zeros(g.shape[0], k, dtype=g.dtype, device=g.device)
    block = max(1, 2**22 // k)  # rows of S drawn at a time: memory ≤ 4 M entries
    for start in range(0, size, block):
        s = torch.randn(min(block, size - start), k, generator=gen, dtype=torch.float64) / math.sqrt(k)
        out += g[:, start : start + block] @ s.to(g)
    return out


@dataclass
class Kernel:
    """Probe × training-example kernel at one θ."""

    k: Tensor  # (O, U)  ⟨∇θ f_o, ∇θ L_u⟩
    probe_norm: Tensor  # (O,)  ‖∇θ f_o‖
    train_norm: Tensor  # (U,)  ‖∇θ L_u‖
    by_param: dict[str, Tensor] | None  # name -> (O, U); sums to k
    approximate: bool  # True when a Projection sketched at least one tensor
    method: str  # e.g. "exact: ghost 26 tensors, per-row 2 tensors" or "projection sign dim=512 seed=0"
    ghost: list[str]  # tensors captured as ghost factors (their products ghost or formed: see ``products``)
    per_row: list[str]  # tensors done by per-row gradients (vmap); a tensor can be in both lists when a
    # layer shared by all rows (GPT-2's wpe) met a batch of one row, where the ghost rule holds

    @property
    def cosine(self) -> Tensor:
        """(O, U) K / (‖∇f_o‖ ‖∇L_u‖); 0 where a gradient is zero."""
        den = self.probe_norm[:, None] * self.train_norm[None, :]
        return torch.where(den > 0, self.k / torch.where(den > 0, den, 1), torch.zeros_like(self.k))


def gradient_kernel(
    fn: Fn, params: dict, probes, train, *, module: nn.Module | None = None, probe_score: LossRows | None = None,
    train_loss: LossRows | Tensor | None = None, names: Sequence[str] | None = None, ghost: bool = True,
    projection: Projection | None = None, by_param: bool = False, chunk_size: int | None = 64, products: str = "auto",
) -> Kernel:
    """K[o, u] = ⟨∇θ f_o, ∇θ L_u⟩ for every probe row o and training row u, with the norms (and cosine).

    ``probe_score``: per-row f (default ``logp_rows``). ``train_loss``: per-row L — a callable
    ``loss_rows(logits, batch) -> (U,)``, or loss weights (U,) / (U, T) for −Σ_t w_t log π_t (default:
    ``nll_rows``, weight 1). Rows must be independent (no batch statistics, dropout off). ``names``: the
    tensors to differentiate (default: every floating tensor of ``params``). ``module`` (the ``nn.Module``
    that ``fn`` runs through ``functional_call``) enables ghost inner products; without it, or with
    ``ghost=False``, every tensor uses per-row gradients (same numbers, more memory). ``chunk_size`` rows are
    processed at a time on each side. ``products``: "ghost" / "formed" / "auto" (default: the cheaper per
    tensor, see ``ghost.kernel_between``); the numbers are the same.
    """
    if products not in PRODUCTS:
        raise ValueError(f"products={products!r}: give one of {', '.join(PRODUCTS)}")
    if not len(probes) or not len(train):
        raise ValueError(f"gradient_kernel needs probe and training rows, got {len(probes)} and {len(train)}")
    opts = {"module": module, "names": names, "ghost": ghost}
    probe_score = probe_score or logp_rows
    p_parts = [row_grads(fn, params, sub, probe_score, **opts) for sub in chunks(probes, chunk_size)]
    p_sketches = [sketch(g, projection) for g in p_parts] if projection else []
    approximate = any(s[2] for s in p_sketches)
    blocks, totals, t_norm2 = [], [], []
    ghost_names, per_row = {n for g in p_parts for n in g.factors}, {n for g in p_parts for n in g.dense}  # names, not the chunks' factors
    for sub in _train_chunks(train, train_loss, chunk_size):
        g = row_grads(fn, params, sub, _train_loss_fn(train_loss), **opts)
        ghost_names |= set(g.factors)
        per_row |= set(g.dense)
        if projection:
            x, where, approx = sketch(g, projection)
            approximate |= approx
            per = [{n: p[:, at[n]] @ x[:, sl].T for n, sl in where.items()} for p, at, _ in p_sketches]
            t_norm2.append(x.pow(2).sum(1))
        else:
            per = [kernel_between(p, g, products) for p in p_parts]  # per probe chunk: name -> (o, u)
            t_norm2.append(_summed(sq_norms(g, products).values()))
        if by_param:
            blocks.append({n: _cat([b[n] for b in per]) for n in per[0]})
        totals.append(_cat([_summed(b.values(), fresh=not by_param) for b in per]))
        del g, per  # one training chunk's factors at a time
    if projection:
        p_norm2 = _cat([p.pow(2).sum(1) for p, _, _ in p_sketches])
    else:
        p_norm2 = _cat([_summed(sq_norms(g, products).values()) for g in p_parts])
    ghost_names, per_row = sorted(ghost_names), sorted(per_row)
    method = (f"projection {projection.kind} dim={projection.dim} seed={projection.seed}" if projection
              else f"exact: ghost {len(ghost_names)} tensors, per-row {len(per_row)} tensors")  # fmt: skip
    by = {n: _cat([b[n] for b in blocks], 1) for n in blocks[0]} if by_param else None  # name -> (O, U)
    return Kernel(_cat(totals, 1), p_norm2.clamp_min(0).sqrt(), _cat(t_norm2).clamp_min(0).sqrt(), by, approximate,
                  method, ghost_names, per_row)  # fmt: skip


def _cat(parts: list[Tensor], dim: int = 0) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _summed(tensors, fresh: bool = False) -> Tensor:
    """Σ of tensors; ``fresh``: they are ours to overwrite (summed in place into the first)."""
    it = iter(tensors)
    total = next(it)
    total = total if fresh else total.clone()
    for t in it:
        total += t
    return total


def _train_loss_fn(train_loss) -> LossRows:
    return train_loss if callable(train_loss) else nll_rows


def _train_chunks(train, train_loss, chunk_size):
    """Chunks of the training rows; loss weights (U,) / (U, T) ride along as ``loss_weight``."""
    if not isinstance(train_loss, Tensor):
        yield from chunks(train, chunk_size)
        return
    n = len(train)
    if train_loss.shape[0] != n or train_loss.dim() not in (1, 2):
        raise ValueError(f"train_loss weights have shape {tuple(train_loss.shape)}; give (U,) or (U, T) with U = {n} training rows")
    step = chunk_size or n
    for start in range(0, n, step):
        sub = train.select(slice(start, min(start + step, n)))
        w = train_loss[start : start + len(sub)]
        if w.dim() == 2:
            w = w[:, : sub.targets.shape[1]]
        yield SimpleNamespace(**{k: v for k, v in vars(sub).items()}, loss_weight=w)


@dataclass
class TracIn:
    """Σ_t η_t K_t over checkpoints (TracIn-CP), and its pieces."""

    k: Tensor  # (O, U)  Σ_t η_t K_t[o, u]
    cosine: Tensor  # (O, U)  Σ_t η_t cos_t[o, u]  (the cosine variant of TracIn)
    per_checkpoint: Tensor  # (C, O, U)  K_t, without η_t
    etas: list[float]
    approximate: bool
    method: str


def tracin_kernel(fn: Fn, checkpoints: Sequence[tuple[dict, float]], probes, train, **kwargs) -> TracIn:
    """Σ_t η_t ⟨∇θ f_o(θ_t), ∇θ L_u(θ_t)⟩ over ``checkpoints`` = [(θ_t, η_t), ...]; ``kwargs`` as for
    ``gradient_kernel`` (the same projection seed at every checkpoint)."""
    if not checkpoints:
        raise ValueError("tracin_kernel needs at least one (params, eta) checkpoint")
    ks, total, cos = [], 0, 0
    for params, eta in checkpoints:
        res = gradient_kernel(fn, params, probes, train, **{**kwargs, "by_param": False})
        ks.append(res.k)
        total, cos = total + eta * res.k, cos + eta * res.cosine
    return TracIn(total, cos, torch.stack(ks), [float(e) for _, e in checkpoints], res.approximate, res.method)


# ------------------------------------------------------------------------------------------------------------
# small-vocabulary classifiers: the full V×V matrices of DESIGN §1


@dataclass
class ClassForces:
    a_term: Tensor  # (O, V, V)     A(x_o) = I − 1 π_oᵀ
    k_term: Tensor  # (O, U, V, V)  K(x_o, x_u) = J_o J_uᵀ, J = ∂z/∂θ
    g_term: Tensor  # (U, V)        G(x_u, y_u) = π_u − e_{y_u}
    probs_probe: Tensor  # (O, V)
    probs_train: Tensor  # (U, V)


def class_forces(fn: Fn, params: dict, probes, train, *, names: Sequence[str] | None = None) -> ClassForces:
    """A, K, G of every probe × training example for a classifier (logits (B, 1, V)).

    J is the explicit Jacobian of the V logits of one row with respect to the tensors ``names`` (default: all
    floating tensors), by ``vmap(jacrev)`` over rows; memory is rows × V × |θ|: small models only.
    """
    names = list(names or [n for n, p in params.items() if p.is_floating_point()])
    j_o, z_o = _logit_jacobians(fn, params, probes, names)
    j_u, z_u = _logit_jacobians(fn, params, train, names)
    k_term = sum(torch.einsum("ovp,uwp->ouvw", j_o[n], j_u[n]) for n in names)  # (O, U, V, V)
    p_o, p_u = torch.softmax(z_o, -1), torch.softmax(z_u, -1)  # (O, V), (U, V)
    vocab = z_o.shape[-1]
    eye = torch.eye(vocab, dtype=p_o.dtype, device=p_o.device)
    a_term = eye - torch.ones(vocab, 1, dtype=p_o.dtype, device=p_o.device) @ p_o[:, None, :]  # (O, V, V)
    g_term = p_u - torch.nn.functional.one_hot(train.targets[:, 0], vocab).to(p_u)  # (U, V)
    return ClassForces(a_term, k_term, g_term, p_o, p_u)


def sgd_prediction(forces: ClassForces, eta: float) -> Tensor:
    """(O, V) Δ log π(·|x_o) ≈ −η Σ_u A_o K_ou G_u: the first-order change of every class's log-probability
    after one SGD step θ' = θ − η Σ_u ∇θ CE(x_u, y_u) (a summed loss; for a mean loss pass η / U)."""
    return -eta * torch.einsum("ovw,ouwx,ux->ov", forces.a_term, forces.k_term, forces.g_term)


def _logit_jacobians(fn: Fn, params: dict, batch, names: list[str]) -> tuple[dict[str, Tensor], Tensor]:
    """({name: ∂z/∂θ_name (B, V, size)}, logits (B, V)) for a classifier batch, one row at a time under vmap."""
    from torch.func import jacrev, vmap

    moving = {n: params[n] for n in names}
    fixed = {n: p for n, p in params.items() if n not in moving}
    fields = {k: v for k, v in vars(batch).items() if isinstance(v, Tensor)}

    def one_row(p, row):
        single = SimpleNamespace(**{k: v.unsqueeze(0) for k, v in row.items()})
        z = fn({**fixed, **p}, single)[0, 0]  # (V,)
        return z, z

    with torch.enable_grad():
        jac, z = vmap(jacrev(one_row, has_aux=True), in_dims=(None, 0))(moving, fields)
    return {n: j.flatten(2) for n, j in jac.items()}, z.detach()
