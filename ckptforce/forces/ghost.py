"""Per-row gradients of one batch without forming them: ghost factors, and inner products between two batches.

In: ``fn(params, batch) -> logits``, θ, a batch, a per-row scalar ``score(logits, batch) -> (B,)`` and the
``nn.Module`` that ``fn`` evaluates. Out: ``RowGrads`` — for every tensor either its ghost factors or its
per-row gradients (B, size) — and ``kernel_between`` / ``sq_norms`` over them.

Ghost rule (a layer's per-row gradient is a sum of outer products over the positions t of the row):

    nn.Linear  W (out, in):  G_b = Σ_t δ_bt a_btᵀ      δ = ∂score_b/∂(layer output), a = layer input
    Conv1D     W (in, out):  G_b = Σ_t a_bt δ_btᵀ      (GPT-2, y = x W + b)
    Embedding  W (V, d):     G_b = Σ_t e_{id_bt} δ_btᵀ  (rows at padding_idx get no gradient)
    bias       (out,):       G_b = Σ_t δ_bt

With every use of a tensor written G_b = Σ_t u_bt v_btᵀ in the tensor's own layout (u along its rows, v
along its columns), the inner product of rows i and j sums over every pair of uses (a tied tensor, such as
GPT-2's wte / lm_head, or a layer called twice, has several, and their cross terms count):

    ⟨G_i, G_j⟩ = Σ_{use p, use q} Σ_{t,s} (u^p_it · u^q_js)(v^p_it · v^q_js)
               = Σ_{p,q} sum((U^p_i U^qᵀ_j) ⊙ (V^p_i V^qᵀ_j))         (Tx × Ty matrices; one-hot u as ids)

δ per row comes from ONE backward of Σ_b score_b: rows are independent, so δ of row b only carries row b's
score. Everything else (LayerNorm, a layer applied to inputs shared by all rows such as GPT-2's (1, T)
position ids, tensors of other modules) gets per-row gradients from ``torch.func.vmap`` of ``grad`` over
rows (a batch of one each), or a batched backward where vmap refuses the model. The total is exact as long
as ghost tensors are used only through their layer's forward: a tensor also held by a module of another
type is left to the per-row path; a tensor read directly by other code (``F.linear(x, layer.weight)``
outside the layer) is not detected — pass ``ghost=False`` for such models.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import Tensor, nn

from .linear import _batched_grads
from .observe import _wide

Use = tuple[Tensor, Tensor | None]  # (u (B, T, R) or ids (B, T) long, v (B, T, C) or None for a bias)
GRAM_BUDGET = 2**24  # entries of one (X, Y, Tx, Ty) gram block


@dataclass
class RowGrads:
    """Per-row gradients of one batch's scores, each tensor as ghost factors or dense (B, size)."""

    n: int  # rows
    dtype: torch.dtype  # of the products (float32 at least)
    device: torch.device
    factors: dict[str, list[Use]] = field(default_factory=dict)  # name -> every use in the forward
    dense: dict[str, Tensor] = field(default_factory=dict)  # name -> (B, size)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.factors) + list(self.dense)


def _conv1d_type():
    mod = sys.modules.get("transformers.pytorch_utils")  # GPT-2's Conv1D; loaded whenever an HF model is
    return getattr(mod, "Conv1D", None)


def ghost_sites(module: nn.Module, names: list[str]) -> dict[nn.Module, dict[str, str]]:
    """{layer: {"weight": name, "bias": name}} for the Linear / Conv1D / Embedding layers (exact types: a
    subclass may compute something else) whose tensors are in ``names`` and held by no other kind of module."""
    kinds = {nn.Linear, nn.Embedding} | ({_conv1d_type()} - {None})
    wanted = set(names)
    canon, blocked, holders = {}, set(), []
    for prefix, m in module.named_modules(remove_duplicate=False):
        for attr, p in m._parameters.items():
            if p is None:
                continue
            full = f"{prefix}.{attr}" if prefix else attr
            if full in wanted:
                canon[id(p)] = full
            ok = type(m) in kinds and attr in ("weight", "bias")
            if type(m) is nn.Embedding and (m.max_norm is not None or m.scale_grad_by_freq):
                ok = False  # renormalised rows / rescaled gradients: not the plain rule
            if ok:
                holders.append((m, attr, p))
            else:
                blocked.add(id(p))
    sites: dict[nn.Module, dict[str, str]] = {}
    for m, attr, p in holders:
        if id(p) in canon and id(p) not in blocked:
            sites.setdefault(m, {})[attr] = canon[id(p)]
    return sites


def row_grads(fn, params: dict, batch, score, *, module: nn.Module | None = None, names=None, ghost: bool = True) -> RowGrads:
    """Per-row gradients of ``score(fn(θ, batch), batch)`` (B,) w.r.t. the tensors ``names``: ghost factors
    for the layers of ``module`` that the rule covers, vmap'd per-row gradients for the rest."""
    return row_grads_each(fn, params, batch, [score], module=module, names=names, ghost=ghost)[0]


def row_grads_each(fn, params: dict, batch, scores, *, module: nn.Module | None = None, names=None, ghost: bool = True) -> list[RowGrads]:
    """``row_grads`` for each of several scores of the same batch (e.g. log π(y) and log π(y*)): the ghost
    factors of all of them from one forward and one backward per score, equal to separate calls."""
    names = list(names or [n for n, p in params.items() if p.is_floating_point()])
    sites = ghost_sites(module, names) if module is not None and ghost else {}
    first = params[names[0]]
    outs = [RowGrads(0, _wide(first[:0]).dtype, first.device, shapes={n: tuple(params[n].shape) for n in names}) for _ in scores]
    if sites:
        for out, (n, factors, dense) in zip(outs, _ghost_pass(fn, params, batch, scores, names, sites, norm_sites(module, names))):
            out.n, out.factors, out.dense = n, factors, dense
    for out, score in zip(outs, scores):
        rest = [n for n in names if n not in out.factors and n not in out.dense]
        if rest:
            out.dense.update(_per_row_grads(fn, params, batch, score, rest))
            out.n = next(iter(out.dense.values())).shape[0]
    return outs


def norm_sites(module: nn.Module, names: list[str]) -> dict[nn.Module, dict[str, str]]:
    """{norm: {"weight": name, "bias": name}} for the normalisation layers whose per-row gradients have a closed
    form, out = γ ⊙ x̂ + β: ``nn.LayerNorm`` (exact type, affine) and the RMSNorms of Llama / Qwen2 / Mistral
    (γ ⊙ x / rms(x), a ``variance_epsilon``). Each recorded call is checked against that form (``_normalized``)."""
    wanted = set(names)
    out: dict[nn.Module, dict[str, str]] = {}
    canon = {id(p): n for n, p in module.named_parameters()}
    holders: dict[int, int] = {}
    for m in module.modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                holders[id(p)] = holders.get(id(p), 0) + 1
    for m in module.modules():
        own = {a: canon[id(p)] for a, p in m._parameters.items() if p is not None}
        layer = type(m) is nn.LayerNorm and m.elementwise_affine and len(m.normalized_shape) == 1
        rms = type(m).__name__ in RMS_NORMS and hasattr(m, "variance_epsilon") and set(own) == {"weight"}
        alone = all(holders[id(p)] == 1 for p in m._parameters.values() if p is not None)  # γ, β held by no other module
        if (layer or rms) and alone and wanted & set(own.values()):
            out[m] = own  # every tensor of the layer (the form needs γ and β), the gradients only of those wanted
    return out


#: RMSNorm classes whose forward is γ ⊙ (x / √(mean x² + ε)), computed in float32 and cast back.
RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm", "Qwen3RMSNorm")


def _normalized(m: nn.Module, x: Tensor) -> Tensor:
    """x̂, what γ multiplies: (x − mean) / √(var + ε) for a LayerNorm, x / √(mean x² + ε) for an RMSNorm."""
    if type(m) is nn.LayerNorm:
        return nn.functional.layer_norm(x, m.normalized_shape, None, None, m.eps)
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)).to(x.dtype)


def _norm_rows(m: nn.Module, site: dict[str, str], params: dict, x: Tensor, out: Tensor, d: Tensor, rows: int) -> dict[str, Tensor] | None:
    """{name: (B, size)}: ∇γ = Σ_t δ_t ⊙ x̂_t, ∇β = Σ_t δ_t per row; None when the call is not γ ⊙ x̂ + β."""
    if any(n not in params for n in site.values()):
        return None
    with torch.no_grad():
        xhat = _normalized(m, x.detach())
        bias = params[site["bias"]] if "bias" in site else None
        want = xhat * params[site["weight"]] + (bias if bias is not None else 0)
        tol = 8e-3 if out.dtype in (torch.float16, torch.bfloat16) else 1e-5  # a bfloat16 step is 3.9e-3
        if want.shape != out.shape or not torch.allclose(want.to(out.dtype), out.detach(), rtol=tol, atol=tol * float(out.detach().abs().max())):
            return None
        d = _wide(d.detach()).reshape(rows, -1, d.shape[-1])
        grads = {}
        if "weight" in site:
            grads[site["weight"]] = (d * _wide(xhat).reshape(rows, -1, d.shape[-1])).sum(1)
        if "bias" in site:
            grads[site["bias"]] = d.sum(1)
        return grads


def _ghost_pass(fn, params, batch, scores, names, sites, norms=None) -> list[tuple[int, dict[str, list[Use]], dict[str, Tensor]]]:
    """For each score of ``scores``: (rows, ghost factors of ``sites``, per-row gradients (B, size) of ``norms``
    in closed form), from one forward and one backward of Σ_b score_b per score. An embedding called with ids
    shared by the rows (GPT-2's (1, T) position ids) is given a copy of its output per row, so that its δ, and
    its ghost factors, stay per row."""
    calls = []
    n_rows = batch.targets.shape[0]

    def record(m, inputs, output):
        x = inputs[0]
        if type(m) is nn.Embedding and x.dim() == 2 and x.shape[0] == 1 and output.dim() == 3 and n_rows > 1 and output.requires_grad:
            output, x = output.expand(n_rows, *output.shape[1:]).clone(), x.expand(n_rows, *x.shape[1:])
            calls.append((m, x, output, output._version))
            return output
        calls.append((m, x, output, output._version))
        return None

    norms = norms or {}
    handles = [m.register_forward_hook(record) for m in list(sites) + list(norms)]
    try:
        with torch.enable_grad():
            leaves = {n: params[n].detach().requires_grad_(True) for n in names}
            logits = fn({**params, **leaves}, batch)
    finally:
        for h in handles:
            h.remove()
    live = [c for c in calls if c[2].requires_grad]
    failed: set[str] = set()
    if not any(c[0] in sites for c in live):
        raise ValueError("ghost kernels: none of the module's Linear / Conv1D / Embedding layers ran on the parameters "
                         "given (does fn evaluate this module through functional_call?); pass ghost=False")  # fmt: skip
    for m, _, out, version in live:
        if out._version != version and m in norms:  # changed in place after the layer: the per-row path
            failed.update(norms[m].values())
        elif out._version != version:
            raise ValueError(f"ghost kernels: the output of {type(m).__name__} is modified in place after the layer; pass ghost=False")
    results = []
    for i, score in enumerate(scores):  # each score's branch built, and freed, in turn: one (B, T, V) at a time
        with torch.enable_grad():
            value = score(logits, batch)  # (B,)
        if i + 1 == len(scores):
            del logits  # what the last backward needs is in its graph
        deltas = torch.autograd.grad(value.sum(), [c[2] for c in live], allow_unused=True, retain_graph=i + 1 < len(scores))
        results.append(_factors(live, deltas, value.shape[0], params, leaves, sites, norms, set(failed)))
        del value, deltas
    return results


def _factors(live, deltas, rows, params, leaves, sites, norms, failed) -> tuple[int, dict[str, list[Use]], dict[str, Tensor]]:
    """(rows, ghost factors, closed-form per-row gradients) from the recorded calls and their output gradients."""
    factors: dict[str, list[Use]] = {n: [] for site in sites.values() for n in site.values()}
    dense: dict[str, Tensor] = {}
    conv1d = _conv1d_type()
    for (m, x, out, _), d in zip(live, deltas):
        if m in norms:
            site = norms[m]
            if d is None:  # this call does not reach the scores
                got = {n: torch.zeros(rows, params[n].numel(), dtype=_wide(out).dtype, device=out.device) for n in site.values()}
            else:
                got = _norm_rows(m, site, params, x, out, d, rows) if out.shape[0] == rows else None
            if got is None:
                failed.update(site.values())
            for n, g in (got or {}).items():
                if n in leaves:
                    dense[n] = dense[n] + g if n in dense else g
            continue
        site = sites[m]
        if d is None:  # this call does not reach the scores
            continue
        if out.shape[0] != rows or x.shape[0] != rows or out.dim() < 2:  # shared by all rows (GPT-2's wpe)
            failed.update(site.values())
            continue
        d = _wide(d.detach()).reshape(rows, -1, d.shape[-1])  # (B, T, out)
        if type(m) is nn.Embedding:
            ids = x.reshape(rows, -1)  # (B, T)
            if m.padding_idx is not None:
                d = d * (ids != m.padding_idx).unsqueeze(-1).to(d)
            d, ids = _compact(d, ids)
            factors[site["weight"]].append((ids, d))
            continue
        d, a = _compact(d, _wide(x.detach()).reshape(rows, -1, x.shape[-1]))  # (B, T', out), (B, T', in)
        if "weight" in site:
            factors[site["weight"]].append((a, d) if type(m) is conv1d else (d, a))
        if "bias" in site:
            factors[site["bias"]].append((d, None))
    return rows, {n: uses for n, uses in factors.items() if n not in failed}, {n: g for n, g in dense.items() if n not in failed}


def _compact(d: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(δ, x) with each row's positions of zero δ dropped: (B, T', ·), T' = the most positions of non-zero δ in
    a row (a shorter row keeps some of its zero positions). A position whose δ is zero adds nothing to any product
    of the factors, and many are: the LM head's δ is zero outside the response, every layer's at padding and at a
    row's last position. Returned as given when no position can go."""
    keep = d.ne(0).any(-1)  # (B, T)
    width = int(keep.sum(1).max()) if keep.numel() else 0
    if width == d.shape[1]:
        return d, x
    order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]  # non-zero positions first
    pick = lambda t: torch.gather(t, 1, order if t.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, t.shape[-1]))  # noqa: E731
    return pick(d), pick(x)


def _per_row_grads(fn, params, batch, score, names) -> dict[str, Tensor]:
    """{name: (B, size)} by vmap over rows (each a batch of one) of grad; a batched backward if vmap refuses."""
    from torch.func import grad, vmap

    moving = {n: params[n] for n in names}
    fixed = {n: p for n, p in params.items() if n not in moving}
    fields = {k: v for k, v in vars(batch).items() if isinstance(v, Tensor)}

    def one_row(p, row):
        single = SimpleNamespace(**{k: v.unsqueeze(0) for k, v in row.items()})  # a batch of one
        return score(fn({**fixed, **p}, single), single)[0]

    try:
        with torch.enable_grad():
            grads = vmap(grad(one_row), in_dims=(None, 0))(moving, fields)
    except Exception:  # noqa: BLE001 - vmap refuses many constructs; the batched backward handles all
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_(True) for n, p in moving.items()}
            scores = score(fn({**fixed, **leaves}, batch), batch)
            grads = dict(zip(names, _batched_grads(scores, list(leaves.values()))))
    return {n: _wide(g.detach()).flatten(1) for n, g in grads.items()}


# ------------------------------------------------------------------------------------------------------------
# inner products


def _gram(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """(X, Y, Tx, Ty) with [i, j, t, s] = x_it · y_js; an integer tensor stands for one-hot rows (ids)."""
    if not x.is_floating_point() and not y.is_floating_point():
        return (x[:, None, :, None] == y[None, :, None, :]).to(dtype)
    if not x.is_floating_point():  # e_{x_it} · y_js = y_js[x_it]
        return y[:, :, x].permute(2, 0, 3, 1)  # (Y, Ty, X, Tx) -> (X, Y, Tx, Ty)
    if not y.is_floating_point():
        return _gram(y, x, dtype).permute(1, 0, 3, 2)
    if x.shape[1] == 1 and y.shape[1] == 1:  # one position per row (a classifier): a plain matrix product
        return (x[:, 0] @ y[:, 0].T)[:, :, None, None]
    return torch.einsum("xtr,ysr->xyts", x, y)


def _gram_diag(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, Tx, Ty) with [b, t, s] = x_bt · y_bs (both from the same rows)."""
    if not x.is_floating_point() and not y.is_floating_point():
        return (x[:, :, None] == y[:, None, :]).to(dtype)
    if not x.is_floating_point():
        return torch.gather(y, 2, x[:, None, :].expand(-1, y.shape[1], -1)).transpose(1, 2)  # y_bs[x_bt]
    if not y.is_floating_point():
        return _gram_diag(y, x, dtype).transpose(1, 2)
    if x.shape[1] == 1 and y.shape[1] == 1:
        return (x * y).sum(-1, keepdim=True)  # (B, 1, 1)
    return torch.einsum("btr,bsr->bts", x, y)


def _use_products(p: Use, q: Use, dtype: torch.dtype, memo: dict) -> Tensor:
    """(X, Y): Σ_{t,s} (u^p_t · u^q_s)(v^p_t · v^q_s) for every row pair, in blocks of Y rows.

    ``memo`` keeps the last few grams that fit in one block: a layer's bias shares δ with its weight."""
    (up, vp), (uq, vq) = p, q
    step = max(1, GRAM_BUDGET // max(1, up.shape[0] * up.shape[1] * uq.shape[1]))
    if step < uq.shape[0]:
        out = []
        for j in range(0, uq.shape[0], step):
            g = _gram(up, uq[j : j + step], dtype)
            if vp is not None:
                g = g * _gram(vp, vq[j : j + step], dtype)
            out.append(g.sum((-2, -1)))
        return torch.cat(out, 1)

    def gram(a, b):
        key = (id(a), id(b))
        if key not in memo:
            while len(memo) >= 4:
                memo.pop(next(iter(memo)))
            memo[key] = _gram(a, b, dtype)
        return memo[key]

    g = gram(up, uq)
    g = g if vp is None else g * gram(vp, vq)
    return g[:, :, 0, 0] if g.shape[2:] == (1, 1) else g.sum((-2, -1))


def materialise(grads: RowGrads, name: str) -> Tensor:
    """(B, size): the per-row gradient of ``name``, formed from its ghost factors (in the tensor's layout)."""
    shape = grads.shapes[name]
    total = None
    for u, v in grads.factors[name]:
        if v is None:
            g = u.sum(1)  # (B, out)
        elif not u.is_floating_point():  # embedding: scatter δ_t into row id_t
            g = torch.zeros(u.shape[0], shape[0], v.shape[-1], dtype=v.dtype, device=v.device)
            g.scatter_add_(1, u.unsqueeze(-1).expand(-1, -1, v.shape[-1]), v)
        else:
            g = torch.einsum("btr,btc->brc", u, v)  # (B, R, C)
        total = g.flatten(1) if total is None else total + g.flatten(1)
    if total is None:  # the tensor never reached the scores
        return torch.zeros(grads.n, math.prod(shape), dtype=grads.dtype, device=grads.device)
    return total


PRODUCTS = ("auto", "ghost", "formed")


def _width(t: Tensor | None) -> int:
    """Cost of one dot product of a factor: its width (ids: a comparison)."""
    return 0 if t is None else (t.shape[-1] if t.is_floating_point() else 1)


#: Per-row gradients are never formed for both sides of a tensor beyond this many numbers (2^28: 1 GiB in float32):
#: GPT-2 small's tied embedding would take 154 MB per row (its vocabulary × width), 7.4 GB for 48 rows.
MAX_FORMED = 2**28


def _ghost_is_cheaper(xs: list[Use], ys: list[Use], size: int, rows_x: int, rows_y: int) -> bool:
    """Multiply-adds of the ghost products, Σ_pq X·Y·Tx·Ty·(R + C), against forming both sides' per-row
    gradients (Σ_p X·Tx·size + Σ_q Y·Ty·size) and one (X, size) × (size, Y) product. Ghost wins for short
    rows and wide layers (an MLP: T = 1); forming wins for long rows of small layers (T² ≳ size / width)."""
    ghost = sum(rows_x * rows_y * u.shape[1] * w.shape[1] * (_width(u) + _width(w) + _width(v) + _width(z))
                for u, v in xs for w, z in ys)  # fmt: skip
    formed = (sum(rows_x * u.shape[1] for u, _ in xs) + sum(rows_y * w.shape[1] for w, _ in ys) + rows_x * rows_y) * size
    return ghost <= formed or (rows_x + rows_y) * size > MAX_FORMED  # forming them would not fit: ghost, whatever the time


def kernel_between(x: RowGrads, y: RowGrads, products: str = "auto") -> dict[str, Tensor]:
    """{name: (X, Y)} ⟨g_i, g_j⟩ per tensor between the rows of two batches.

    ``products``: for tensors with ghost factors on both sides, "ghost" always uses the ghost products,
    "formed" forms the per-row gradients from the factors and multiplies, "auto" picks the cheaper per tensor
    (same numbers). Tensors dense on either side are formed on the other side as needed.
    """
    out, memo = {}, {}
    for name in dict.fromkeys(x.names + y.names):
        xs, ys = x.factors.get(name), y.factors.get(name)
        size = math.prod(x.shapes[name])
        if xs is not None and ys is not None and (products == "ghost" or products == "auto" and _ghost_is_cheaper(xs, ys, size, x.n, y.n)):
            uses = [_use_products(p, q, x.dtype, memo) for p in xs for q in ys]
            out[name] = sum(uses) if uses else torch.zeros(x.n, y.n, dtype=x.dtype, device=x.device)
        else:
            gx = x.dense[name] if name in x.dense else materialise(x, name)
            gy = y.dense[name] if name in y.dense else materialise(y, name)
            out[name] = gx @ gy.T
    return out


def sq_norms(x: RowGrads, products: str = "auto") -> dict[str, Tensor]:
    """{name: (B,)} ‖g_b‖² per tensor (``products`` as for ``kernel_between``, on the diagonal)."""
    out = {name: g.pow(2).sum(1) for name, g in x.dense.items()}
    for name, uses in x.factors.items():
        size = math.prod(x.shapes[name])
        ghost = sum(u.shape[1] * w.shape[1] * (_width(u) + _width(w) + _width(v) + _width(z)) for u, v in uses for w, z in uses)
        if products == "formed" or products == "auto" and ghost > (sum(u.shape[1] for u, _ in uses) + 1) * size:
            out[name] = materialise(x, name).pow(2).sum(1)
            continue
        total = torch.zeros(x.n, dtype=x.dtype, device=x.device)
        for up, vp in uses:
            for uq, vq in uses:
                g = _gram_diag(up, uq, x.dtype)
                if vp is not None:
                    g = g * _gram_diag(vp, vq, x.dtype)
                total += g.sum((-2, -1))
        out[name] = total
    return out
