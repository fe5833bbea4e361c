"""The split of A·J·v by parameter tensor from backprop factors: one forward and one backward per score, no
per-row parameter gradients.

In: the model function ``fn(params, batch)``, the ``module`` it evaluates (through ``functional_call``), θ, a
batch of rows and a direction v. Out: C (B, K) and C* (B, K) with

    C[b, k] = ⟨∇_{θ_k} log π(y_b|x_b), v_k⟩            (and C* the same for y*, the argmax at θ)

For a module m whose own parameters include θ_k, with input x_b and output o_b = m(x_b; θ_m) (rows never
interact, so one backward of Σ_b s_b gives every row's output gradient δ_b = ∂s_b/∂o_b):

    C[b, k] = Σ_{t,d} δ_{b,t,d} · τ_{b,t,d},     τ_b = ∂m(x_b; θ_m + ε v_k)/∂ε |₀     (the module's own tangent)

τ in closed form for the layers that hold almost every parameter — Linear (x v_Wᵀ + v_b), GPT-2's Conv1D
(x v_W + v_b), Embedding (v_E[ids]) — and by a JVP of the module alone for the rest (LayerNorm, RMSNorm, …).
A weight tied between two modules (GPT-2's wte and lm_head) sums both. Memory is that of one forward and
backward of the chunk (the activations autograd keeps anyway, and δ at each module's output); time about one
forward, two backwards without weight gradients and one forward-sized contraction, instead of a row-by-row
Jacobian (``linear.contributions_by_tensor``, the slow twin kept as the fallback and the tests' oracle).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, jvp

from ..numerics import keep_float64, release_memory
from .head import SplitLM, at_responses, head_directional, head_probs
from .linear import LinearChange, _cat_changes, _row_scores, change_from_stats, jvp_logits
from .observe import Fn, Observed, chunks, observed_from_stats


#: A SplitLM's π at the probe rows' response positions is kept (for the contraction of many directions, e.g.
#: training examples) when it is at most this many of the head's chunks (positions × vocabulary) of memory.
KEEP_PROBS_CHUNKS = 2


def owners(module: nn.Module, params: dict, names: list[str]) -> list[tuple[nn.Module, dict[str, str], dict[str, str]]]:
    """(submodule, own, subtree) for every submodule that holds one of ``names`` directly: ``own`` maps its own
    parameters' local names to names in ``names``, ``subtree`` every parameter of its subtree to a name in
    ``params``. A tied parameter is found under each module that uses it (by identity)."""
    canonical: dict[int, str] = {}
    for full, p in module.named_parameters(remove_duplicate=False):
        if full in params:
            canonical.setdefault(id(p), full)
    wanted = set(names)
    out = []
    for _, m in module.named_modules(remove_duplicate=False):
        own = {local: canonical[id(p)] for local, p in m.named_parameters(recurse=False) if canonical.get(id(p)) in wanted}
        if own:
            subtree = {local: canonical[id(p)] for local, p in m.named_parameters(remove_duplicate=False) if id(p) in canonical}
            out.append((m, own, subtree))
    return out


def factored_contributions(fn: Fn, module: nn.Module, params: dict, batch, direction: dict, *, chunk_size: int | None = None,
                           star: bool = True) -> tuple[list[str], torch.Tensor, torch.Tensor | None, list[str]]:  # fmt: skip
    """(names, C (B, K), C* (B, K) or None, names not covered): see the module docstring.

    Tensors whose module returns something other than one tensor are 'not covered' (their columns are 0): the
    caller computes those by per-row gradients (``linear.contributions_by_tensor``)."""
    names, c, c_star, missing, _ = _split_chunks(fn, module, params, batch, direction, chunk_size=chunk_size, star=star)
    return names, c, c_star, missing


def factored_tangent(fn: SplitLM, module: nn.Module, params: dict, batch, direction: dict, *, chunk_size: int | None = None,
                     method: str = "auto") -> tuple[Observed, LinearChange, tuple[list[str], torch.Tensor, torch.Tensor], list[str]]:  # fmt: skip
    """(observe(θ), Δ_lin = A·J·v, (names, C, C*), names not covered) of a SplitLM, one streamed head pass per chunk.

    ``observe``, ``delta_lin`` and ``factored_contributions`` at the same θ each pass over positions × vocabulary;
    here the body's JVP gives δh (N, H) first, and the capture's pass takes z, δz = δh Wᵀ + h δWᵀ + δb, π's
    statistics, ∂ log π/∂h and the shares of δz_W and δb (the head's columns) at once: 4 products with W where the three
    calls make 7 (1 + 3 + 3), and one body forward fewer. Δ_lin comes from the JVP (forward mode) and the split's
    columns from the backward's factors, so Σ_k C = Δ_lin stays the caller's independent check."""
    names, c, c_star, missing, heads = _split_chunks(fn, module, params, batch, direction, chunk_size=chunk_size, tangent=method)
    observed = Observed.cat([obs for obs, _ in heads], width=batch.targets.shape[1])
    lin = _cat_changes([change for _, change in heads])
    lin.method = heads[-1][1].method
    return observed, lin, (names, c, c_star), missing


def _split_chunks(fn: Fn, module: nn.Module, params: dict, batch, direction: dict, *, chunk_size: int | None, star: bool = True,
                  tangent: str | None = None) -> tuple[list[str], torch.Tensor, torch.Tensor | None, list[str], list]:  # fmt: skip
    """``factored_contributions``' (names, C, C*, missing) and, with ``tangent`` (a JVP method), each chunk's
    (``Observed``, ``LinearChange`` along the whole direction) read off the head's pass: ``factored_tangent``."""
    names = [n for n in params if n in direction]
    found = owners(module, params, names)
    covered: set[str] = set()
    rows, rows_star, heads = [], [], []
    for sub in chunks(batch, chunk_size):
        dh = used = None
        if tangent is not None:
            _, dh, used = jvp_logits(fn.hidden, params, sub, direction, method=tangent)  # (b, T, H)
            dh = at_responses(dh, sub.target_mask)
        factors = capture(fn, found, params, sub, star=star, direction=direction, dh=dh)
        del dh
        c, c_star, ok = factors.contract(params, direction, names)
        if tangent is not None:  # per row now: the statistics' ∂ log π/∂h (N, H) are not kept past the chunk
            st = factors.head[-1]
            heads.append((observed_from_stats(st, sub.target_mask, vocab=params[fn.weight].shape[0]), change_from_stats(st, sub.target_mask)))
            heads[-1][1].method = used
            del st
        del factors
        release_memory()  # the chunk's factors, freed
        covered |= ok
        rows.append(c)
        rows_star.append(c_star)
    missing = [n for n in names if n not in covered]
    return names, torch.cat(rows), torch.cat(rows_star) if star else None, missing, heads


@dataclass
class Factors:
    """What one forward and backward of a chunk of rows leave behind: each owning module's inputs and its
    output gradients δ of Σ_b log π(y_b) (and of Σ_b log π(y*_b)). ``contract`` then gives C for any direction
    at about one forward's cost, so many directions (training examples) share one capture."""

    found: list
    records: dict[int, dict]
    rows: int
    outputs: int
    dtype: torch.dtype
    device: torch.device
    head: tuple | None = None  # a SplitLM's (lm, h at the N response positions (N, H), targets (N,), row of each (N,), HeadStats)
    probs: torch.Tensor | None = None  # π (N, V) at the response positions, kept by the first contraction when it fits
    direction: dict | None = None  # the direction whose head columns the capture's pass already holds (HeadStats.dlogp_w, dlogp_b)

    def contract(self, params: dict, direction: dict, names: list[str]) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
        """(C (b, K), C* (b, K), names covered) for ``direction`` over ``names`` (the columns, in order)."""
        col = {n: i for i, n in enumerate(names)}
        b = self.rows
        c = torch.zeros(b, len(col), dtype=torch.float64, device=self.device)
        c_star = torch.zeros_like(c)
        ok: set[str] = set()
        for i, (m, own, subtree) in enumerate(self.found):
            rec = self.records.get(i)
            if rec is None or rec.get("twice") or len(rec["grads"]) != self.outputs or rec["grads"][0].shape[:1] != (b,):
                continue  # output not a tensor, not reaching the scores, or shared by the rows (GPT-2's wpe): the fallback
            for local, name in own.items():
                if name not in col:
                    continue
                tau = _tangent(m, local, name, rec, params, direction, subtree)
                if tau is not None and tau.shape[:1] == (1,) and b > 1:
                    tau = tau.expand(b, *tau.shape[1:])
                if tau is None or tau.shape != rec["grads"][0].shape:
                    continue
                c[:, col[name]] += (rec["grads"][0].flatten(1) * tau.flatten(1)).sum(1, dtype=torch.float64)
                if self.outputs > 1:
                    c_star[:, col[name]] += (rec["grads"][1].flatten(1) * tau.flatten(1)).sum(1, dtype=torch.float64)
                ok.add(name)
        if self.head is not None:
            self._contract_head(params, direction, col, c, c_star, ok)
        return c.to(self.dtype), c_star.to(self.dtype), ok

    def _contract_head(self, params: dict, direction: dict, col: dict, c: torch.Tensor, c_star: torch.Tensor, ok: set) -> None:
        """A SplitLM's head, never called as a module: C[b, W] = Σ_{m ∈ b} (δz_m[y_m] − π_mᵀ δz_m) with δz = h δWᵀ
        (and δb for the bias), streamed over the vocabulary; a tied W adds this to its embedding's share."""
        lm, h, targets, row, st0 = self.head
        # the columns the capture's pass took (δ log π along δW alone, δb alone), when this is its direction
        held = {lm.weight: (st0.dlogp_w, st0.dlogp_max_w), lm.bias: (st0.dlogp_b, st0.dlogp_max_b)} if direction is self.direction else {}
        for name in (lm.weight, lm.bias):
            if name is None or name not in col or name not in direction:
                continue
            if held.get(name, (None,))[0] is not None:
                dlogp, dlogp_max = held[name]
            elif self._probs(params) is not None:  # π kept: one product per direction
                move = {"dw" if name == lm.weight else "db": direction[name].to(params[name])}
                dlogp, dlogp_max = head_directional(h, self.probs, targets, st0.argmax, positions=lm.positions, **move)
            else:
                st = lm.stats(params, h, targets, direction={name: direction[name]})
                dlogp, dlogp_max = st.dlogp, st.dlogp_max
            c[:, col[name]] += torch.zeros_like(c[:, 0]).index_add(0, row, dlogp.to(c.dtype))
            if self.outputs > 1:
                c_star[:, col[name]] += torch.zeros_like(c[:, 0]).index_add(0, row, dlogp_max.to(c.dtype))
            ok.add(name)


    def _probs(self, params: dict) -> torch.Tensor | None:
        """π (N, V) of a SplitLM's head at the response positions, computed once when it fits (``KEEP_PROBS_CHUNKS``)."""
        lm, h, _, _, st0 = self.head
        vocab = params[lm.weight].shape[0]
        if self.probs is None and h.shape[0] * vocab <= KEEP_PROBS_CHUNKS * (lm.positions or h.shape[0]) * (lm.vocab or vocab):
            self.probs = head_probs(h, params[lm.weight], params[lm.bias] if lm.bias else None, st0.lse, positions=lm.positions)
        return self.probs


def capture(fn: Fn, found: list, params: dict, sub, *, star: bool = True, direction: dict | None = None,
            dh: torch.Tensor | None = None) -> Factors:  # fmt: skip
    """One forward of ``sub`` with hooks on the modules in ``found`` (``owners``), and one backward per score.

    ``direction``: the one direction ``contract`` will be given (an interval's Δθ). When it moves a SplitLM's W or b,
    the head's streamed pass also takes δ log π along δW alone and δb alone, the head's columns: one pass over
    positions × vocabulary instead of two. ``dh`` (N, H): the body's tangent along ``direction`` at the response positions
    (``factored_tangent``); the pass then also takes δ log π along the whole direction (``HeadStats.dlogp``)."""
    records: dict[int, dict] = {}
    handles = []

    def hook_for(i):
        def hook(m, args, kwargs, out):
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return None
            if not out.requires_grad:  # the first layers (embeddings): a leaf, so the backward reaches them; one
                # shared by the rows (GPT-2's position embedding, (1, T, C)) is given a row each, so that its
                # output gradient stays per row (the caller checks Σ_k C = A·J·v and falls back if it does not)
                rows = out.shape[0] == 1 and len(sub) > 1 and out.dim() > 1
                out = (out.detach().expand(len(sub), *out.shape[1:]).clone() if rows else out.detach()).requires_grad_(True)
            detach = lambda a: a.detach() if isinstance(a, torch.Tensor) else a  # noqa: E731
            if i in records:  # a module called twice in one forward (shared layer): its factors mix; the fallback
                records[i]["twice"] = True
                return out
            rec = {"args": tuple(detach(a) for a in args), "kwargs": {k: detach(a) for k, a in kwargs.items()}, "grads": []}
            out.register_hook(lambda g: rec["grads"].append(g))
            records[i] = rec
            return out

        return hook

    for i, (m, _, _) in enumerate(found):
        handles.append(m.register_forward_hook(hook_for(i), with_kwargs=True))
    outputs = 2 if star else 1
    head = None
    try:
        with torch.enable_grad():
            fixed = {n: p.detach() for n, p in params.items()}
            if isinstance(fn, SplitLM):  # the body's backward from ∂ log π/∂h at the response positions, the head streamed
                mask = sub.target_mask
                h = at_responses(fn.hidden(fixed, sub), mask)  # (N, H)
                targets, row = sub.targets[mask], mask.nonzero()[:, 0]
                moves = [n for n in (fn.weight, fn.bias) if n and direction and n in direction]
                st = fn.stats(fixed, h.detach(), targets, grad=True, dh=dh, direction={n: direction[n] for n in moves} or None,
                              parts=True)  # fmt: skip
                for j, g in enumerate((st.grad, st.grad_max)[:outputs]):
                    if h.requires_grad:
                        h.backward(g.to(h.dtype), retain_graph=j + 1 < outputs)
                head = (fn, h.detach(), targets, row, st)
                dtype, device = st.logp.dtype, h.device
            else:
                scores = _row_scores(fn(fixed, sub), sub.targets, sub.target_mask)  # (b, 2)
                for j in range(outputs):
                    if scores.requires_grad:
                        scores[:, j].sum().backward(retain_graph=j + 1 < outputs)
                dtype, device = scores.dtype, scores.device
    finally:
        for handle in handles:
            handle.remove()
    return Factors(found, records, len(sub), outputs, dtype, device, head, direction=direction)


def is_conv1d(m: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D: o = x W + b with W stored (in, out), the transpose of nn.Linear's."""
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf")


def normalized(m: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """x̂ = (x − mean) / √(var + ε) over ``m``'s normalized shape: what a LayerNorm's γ multiplies."""
    return nn.functional.layer_norm(x, m.normalized_shape, None, None, m.eps)


def _tangent(m: nn.Module, local: str, name: str, rec: dict, params: dict, direction: dict, subtree: dict[str, str]) -> torch.Tensor | None:
    """τ = ∂m(x; θ_m + ε v)/∂ε at ε = 0, v moving only ``local``: the module's output tangent, (b, …)."""
    v = direction[name].to(params[name])
    args, kwargs = rec["args"], rec["kwargs"]
    x = args[0] if args else None
    with torch.no_grad():
        if isinstance(m, nn.Linear) and x is not None and not kwargs:
            return x @ v.T if local == "weight" else v.expand(*x.shape[:-1], v.shape[0])
        if is_conv1d(m) and x is not None and not kwargs:
            return x @ v if local == "weight" else v.expand(*x.shape[:-1], v.shape[0])
        if isinstance(m, nn.Embedding) and x is not None and not kwargs and local == "weight":
            return nn.functional.embedding(x, v, m.padding_idx, m.max_norm, m.norm_type, m.scale_grad_by_freq, m.sparse)
        if type(m) is nn.LayerNorm and x is not None and not kwargs and m.elementwise_affine:  # γ ⊙ x̂ + β
            if local == "bias":
                return v.expand(x.shape)
            return normalized(m, x) * v
    own = {ln: params[n] for ln, n in subtree.items()}
    try:
        with keep_float64() if v.dtype == torch.float64 else contextlib.nullcontext():  # RMSNorm upcasts to float32
            _, tau = jvp(lambda p: functional_call(m, {**own, local: p}, args, kwargs), (own[local],), (v,))
    except Exception:  # noqa: BLE001 - an operator without a forward-mode rule: the caller's fallback
        return None
    return tau.detach() if isinstance(tau, torch.Tensor) else None
