"""The force of each training example on each probe over one interval (DESIGN §2, "C+P+B").

In: the model function, θ_t, the probe batch, the training rows (one row per response of each example), the
per-response weights w (objectives.py) and the optimizer's view of the step. Out: per example u and probe row o

    g_u      = Σ_r w_r ∇θ(−log π(y_r|x_u))            = J_uᵀ G_u                       (one backward per sign)
    δθ_u     = −c_u · P_t g_u                          c_u = η × uses / batch size
    Δ_u(o)   = A_o J_o δθ_u                            one JVP over all probe rows      ("force")

split exactly into the positive (w > 0) and negative (w < 0) parts. P_t is the optimizer's preconditioner:
identity for SGD; (1−β₁)/(1−β₁ᵗ) / (√(v_t/(1−β₂ᵗ)) + ε) for Adam(W) from the saved ``exp_avg_sq``;
1/(√v + ε) for RMSprop. What no example explains is reported as its own source, never hidden:

    momentum      −η Σ_{j=1..k} β₁ʲ m_start / (1−β₁ᵗ) / (√v̂_t + ε)    Adam's carry-over of earlier batches
                  −η Σ_j μʲ b_start                                     SGD with momentum
    weight_decay  −η λ θ_t (decoupled, AdamW)                           per param group
    unexplained   Δ_lin − Σ_u Δ_u − momentum − weight_decay

For one plain SGD step on a batch with every example's use known, Σ_u Δ_u = Δ_lin exactly; for an AdamW
step rebuilt from the saved state the three terms sum to the real Δθ (tests check both).

LoRA (``lora_preconditioner``): θ holds the merged W = W_base + s·L R (L (m, r), R (r, n): B and A), but the
optimizer steps the factors, δL = −c P_L ∇_L, δR = −c P_R ∇_R with ∇_L = s ∇_W Rᵀ and ∇_R = s Lᵀ ∇_W. To first
order W moves by

    δW = s (δL R + L δR) = −c s² ((P_L ⊙ ∇_W Rᵀ) R + L (P_R ⊙ Lᵀ ∇_W))

(the second-order s δL δR is left to 'unexplained'); momentum and weight decay on the factors map the same
way, and the frozen base tensors do not move.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..numerics import release_memory
from .batched import batched_head, fast_modules, head_forces, linear_forces, own_rule, rest_gradients, usable
from .factored import capture
from .head import SplitLM
from .factored import owners as module_owners
from .linear import delta_lin
from .observe import Fn, _wide
from .observe import pieces as probe_pieces
from .objectives import kd_loss
from .precondition import Preconditioner


#: Numbers held at once by the batched linear layers (the directions' δW and a chunk of rows' gradients of one
#: module) when the caller gives no budget: 2^27 float32 = 512 MiB.
DEFAULT_ELEMENTS = 2**27


def _row_losses(fn: Fn, params: dict, batch, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """Per row (B,): −log π(y|x) summed over the response tokens, or the KD loss against the teacher."""
    logits = _wide(fn(params, batch))
    if teacher_logits is not None:
        return kd_loss(logits, teacher_logits, batch.target_mask)
    logp = torch.log_softmax(logits, -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
    return -(logp * batch.target_mask.to(logp.dtype)).sum(-1)


def example_gradient(fn: Fn, params: dict, rows, weights: torch.Tensor, teacher_logits=None, *,
                     names: list[str] | None = None) -> tuple[dict | None, dict | None]:  # fmt: skip
    """(g⁺, g⁻) of one training example from its rows (its responses) and their weights w (R,):
    g± = Σ_{r: ±w_r > 0} w_r ∇θ(−log π(y_r|x)) over ``names`` (default: the floating-point params). None where a
    part is empty."""
    names = [n for n, p in params.items() if p.is_floating_point()] if names is None else names
    out = []
    for sign in (1, -1):
        pick = [i for i in range(len(weights)) if float(weights[i]) * sign > 0]
        if not pick:
            out.append(None)
            continue
        if not names:
            out.append({})
            continue
        sub = rows.select(pick)
        with torch.enable_grad():
            leaves = {n: params[n].detach().requires_grad_(True) for n in names}
            teacher = None if teacher_logits is None else teacher_logits[pick]
            loss = (weights[pick].to(leaves[names[0]].dtype) * _row_losses(fn, {**params, **leaves}, sub, teacher)).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        out.append({n: g if g is not None else torch.zeros_like(params[n]) for n, g in zip(names, grads)})
    return out[0], out[1]


@dataclass
class ExampleForces:
    pos: torch.Tensor  # (U, B) force of the positive part of each example on each probe row
    neg: torch.Tensor  # (U, B)
    pos_argmax: torch.Tensor  # (U, B) the same on y* of each probe row
    neg_argmax: torch.Tensor  # (U, B)
    pos_tok: torch.Tensor | None = None  # (B, T) Σ_u of the positive parts, per response token of each probe row
    neg_tok: torch.Tensor | None = None  # (B, T) Σ_u of the negative parts
    method: str = "jvp"  # "factors" (captured once, contracted per example), "jvp", or "jvp (factors misread)"
    own_pos: torch.Tensor | None = None  # (U, R) with own=True: u's positive part on u's own responses
    own_neg: torch.Tensor | None = None  # (U, R) u's negative part on u's own responses

    @property
    def total(self) -> torch.Tensor:
        return self.pos + self.neg


def example_forces(
    fn: Fn, params: dict, probes, train_rows, owners: list[int], weights: torch.Tensor, coeff: torch.Tensor,
    precond: Preconditioner, *, teacher_logits=None, method: str = "auto", chunk_size: int | None = None, module=None,
    own: bool = False, batched: bool = True, train_chunk: int | None = None, elements: int = DEFAULT_ELEMENTS, progress=None,
) -> ExampleForces:  # fmt: skip
    """Δ_u(o) for every example u (U = len(coeff)) and probe row o: rows of ``train_rows`` belong to example
    ``owners[row]`` with weight ``weights[row]``; δθ_u = −coeff_u · P g_u (coeff = η × uses / batch size).

    With ``module`` (the nn.Module ``fn`` evaluates), each chunk of probe rows is captured once (one forward,
    two backwards: ``factored.capture``) and every δθ_u contracted with its factors (about one forward each)
    instead of a JVP per example (about 3.3); tensors the factors do not cover get a JVP of their own, and a
    first example that does not sum to its JVP (1e-4) sends the whole set down the JVP path. The per-token
    split, Σ_u of each sign, is one JVP per sign along Σ_u δθ_u. Tensors P leaves at zero (frozen) are skipped.

    ``own=True`` adds the force of each part of u on u's own responses (``own_self_forces``), every example
    holding the same number R of rows.

    With ``module``, no teacher and no LoRA factors, the linear layers go through ``batched_example_forces``
    first (many examples per captured block); the per-example path below is its fallback."""
    if batched and module is not None and teacher_logits is None and not precond.lora:
        fast = batched_example_forces(fn, params, probes, train_rows, owners, weights, coeff, precond, method=method, chunk_size=chunk_size,
                                      module=module, own=own, train_chunk=train_chunk, elements=elements, progress=progress)  # fmt: skip
        if fast is not None:
            return fast
    n_ex, n_probe = len(coeff), len(probes)
    zeros = lambda: torch.zeros(n_ex, n_probe, dtype=torch.float64)  # noqa: E731
    pos, neg, pos_star, neg_star = zeros(), zeros(), zeros(), zeros()
    width = probes.targets.shape[1]
    tok = {1: torch.zeros(n_probe, width, dtype=torch.float64), -1: torch.zeros(n_probe, width, dtype=torch.float64)}
    n_resp = len(owners) // max(1, n_ex)
    own_pos, own_neg = (torch.zeros(n_ex, n_resp, dtype=torch.float64) for _ in range(2))
    frozen = precond.frozen
    factored, verified = module is not None, False
    names = [n for n, p in params.items() if p.is_floating_point() and n not in frozen]
    for at, sub in probe_pieces(probes, chunk_size if factored else None):  # the JVP path chunks inside delta_lin
        factors = capture(fn, module_owners(module, params, names), params, sub) if factored else None
        summed: dict[int, dict] = {1: {}, -1: {}}
        for u in range(n_ex):
            rows = [i for i, o in enumerate(owners) if o == u]
            if not rows or float(coeff[u]) == 0:
                continue
            teacher = None if teacher_logits is None else teacher_logits[rows]
            parts = example_gradient(fn, params, train_rows.select(rows), weights[rows], teacher)
            steps = []
            for g, total, star, sign in zip(parts, (pos, neg), (pos_star, neg_star), (1, -1)):
                if g is None:
                    steps.append(None)
                    continue
                step = {n: -float(coeff[u]) * d for n, d in precond.apply(g).items() if n not in frozen}
                steps.append(step)
                if module is not None:  # the per-token split comes from Σ_u δθ_u, below
                    for n, d in step.items():
                        summed[sign][n] = summed[sign][n] + d if n in summed[sign] else d.clone()
                if factored:
                    c, c_star, ok = factors.contract(params, step, list(step))
                    rest = {n: d for n, d in step.items() if n not in ok}
                    change_total, change_star = c.sum(1), c_star.sum(1)
                    if rest:
                        extra = delta_lin(fn, params, sub, rest, method=method, chunk_size=chunk_size)
                        change_total, change_star = change_total + extra.total, change_star + extra.argmax
                    if not verified:  # once per call: the factors of these modules sum to the JVP
                        whole, verified = delta_lin(fn, params, sub, step, method=method, chunk_size=chunk_size), True
                        scale = float(whole.total.abs().max())
                        if not torch.allclose(change_total.double(), whole.total.double(), rtol=1e-4, atol=1e-6 * scale):
                            factored = False  # a module whose factors misread: the JVP path for the rest
                            change_total, change_star = whole.total, whole.argmax
                else:
                    change = delta_lin(fn, params, sub, step, method=method, chunk_size=chunk_size)
                    change_total, change_star = change.total, change.argmax
                    if module is None:
                        tok[sign][at, : change.tok.shape[1]] += change.tok.double().cpu()
                total[u, at], star[u, at] = change_total.double().cpu(), change_star.double().cpu()
            if own and at.start == 0:  # once per example, with the first chunk of probes
                own_pos[u], own_neg[u] = own_self_forces(fn, params, train_rows.select(rows), weights[rows], parts, steps,
                                                         method=method, chunk_size=chunk_size)  # fmt: skip
            if progress:
                progress(at.start * n_ex + len(sub) * (u + 1), n_probe * n_ex)
        for sign, direction in summed.items():
            if direction:
                change = delta_lin(fn, params, sub, direction, method=method, chunk_size=chunk_size)
                tok[sign][at, : change.tok.shape[1]] += change.tok.double().cpu()
    method = "factors" if factored else ("jvp (factors misread)" if module is not None else "jvp")
    out = ExampleForces(pos, neg, pos_star, neg_star, tok[1], tok[-1], method)
    if own:
        out.own_pos, out.own_neg = own_pos, own_neg
    return out


def batched_example_forces(
    fn: Fn, params: dict, probes, train_rows, owners: list[int], weights: torch.Tensor, coeff: torch.Tensor,
    precond: Preconditioner, *, module, method: str = "auto", chunk_size: int | None = None, own: bool = False,
    train_chunk: int | None = None, elements: int = DEFAULT_ELEMENTS, progress=None,
) -> ExampleForces | None:  # fmt: skip
    """``example_forces`` with every Linear / Conv1D weight of ``module`` done for a block of examples at once
    (``batched.linear_forces``: one per-row gradient per probe row serves all the block's directions) and the
    other tensors (norms, embeddings, the LM head) per example, their gradients read from the block's capture
    (``batched.rest_gradients``; one backward for tensors without a rule), contracted with ``Factors.contract``.
    ``train_chunk``: training rows per captured block (default: all); ``chunk_size``: probe rows per captured
    chunk; ``elements``: numbers the linear layers hold at once; ``progress(done, total)`` after each example and
    chunk. The first example is checked against the JVP of its step by backprop (rel 1e-4); None when it
    disagrees, or when no module qualifies (the per-example path then).

    The blocks of training rows are the outer loop: each is captured once, and the chunks of probe rows are
    captured again for every block (once in all when they fit one chunk). The per-row G of the probe rows is
    formed once per block, so the work goes as blocks × probe rows and the blocks should be as large as the
    memory allows; the training rows (longer, more of them) are the side not to capture twice.

    The per-token split is one JVP per sign along Σ_u δθ_u, from one gradient of Σ_r c_u w_r (−log π_r)."""
    n_ex, n_probe = len(coeff), len(probes)
    frozen = precond.frozen
    names = [n for n, p in params.items() if p.is_floating_point() and n not in frozen]
    found = module_owners(module, params, names)
    fast = fast_modules(found, set(names), max_size=elements // 4)
    live = [u for u in range(n_ex) if float(coeff[u]) != 0]
    if not fast or not live:
        return None
    rows_of = {u: [i for i, o in enumerate(owners) if o == u] for u in live}
    out = {k: torch.zeros(n_ex, n_probe, dtype=torch.float64) for k in ("pos", "neg", "pos_star", "neg_star")}
    own_pos, own_neg = (torch.zeros(n_ex, len(owners) // max(1, n_ex), dtype=torch.float64) for _ in range(2))
    pieces = probe_pieces(probes, chunk_size)
    kept = capture(fn, found, params, pieces[0][1])  # the first chunk's factors; all of them when one chunk holds every row
    # the modules called once, plainly, by every row: the batched ones; the rest per example
    fast = {i: k for i, k in fast.items() if usable(kept.records.get(i), len(pieces[0][1]), kept.outputs)}
    if not fast:
        return None
    order = sorted(fast)
    fast_names = {n for i in fast for n in found[i][1].values()}
    head_names, tied = batched_head(fn, found, kept, set(names))
    fast_names |= head_names
    rest = [n for n in names if n not in fast_names]
    rules, leftover = _rest_rules(fn, found, kept, rest)
    rule_order = sorted({i for i, _ in rules})
    extra = [tied] if tied is not None else []
    hooked = [found[i] for i in order + rule_order + extra]  # the training rows' capture hooks these only
    modules = {i: (j, fast[i]) for j, i in enumerate(order)}
    where = {i: len(order) + j for j, i in enumerate(rule_order + extra)}
    rules = [(where[i], n) for i, n in rules]
    biggest = max(found[i][0].weight.numel() for i in fast)
    per_block = max(1, (train_chunk or len(owners)) // max(len(r) for r in rows_of.values()))
    signs = 1 + any(float(weights[r]) > 0 for r in range(len(owners))) * any(float(weights[r]) < 0 for r in range(len(owners)))
    per_block = min(per_block, max(1, elements // (2 * signs * biggest)))  # the blocks' δW: at most half of ``elements``
    if len(pieces) > 1:
        kept = None  # not held beside the first block's capture: each chunk is captured again for every block
    checked, broken_checked, done = False, False, 0
    train, in_block, column = None, {}, {}  # the block's capture, its rows' places in it, its directions' columns (set per block)

    def example(u: int, factors, sub, at: slice, c: torch.Tensor, c_star: torch.Tensor, *, with_own: bool) -> bool:
        """Example u's forces on the probe rows ``at`` of one chunk, into ``out``: its columns of the block's
        batched sums C, C* plus its other tensors contracted with the chunk's ``factors``; ``with_own``: its forces
        on its own responses too. False when the check against the JVP fails."""
        nonlocal checked
        r_u = rows_of[u]
        full = example_gradient(fn, params, train_rows.select(r_u), weights[r_u]) if own or not checked or train is None else None
        parts = full if own or train is None else _rest_parts(fn, params, train, rules, leftover, train_rows, r_u, weights, in_block,
                                                              head=not head_names)  # fmt: skip
        to_step = lambda g: None if g is None else {n: -float(coeff[u]) * d for n, d in precond.apply(g).items() if n not in frozen}  # noqa: E731
        steps = [to_step(g) for g in parts]
        whole = steps if full is parts else [to_step(g) for g in full] if full is not None else None  # the check's steps, by backprop
        for s, (step, key) in enumerate(zip(steps, ("pos", "neg"))):
            if step is None:
                continue
            i = column.get((u, s == 1))
            total, star = (c[:, i], c_star[:, i]) if i is not None else (torch.zeros(len(sub), dtype=torch.float64, device=c.device),) * 2
            part = {n: step[n] for n in rest if n in step}
            if part:
                cr, cr_star, ok = factors.contract(params, part, list(part))
                total, star = total + cr.sum(1).to(total), star + cr_star.sum(1).to(star)
                left = {n: d for n, d in part.items() if n not in ok}
                if left:
                    extra = delta_lin(fn, params, sub, left, method=method, chunk_size=chunk_size)
                    total, star = total + extra.total.to(total), star + extra.argmax.to(star)
            if not checked:  # once per call: the batched sums and the rules equal the JVP of the step by backprop
                jvp, checked = delta_lin(fn, params, sub, whole[s], method=method, chunk_size=chunk_size), True
                if not torch.allclose(total, jvp.total.to(total), rtol=1e-4, atol=1e-6 * float(jvp.total.abs().max())):
                    return False
            out[key][u, at], out[key + "_star"][u, at] = total.cpu(), star.cpu()
        if with_own:
            own_pos[u], own_neg[u] = own_self_forces(fn, params, train_rows.select(r_u), weights[r_u], parts, steps, method=method,
                                                     chunk_size=chunk_size)  # fmt: skip
        return True

    for b0 in range(0, len(live), per_block):
        block = live[b0 : b0 + per_block]
        key = {(u, float(weights[r]) < 0) for u in block for r in rows_of[u] if float(weights[r]) != 0}  # the directions that exist
        column = {k: i for i, k in enumerate(sorted(key))}
        live_rows = [(u, r) for u in block for r in rows_of[u] if float(weights[r]) != 0]
        rows = [r for _, r in live_rows]
        direction = torch.tensor([column[(u, float(weights[r]) < 0)] for u, r in live_rows], dtype=torch.long)
        factor = torch.tensor([float(coeff[u]) * float(weights[r]) for u, r in live_rows], dtype=torch.float64)
        train = capture(fn, hooked, params, train_rows.select(rows), star=False) if rows else None
        if train is not None and not broken_checked:  # a rule whose module left no usable record: that tensor by backprop
            broken_checked = True
            broken = {n for j, n in rules if not usable(train.records.get(j), train.rows, 1)}
            rules, leftover = [r for r in rules if r[1] not in broken], sorted(set(leftover) | broken)
            if tied is not None and not usable(train.records.get(where[tied]), train.rows, 1):
                return None
        in_block = {r: k for k, r in enumerate(rows)}
        for ci, (at, sub) in enumerate(pieces):
            factors = kept if kept is not None else capture(fn, found, params, sub)
            if train is not None:
                c, c_star, covered = linear_forces(factors, train, modules, direction, factor, len(column), precond.scale, elements=elements)
                if head_names:  # the LM head (and the embedding tied to it) for all the block's directions at once
                    ch, ch_star, head_done = head_forces(factors, train, params, direction, factor, len(column), precond.scale,
                                                         bias=fn.bias in head_names, embedding=None if tied is None else (tied, where[tied]),
                                                         elements=elements)  # fmt: skip
                    c, c_star, covered = c + ch, c_star + ch_star, covered | head_done
            else:  # every weight of the block is zero: no force
                c = c_star = torch.zeros(len(sub), 0, dtype=torch.float64, device=factors.device)
                covered = fast_names
            if covered != fast_names:
                return None
            for u in block:
                if not example(u, factors, sub, at, c, c_star, with_own=own and ci == 0):
                    return None
                done += len(sub)
                if progress:  # examples × probe rows done
                    progress(done, n_probe * len(live))
            del factors
        train = None
        release_memory()
    tok = summed_tokens(fn, params, probes, train_rows, owners, weights, coeff, precond, names, method=method, chunk_size=chunk_size,
                        train_chunk=train_chunk)  # fmt: skip
    result = ExampleForces(out["pos"], out["neg"], out["pos_star"], out["neg_star"], tok[1], tok[-1], "factors (batched)")
    if own:
        result.own_pos, result.own_neg = own_pos, own_neg
    return result


def _rest_rules(fn: Fn, found: list, factors, rest: list[str]) -> tuple[list[tuple[int, str]], list[str]]:
    """([(index in ``found``, name)] of the ``rest`` tensors whose per-row gradients ``batched.rest_gradients``
    has in closed form, the other names): every module holding a name must have a rule, except a SplitLM's head,
    which is never called as a module (its gradient comes from the capture's head)."""
    head = {fn.weight, fn.bias} - {None} if isinstance(fn, SplitLM) else set()
    rules, blocked = [], set(rest) - {n for _, own, _ in found for n in own.values()}
    wanted = set(rest)
    for i, (m, own, _) in enumerate(found):
        for local, name in own.items():
            if name not in wanted:
                continue
            if own_rule(m, local):
                rules.append((i, name))
            elif not (name in head and factors.records.get(i) is None):
                blocked.add(name)
    rules = [(i, n) for i, n in rules if n not in blocked]
    return rules, [n for n in rest if n in blocked]


def _rest_parts(fn: Fn, params: dict, train, rules, leftover: list[str], train_rows, rows: list[int], weights: torch.Tensor,
                in_block: dict[int, int], *, head: bool = True) -> list[dict | None]:  # fmt: skip
    """(g⁺, g⁻) of one example on the tensors outside the batched layers: from the block's captured factors where
    a rule exists (``batched.rest_gradients``, g = −Σ_r w_r ∇ log π_r), by one backward for the others."""
    parts = []
    for s, sign in enumerate((1, -1)):
        pick = [r for r in rows if sign * float(weights[r]) > 0]
        if not pick:
            parts.append(None)
            continue
        g = rest_gradients(train, params, rules, [in_block[r] for r in pick], [-float(weights[r]) for r in pick], head=head)
        if leftover:
            g.update(example_gradient(fn, params, train_rows.select(pick), weights[pick], names=leftover)[s] or {})
        parts.append({n: t.to(params[n].dtype) for n, t in g.items()})
    return parts


def summed_tokens(fn: Fn, params: dict, probes, train_rows, owners: list[int], weights: torch.Tensor, coeff: torch.Tensor,
                  precond: Preconditioner, names: list[str], *, method: str, chunk_size: int | None,
                  train_chunk: int | None) -> dict[int, torch.Tensor]:  # fmt: skip
    """{±1: (B, width)} the per-token force of Σ_u δθ_u^± = −P ∇ Σ_{r: ±w_r > 0} c_u w_r (−log π_r): one gradient
    over the training rows (in chunks of ``train_chunk``) and one JVP per sign."""
    tok = {s: torch.zeros(len(probes), probes.targets.shape[1], dtype=torch.float64) for s in (1, -1)}
    scaled = torch.tensor([float(coeff[o]) * float(w) for o, w in zip(owners, weights)], dtype=torch.float64)
    summed: dict[int, dict] = {1: {}, -1: {}}
    step = train_chunk or len(owners)
    for r0 in range(0, len(owners), step):
        idx = list(range(r0, min(len(owners), r0 + step)))
        for sign, g in zip((1, -1), example_gradient(fn, params, train_rows.select(idx), scaled[idx].to(weights), names=names)):
            for n, d in (g or {}).items():
                summed[sign][n] = summed[sign][n] + d if n in summed[sign] else d
    for sign, g in summed.items():
        if g:
            direction = {n: -d for n, d in precond.apply(g).items() if n in names}
            change = delta_lin(fn, params, probes, direction, method=method, chunk_size=chunk_size)
            tok[sign][:, : change.tok.shape[1]] += change.tok.double().cpu()
    return tok


def own_self_forces(fn: Fn, params: dict, rows, weights: torch.Tensor, grads, steps, *, method: str = "auto",
                    chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The force of an example's positive and negative parts on its own responses: (R,), (R,) with

        Δ_s(r) = A_r J_r δθ_s summed over the tokens of response r  =  ⟨∇θ ℓ_r, δθ_s⟩,   δθ_s = −c P g_s

    (ℓ_r = log π(y_r|x) summed; ``grads`` = (g⁺, g⁻) and ``steps`` = (δθ⁺, δθ⁻) as ``example_forces`` made them).
    When r is the only response of its sign (a preference pair), g_{s(r)} = w_r ∇(−ℓ_r), so ∇ℓ_r = −g_{s(r)} / w_r
    and the force is one inner product with a gradient already at hand: no forward, no backward. Otherwise
    (a GRPO group, a zero weight) the twin: one JVP over the example's own rows per part."""
    n = len(rows)
    pos, neg = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    signs = [1 if float(w) > 0 else -1 if float(w) < 0 else 0 for w in weights]
    alone = all(s != 0 and signs.count(s) == 1 for s in signs)
    for step, out in zip(steps, (pos, neg)):
        if step is None:
            continue
        if alone:
            for r, s in enumerate(signs):
                g = grads[0] if s > 0 else grads[1]
                out[r] = -sum((g[k].double() * step[k].double()).sum() for k in step).cpu() / float(weights[r])
        else:
            out[:] = delta_lin(fn, params, rows, step, method=method, chunk_size=chunk_size).total.double().cpu()
    return pos, neg


def direction_force(fn: Fn, params: dict, probes, direction: dict | None, *, method: str = "auto", chunk_size: int | None = None):
    """(Δ (B,), Δ* (B,)) = A·J·direction on the probe rows and their y*; zeros when there is no direction."""
    if not direction:
        z = torch.zeros(len(probes), dtype=torch.float64)
        return z, z.clone()
    change = delta_lin(fn, params, probes, direction, method=method, chunk_size=chunk_size)
    return change.total.double().cpu(), change.argmax.double().cpu()


def token_forces(fn: Fn, params: dict, rows, weights: torch.Tensor, anchors: list[int], coeff: float, precond: Preconditioner, *,
                 method: str = "auto", chunk_size: int | None = None) -> torch.Tensor:  # fmt: skip
    """The force of every response token of one example on its anchor responses (a GRPO group's correct ones):
    (R, T) float64, R = len(rows), zero off the response, with

        F_{i,k} = ⟨∇θ ℓ_A, δθ_{i,k}⟩ = c · w_i · ⟨P ∇θ ℓ_A, ∇θ log π(y_{i,k})⟩,   ℓ_A = Σ_{j ∈ anchors} log π(y_j|x)

    δθ_{i,k} = c w_i P ∇θ log π(y_{i,k}) the part of the example's step δθ = −c P g that token k of response i
    makes (g = Σ_i w_i ∇(−ℓ_i), P symmetric). One backward over the anchors, P applied once, one JVP over the
    example's rows along v = P ∇ℓ_A: the per-token tangents are the F / (c w_i). Σ_{i,k} F_{i,k} is the example's
    own force on its anchors, and Σ over the rows of one sign is that part's (``own_self_forces``)."""
    width = rows.targets.shape[1]
    if not anchors or coeff == 0:
        return torch.zeros(len(rows), width, dtype=torch.float64)
    grad = example_gradient(fn, params, rows.select(anchors), -torch.ones(len(anchors), dtype=weights.dtype, device=weights.device))[1]
    frozen = precond.frozen
    v = {n: d for n, d in precond.apply(grad).items() if n not in frozen}
    tok = delta_lin(fn, params, rows, v, method=method, chunk_size=chunk_size).tok.double().cpu()  # (R, T') ⟨v, ∇ log π_k⟩
    out = torch.zeros(len(rows), width, dtype=torch.float64)
    out[:, : tok.shape[1]] = coeff * weights.double().cpu()[:, None] * tok
    return out
