"""The exact force of many training examples at once on the linear layers, from per-row gradients.

In: the captured factors of the probe rows (``factored.capture``: each module's input x and output gradient δ of
log π(y_b) and of log π(y*_b)), those of a block of training rows (the same capture, one score), which
direction d each training row adds to with which factor a_r, and the optimizer's elementwise P. Out: C (B, D),
C* (B, D), every Linear / Conv1D weight and bias this covers summed.

For a module m with o = x Wᵀ + b (a GPT-2 Conv1D stores Wᵀ), probe row b, and a direction d (one sign of one
example, δθ_d = −c_u P ⊙ g_d, g_d = Σ_{r ∈ d} w_r ∇θ(−log π(y_r)), so a_r = c_u w_r):

    G_b  = Σ_t δ_{b,t} x_{b,t}ᵀ                           (d_out, d_in)   the row's ∇_W log π(y_b)
    V_d  = P_W ⊙ Σ_{r ∈ d} a_r Σ_s δ'_{r,s} x'_{r,s}ᵀ     (d_out, d_in)   δW of the direction
    C[b, d] += ⟨G_b, V_d⟩,      bias: ⟨Σ_t δ_{b,t}, P_b ⊙ Σ_r a_r Σ_s δ'_{r,s}⟩

Sums run in float32 at least (a bfloat16 model's factors are widened), C in float64. One G per probe row serves
every direction of the block, so B rows × D directions cost one forward-sized
product (forming G, N positions · d_in · d_out) and B · D · d_in · d_out, where the tangent of each direction
(``Factors.contract``) costs a forward-sized product per direction. Memory: the directions' V and a chunk of
rows' G of one module at a time, both sized by the caller's ``elements`` (numbers held at once).
"""

from __future__ import annotations

import torch
from torch import nn

from ..numerics import wide
from .factored import Factors, is_conv1d, normalized
from .head import SplitLM, head_probs


def fast_modules(found: list, names: set[str], *, max_size: int) -> dict[int, str]:
    """{index in ``found``: "linear" | "conv1d"} for the Linear / Conv1D modules whose own tensors (all of them in
    ``names``) are used by no other module and whose weight has at most ``max_size`` entries."""
    uses: dict[str, int] = {}
    for _, own, _ in found:
        for name in own.values():
            uses[name] = uses.get(name, 0) + 1
    out = {}
    for i, (m, own, _) in enumerate(found):
        kind = "linear" if isinstance(m, nn.Linear) else "conv1d" if is_conv1d(m) else None
        if kind is None or "weight" not in own or set(own) - {"weight", "bias"}:
            continue
        if all(n in names and uses[n] == 1 for n in own.values()) and m.weight.numel() <= max_size:
            out[i] = kind
    return out


def usable(rec: dict | None, rows: int, outputs: int) -> bool:
    """The record of a plain call with one input and one per-row output gradient per score."""
    return bool(rec) and not rec.get("twice") and not rec["kwargs"] and len(rec["args"]) == 1 and len(rec["grads"]) == outputs \
        and rec["grads"][0].shape[:1] == (rows,)  # fmt: skip


def _row_grads(x: torch.Tensor, d: torch.Tensor, kind: str, out: torch.Tensor) -> torch.Tensor:
    """Per-row weight gradients Σ_t d_t x_tᵀ: x (n, T, i), d (n, T, o) -> (n, o, i) (Linear) or (n, i, o) (Conv1D),
    summed in float32 at least (a bfloat16 / float16 model's factors are widened first), written into the front of
    the flat buffer ``out`` (a fresh tensor per call would pay the kernel's zero-fill of its pages each time:
    measured, twice the time of the product)."""
    x, d = wide(x.reshape(x.shape[0], -1, x.shape[-1])), wide(d.reshape(d.shape[0], -1, d.shape[-1]))
    a, b = (d.transpose(1, 2), x) if kind == "linear" else (x.transpose(1, 2), d)
    return torch.bmm(a, b, out=out[: a.shape[0] * a.shape[1] * b.shape[2]].view(a.shape[0], a.shape[1], b.shape[2]))


def _position_sum(d: torch.Tensor) -> torch.Tensor:
    """Σ_t d_t per row: (n, …, o) -> (n, o), the bias's gradient."""
    return d.reshape(d.shape[0], -1, d.shape[-1]).sum(1)


def linear_forces(probe: Factors, train: Factors, modules: dict[int, tuple[int, str]], direction: torch.Tensor, factor: torch.Tensor,
                  n_dirs: int, scale: dict[str, torch.Tensor] | None, *, elements: int) -> tuple[torch.Tensor, torch.Tensor, set[str]]:  # fmt: skip
    """(C (B, D), C* (B, D), names covered): the module docstring's sums over ``modules`` = {index in
    ``probe.found``: (index in ``train.found``, kind)} (``fast_modules``).

    ``train`` holds the training rows' factors (one score); training row r adds to direction ``direction[r]``
    with factor ``factor[r]`` = c_u w_r. ``scale``: P per tensor name (None: the identity)."""
    b, dev = probe.rows, probe.device
    c = torch.zeros(b, n_dirs, dtype=torch.float64, device=dev)
    c_star = torch.zeros_like(c)
    covered: set[str] = set()
    direction = direction.to(dev)
    one_to_one = train.rows == n_dirs and bool((direction == torch.arange(n_dirs, device=dev)).all())
    biggest = max((probe.found[i][0].weight.numel() for i in modules), default=0)
    dtype = wide(torch.empty(0, dtype=probe.dtype)).dtype
    rows_buf = torch.empty(max(probe.outputs * biggest, elements // 2), dtype=dtype, device=dev)  # a chunk of rows' G (y and y*), reused
    dirs_buf = torch.empty(n_dirs * biggest, dtype=dtype, device=dev)  # the directions' δW, reused
    for i, (j, kind) in modules.items():
        rec, trec = probe.records.get(i), train.records.get(j)
        if not (usable(rec, b, probe.outputs) and usable(trec, train.rows, 1)):
            continue
        m, own, _ = probe.found[i]
        size = m.weight.numel()
        x, xt, dt = rec["args"][0], trec["args"][0], trec["grads"][0]
        step = max(1, rows_buf.numel() // size)  # training rows per chunk of their gradients
        shape = (m.weight.shape[0], m.weight.shape[1])
        v = dirs_buf[: n_dirs * size].view(n_dirs, *shape)
        scaled = dt * factor.to(dt.device, wide(dt).dtype).view(-1, *[1] * (dt.dim() - 1))
        if one_to_one:  # each direction is one row, in order (SFT, preference pairs): the rows' gradients are V
            _row_grads(xt, scaled, kind, dirs_buf)
        else:
            v.zero_()
            for r0 in range(0, train.rows, step):
                v.index_add_(0, direction[r0 : r0 + step], _row_grads(xt[r0 : r0 + step], scaled[r0 : r0 + step], kind, rows_buf).view(-1, *shape))
        p = scale.get(own["weight"]) if scale else None
        if p is not None:
            v *= p.to(v)
        flat = v.view(n_dirs, size).T  # (size, D)
        scores = len(rec["grads"])
        per = max(1, rows_buf.numel() // (size * scores))  # probe rows per product: G of y and of y* stacked, one GEMM
        for r0 in range(0, b, per):
            n = min(per, b - r0)
            for k, grads in enumerate(rec["grads"]):
                _row_grads(x[r0 : r0 + n], grads[r0 : r0 + n], kind, rows_buf[k * n * size :])
            cc = (rows_buf[: scores * n * size].view(scores * n, size) @ flat).double()  # (scores · n, D)
            for k, out in zip(range(scores), (c, c_star)):
                out[r0 : r0 + n] += cc[k * n : (k + 1) * n]
        covered.add(own["weight"])
        if "bias" in own:
            vb = torch.zeros(n_dirs, m.bias.shape[0], dtype=v.dtype, device=dev)
            vb.index_add_(0, direction, _position_sum(wide(dt)) * factor.to(vb).view(-1, 1))
            pb = scale.get(own["bias"]) if scale else None
            vb = vb * pb.to(vb) if pb is not None else vb
            for out, grads in zip((c, c_star), rec["grads"]):
                out += (_position_sum(wide(grads)) @ vb.T).double()
            covered.add(own["bias"])
    return c, c_star, covered


def own_rule(m: nn.Module, local: str) -> bool:
    """Whether ``rest_gradients`` has the per-row gradient of ``m``'s own tensor ``local`` in closed form."""
    if type(m) is nn.LayerNorm:
        return m.elementwise_affine and local in ("weight", "bias")
    return type(m) is nn.Embedding and local == "weight" and m.max_norm is None and not m.scale_grad_by_freq


def rest_gradients(train: Factors, params: dict, rules: list[tuple[int, str]], rows: list[int], scale: list[float], *,
                   head: bool = True) -> dict[str, torch.Tensor]:  # fmt: skip
    """Σ_r scale_r ∇ log π(y_r) over the training rows ``rows`` of ``train`` (indices into its rows) for the tensors
    of ``rules`` = [(index in ``train.found``, name)] and (``head``) of a SplitLM head, from the captured factors:

        LayerNorm  ∇γ = Σ_t δ_t ⊙ x̂_t,  ∇β = Σ_t δ_t        Embedding  ∇E[id_t] += δ_t
        head       ∇W = Σ_m (e_{y_m} − π_m) h_mᵀ,  ∇b = Σ_m (e_{y_m} − π_m)    (m: the rows' response positions)

    A tensor used by several (a tied embedding and head) sums them. With scale_r = −w_r this is an example's g."""
    out: dict[str, torch.Tensor] = {}
    idx = torch.tensor(rows, device=train.device)
    a = torch.tensor(scale, dtype=torch.float64, device=train.device)

    def add(name: str, g: torch.Tensor) -> None:
        out[name] = out[name] + g if name in out else g

    for i, name in rules:
        m, own, _ = train.found[i]
        rec = train.records.get(i)
        local = next(k for k, v in own.items() if v == name)
        d = wide(rec["grads"][0][idx])  # (r, T, d)
        w = a.to(d).view(-1, *[1] * (d.dim() - 1))
        if type(m) is nn.LayerNorm:
            if local == "bias":
                add(name, (d * w).reshape(-1, d.shape[-1]).sum(0))
            else:
                x = rec["args"][0]
                xhat = normalized(m, wide(x[idx] if x.shape[0] == train.rows else x))
                add(name, (d * xhat * w).reshape(-1, d.shape[-1]).sum(0))
        else:  # Embedding: δ scattered into the rows of the ids (position ids shared by the rows: broadcast)
            ids = rec["args"][0]
            ids = (ids[idx] if ids.shape[0] == train.rows else ids.expand(len(rows), *ids.shape[1:])).reshape(-1)
            flat = (d * w).reshape(-1, d.shape[-1])
            if m.padding_idx is not None:
                flat = flat * (ids != m.padding_idx).unsqueeze(-1).to(flat)
            add(name, torch.zeros(m.weight.shape, dtype=flat.dtype, device=flat.device).index_add_(0, ids, flat))
    if head and train.head is not None:
        lm, h, targets, row, st = train.head
        pick = torch.isin(row, idx)
        if bool(pick.any()):
            per_row = torch.zeros(train.rows, dtype=torch.float64, device=train.device)
            per_row[idx] = a
            coef = per_row[row[pick]]  # (M,) scale of each position's row
            for name, g in _head_gradient(h[pick], targets[pick], st.lse[pick], coef, params, lm.weight, lm.bias).items():
                add(name, g)
    return out


def _head_gradient(h, targets, lse, coef, params: dict, weight: str, bias: str | None) -> dict[str, torch.Tensor]:
    """{W: Σ_m c_m (e_{y_m} − π_m) h_mᵀ, b: Σ_m c_m (e_{y_m} − π_m)} for positions h (M, H) of a SplitLM's head."""
    resid = -head_probs(h, params[weight], params[bias] if bias else None, lse)  # −π (M, V)
    resid[torch.arange(len(targets), device=resid.device), targets] += 1
    resid = resid * coef.to(resid).unsqueeze(-1)
    out = {weight: resid.T @ wide(h)}
    if bias:
        out[bias] = resid.sum(0)
    return out


def _padded(values: torch.Tensor, group: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups, longest, …) with ``values`` (n, …) placed by ``group`` (n,) in order, zero elsewhere, and the slot
    of each entry: the layout of one batched product per group (rows' positions, or directions' positions)."""
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=groups)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(group)
    slot[order] = torch.arange(len(group), device=group.device) - starts[group[order]]
    out = values.new_zeros(groups, int(counts.max()) if len(group) else 0, *values.shape[1:])
    out[group, slot] = values
    return out, slot


def batched_head(fn, found: list, factors: Factors, names: set[str]) -> tuple[set[str], int | None]:
    """(names, index in ``found`` of the nn.Embedding that shares W, or None) of a SplitLM head that
    ``head_forces`` takes: its W moves and is read, besides the head, by no module or by one plain
    embedding call per row; ``(set(), None)`` otherwise (the head then goes with the other tensors, per example)."""
    if not isinstance(fn, SplitLM) or fn.weight not in names or factors.head is None:
        return set(), None
    users = [i for i, (_, own, _) in enumerate(found) if fn.weight in own.values() and factors.records.get(i) is not None]
    tied = None
    if users:
        m, own, _ = found[users[0]]
        local = next(k for k, v in own.items() if v == fn.weight)
        rec = factors.records[users[0]]
        if len(users) > 1 or type(m) is not nn.Embedding or not own_rule(m, local) or not usable(rec, factors.rows, factors.outputs) \
                or rec["args"][0].shape[0] != factors.rows:  # fmt: skip
            return set(), None
        tied = users[0]
    return {fn.weight} | ({fn.bias} if fn.bias in names else set()), tied


def head_forces(probe: Factors, train: Factors, params: dict, direction: torch.Tensor, factor: torch.Tensor, n_dirs: int,
                scale: dict[str, torch.Tensor] | None, *, embedding: tuple[int, int] | None = None, bias: bool = True,
                elements: int) -> tuple[torch.Tensor, torch.Tensor, set[str]]:  # fmt: skip
    """(C (B, D), C* (B, D), names covered) of a SplitLM head's W (V, H) and (``bias``) b, and of the input embedding that
    shares W (``embedding`` = (index in ``probe.found``, index in ``train.found``) of that nn.Embedding), for all
    directions of a block at once, ``elements`` numbers at a time over the vocabulary.

    With the probe row b's positions t (hidden h_t, target y_t, π_t), the training positions m of direction d
    (h'_m, y'_m, π'_m, a_m = c_u w_r of their row), and for a tied W the embedding's output gradients δ at ids:

        V_d   = P ⊙ (Σ_m a_m (e_{y'_m} − π'_m) h'_mᵀ + Σ_{r ∈ d} a_r Σ_s e_{id'_s} δ'_sᵀ)      (V, H), per chunk
        Π_b   = Σ_t π_t h_tᵀ                                                          (V, H), per chunk
        C[b, d] = Σ_t h_tᵀ V_d[y_t] − ⟨Π_b, V_d⟩ + Σ_t δ_tᵀ V_d[id_t]           (C*: y*_t and δ of y*)

    so the probe side costs N·V·H per block (forming Π once for all directions), not per direction, and B·D·V·H
    the product; the per-direction product h V_dᵀ over all N positions (``head_directional``) is never formed."""
    lm, h, y, row, st = probe.head
    _, h2, y2, row2, st2 = train.head
    dev, b = probe.device, probe.rows
    w = params[lm.weight]
    b_head = params[lm.bias] if lm.bias else None
    n_vocab, hid = w.shape
    dtype = wide(torch.empty(0, dtype=probe.dtype)).dtype
    c = torch.zeros(b, n_dirs, dtype=torch.float64, device=dev)
    c_star = torch.zeros_like(c)
    h_raw, h2_raw = h, h2  # the head's logits in the model's dtype, as the capture's lse (then widened)
    h, h2 = h.to(dtype), h2.to(dtype)
    a2 = factor.to(dev, dtype)[row2]  # (M,) each training position's a
    dir2 = direction.to(dev)[row2]  # (M,)
    h_pad, slot = _padded(h, row, b)  # (B, T, H): the probe rows' positions
    h2_pad, slot2 = _padded(h2, dir2, n_dirs)  # (D, M_d, H): the directions' positions
    emb = None
    if embedding is not None:
        i, j = embedding
        m = probe.found[i][0]
        ids, d_y = probe.records[i]["args"][0], [wide(g).reshape(-1, hid).to(dtype) for g in probe.records[i]["grads"]]
        ids2, d2 = train.records[j]["args"][0], wide(train.records[j]["grads"][0]).to(dtype)
        a_pos = factor.to(dev, dtype).view(-1, *[1] * (d2.dim() - 1))
        keep = ids2 != m.padding_idx if m.padding_idx is not None else torch.ones_like(ids2, dtype=torch.bool)
        dir_ids = direction.to(dev).view(-1, 1).expand_as(ids2)
        emb = (ids.reshape(-1), d_y, torch.arange(ids.numel(), device=dev) // ids.shape[-1], ids2[keep], (d2 * a_pos)[keep], dir_ids[keep])
    p_w = scale.get(lm.weight) if scale else None
    p_b = scale.get(lm.bias) if scale and lm.bias else None
    per_entry = (b + n_dirs) * hid + 2 * h_pad.shape[1] * b + 4 * h2_pad.shape[1] * n_dirs + 2 * len(y) + 4 * len(y2)
    step = max(1, elements // per_entry)  # vocabulary entries per chunk: Π, V_d, π and π' and their temporaries
    for v0 in range(0, n_vocab, step):
        v1 = min(v0 + step, n_vocab)
        w_c = w[v0:v1]
        bias_c = b_head[v0:v1] if b_head is not None else None
        pi2 = head_probs(h2_raw, w_c, bias_c, st2.lse)  # (M, c), from the model-dtype logits as the lse
        r2 = -pi2 * a2.unsqueeze(-1)  # a (e_y' − π') over the chunk
        inside = (y2 >= v0) & (y2 < v1)
        r2[inside.nonzero()[:, 0], y2[inside] - v0] += a2[inside]
        r2_pad = r2.new_zeros(n_dirs, h2_pad.shape[1], v1 - v0)  # (D, M_d, c)
        r2_pad[dir2, slot2] = r2
        v = torch.bmm(r2_pad.transpose(1, 2), h2_pad)  # (D, c, H)
        if emb is not None:
            sel = (emb[3] >= v0) & (emb[3] < v1)
            v.view(-1, hid).index_add_(0, emb[5][sel] * (v1 - v0) + emb[3][sel] - v0, emb[4][sel])
        if p_w is not None:
            v *= p_w[v0:v1].to(v)
        pi = probe.probs[:, v0:v1].to(dtype) if probe.probs is not None else head_probs(h_raw, w_c, bias_c, st.lse)  # (N, c)
        pi_pad = pi.new_zeros(b, h_pad.shape[1], v1 - v0)
        pi_pad[row, slot] = pi
        big = (torch.bmm(pi_pad.transpose(1, 2), h_pad).view(b, -1) @ v.view(n_dirs, -1).T).double()  # ⟨Π_b, V_d⟩ (B, D)
        c -= big
        c_star -= big
        pieces = max(1, elements // (n_dirs * hid))  # positions per gather of V_d's rows (D, n, H)
        for k, (out, ys) in enumerate(((c, y), (c_star, st.argmax))):  # Σ_t h_tᵀ V_d[y_t], short sums kept apart
            _gathered(out, v, ys, h, row, v0, v1, pieces)
            if emb is not None:  # the tied embedding's share, Σ_t δ_tᵀ V_d[id_t]
                _gathered(out, v, emb[0], emb[1][k], emb[2], v0, v1, pieces)
        if bias and lm.bias:  # b's share: V_d,b = P_b ⊙ Σ_m a_m (e_y' − π'_m); C[b, d] += Σ_t (V_d,b[y_t] − π_tᵀ V_d,b)
            vb = torch.zeros(n_dirs, v1 - v0, dtype=dtype, device=dev).index_add_(0, dir2, r2)
            vb = vb * p_b[v0:v1].to(vb) if p_b is not None else vb
            mean = (pi_pad.sum(1) @ vb.T).double()  # Σ_t π_tᵀ V_d,b (B, D)
            c -= mean
            c_star -= mean
            for out, ys in ((c, y), (c_star, st.argmax)):
                at = ((ys >= v0) & (ys < v1)).nonzero()[:, 0]
                out.index_add_(0, row[at], vb[:, ys[at] - v0].T.double())
    return c, c_star, {lm.weight} | ({lm.bias} if bias and lm.bias else set())


def _gathered(out: torch.Tensor, v: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, v0: int, v1: int, pieces: int) -> None:
    """out[rows[n], d] += x_nᵀ V_d[ids_n] for the positions n whose id is in the chunk [v0, v1) of ``v`` (D, c, H),
    ``pieces`` positions at a time (each gather is D × pieces × H)."""
    at = ((ids >= v0) & (ids < v1)).nonzero()[:, 0]
    for i in range(0, len(at), pieces):
        sel = at[i : i + pieces]
        out.index_add_(0, rows[sel], torch.einsum("dnh,nh->nd", v[:, ids[sel] - v0], x[sel]).double())

