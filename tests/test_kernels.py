"""Oracle tests for the pairwise kernels (ckptforce.forces.kernels / ghost), in float64 on tiny seeded models.

The slow twin of every kernel is a for-loop: one ``torch.autograd.grad`` per example on that example alone (a
batch of one, no padding), then dot products — compared per parameter tensor, so a failure names it. The full
classifier K is checked against an explicit Jacobian of the flattened θ (``jacrev``), and −η·A·K·G against a
real SGD step.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from ckptforce.class_probes import ClassBatch
from ckptforce.forces import (
    Projection,
    class_forces,
    gradient_kernel,
    logp_rows,
    nll_rows,
    sgd_prediction,
    tracin_kernel,
)
from ckptforce.model import BoundModel

from test_forces import _direction, _gpt2, _params  # the tiny seeded GPT-2 of the force tests
from ckptforce.probes import load_probe_set, make_batch, tokenize

pytestmark = pytest.mark.filterwarnings("ignore")
REL = 1e-6
VOCAB = 16


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Six rows of different lengths; ids repeat within rows (5 5 5 5 5) and across rows (3, 5)."""
    path = tmp_path_factory.mktemp("probes") / "probes.jsonl"
    lines = [
        {"id": "a", "prompt_ids": [1, 2, 3], "responses": {"chosen": [4, 5], "rejected": [6, 7, 8, 9]}},
        {"id": "b", "prompt_ids": [10], "responses": {"chosen": [11, 12, 13], "random": [3]}},
        {"id": "c", "prompt_ids": [5, 5, 5, 5, 5], "responses": {"chosen": [1, 5]}},
        {"id": "d", "prompt_ids": [3, 14, 3], "responses": {"chosen": [15, 3, 15]}},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return make_batch(tokenize(load_probe_set(path)))


# ------------------------------------------------------------------------------------------------------------
# the slow twin


def _example_grads(fn, params, batch, score) -> list[dict[str, torch.Tensor]]:
    """Per example: ∇θ score(b) on row b alone (``select`` trims it to its own length)."""
    out = []
    for b in range(len(batch)):
        single = batch.select([b])
        leaves = {n: p.detach().clone().requires_grad_(True) for n, p in params.items()}
        s = score(b, fn(leaves, single), single)
        grads = torch.autograd.grad(s, list(leaves.values()), allow_unused=True)
        out.append({n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(leaves.items(), grads)})
    return out


def _row(rows_fn):
    return lambda b, logits, single: rows_fn(logits, single)[0]


def _loop_kernel(go: list[dict], gu: list[dict]) -> dict[str, torch.Tensor]:
    """{name: (O, U)} ⟨g_o, g_u⟩ per tensor, one pair at a time."""
    return {n: torch.tensor([[float((a[n] * b[n]).sum()) for b in gu] for a in go], dtype=torch.float64) for n in go[0]}


def _norms(grads: list[dict]) -> torch.Tensor:
    return torch.tensor([math.sqrt(sum(float(g.pow(2).sum()) for g in row.values())) for row in grads], dtype=torch.float64)


def _assert_per_param(got: dict, want: dict, rel: float = REL) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for name, w in want.items():
        scale = float(w.abs().max())
        assert scale > 0, f"{name}: the loop's kernel is all zero, the comparison would prove nothing"
        err = float((got[name] - w).abs().max()) / scale
        assert err <= rel, f"{name}: max |ghost − loop| / max |loop| = {err:.2e} > {rel:g}"


# ------------------------------------------------------------------------------------------------------------
# tiny models


class _LinearLM(nn.Module):
    """Linear layers only, on sequences: one-hot ids → Linear → tanh → Linear (called twice) → Linear head."""

    def __init__(self, vocab: int = VOCAB, hidden: int = 6):
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(vocab, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, vocab)

    def forward(self, ids):
        h = torch.tanh(self.inp(nn.functional.one_hot(ids, VOCAB).to(self.inp.weight.dtype)))  # (B, T, H)
        h = torch.tanh(self.mid(torch.tanh(self.mid(h))))  # the same layer twice: cross terms between its uses
        return self.head(h)  # (B, T, V)


class _EmbeddingLM(nn.Module):
    """Embedding (id 3 is padding_idx: no gradient) → causal running mean → Linear head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 5):
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim, padding_idx=3), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        e = self.emb(ids)  # (B, T, D)
        steps = torch.arange(1, ids.shape[1] + 1, dtype=e.dtype).view(1, -1, 1)
        return self.head(torch.tanh(e.cumsum(1) / steps))


def _bound(module: nn.Module, kind: str = "lm", seed: int = 0) -> BoundModel:
    torch.manual_seed(seed)
    for p in module.parameters():  # non-zero everywhere (padding rows and biases too), so no term is trivially 0
        nn.init.normal_(p, std=0.5)
    return BoundModel(module.double().eval().requires_grad_(False), kind, "test", "none", _takes_mask=False)


class _Mlp(nn.Module):
    def __init__(self, d: int = 5, hidden: int = 7, classes: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.LayerNorm(hidden))
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def _class_batch(n: int, seed: int, d: int = 5, classes: int = 4) -> ClassBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n, 1), generator=g)
    return ClassBatch(x, y, torch.ones_like(y, dtype=torch.bool), list(range(n)))


# ------------------------------------------------------------------------------------------------------------
# ghost inner products == the loop, per layer type


def _check_against_loop(model, params, probes, train, names=None, products="ghost", **kwargs):
    """The kernel per tensor, the norms: ghost products (by default) against the loop."""
    res = gradient_kernel(model.logits, params, probes, train, module=model.module, names=names, by_param=True, products=products, **kwargs)
    sub = {n: params[n] for n in (names or params)}
    fn = lambda p, b: model.logits({**params, **p}, b)
    go = _example_grads(fn, sub, probes, _row(logp_rows))
    gu = _example_grads(fn, sub, train, _row(nll_rows))
    _assert_per_param(res.by_param, _loop_kernel(go, gu))
    torch.testing.assert_close(res.probe_norm, _norms(go), rtol=REL, atol=0)
    torch.testing.assert_close(res.train_norm, _norms(gu), rtol=REL, atol=0)
    return res, go, gu


def test_ghost_linear_layers_on_sequences_equal_the_loop(batch):
    model = _bound(_LinearLM())
    res, _, _ = _check_against_loop(model, _params(model), batch.select([0, 2, 5]), batch)
    assert res.ghost == sorted(_params(model)) and res.per_row == []  # every tensor by the ghost rule
    assert res.method == "exact: ghost 6 tensors, per-row 0 tensors" and not res.approximate


def test_ghost_gpt2_conv1d_layers_equal_the_loop(batch):
    model = _gpt2()
    params = _params(model)
    conv = [n for n in params if ".attn.c_" in n or ".mlp.c_" in n]
    assert len(conv) == 16
    res, _, _ = _check_against_loop(model, params, batch.select([1, 4]), batch, names=conv)
    assert res.ghost == sorted(conv) and res.per_row == []


def test_ghost_embedding_with_repeated_ids_equals_the_loop(batch):
    ids = batch.input_ids[batch.attention_mask.bool()]
    assert int(torch.bincount(ids).max()) >= 5 and 3 in ids.tolist()  # repeats, and the padding_idx is used
    model = _bound(_EmbeddingLM())
    res, _, gu = _check_against_loop(model, _params(model), batch.select([2, 3, 5]), batch)
    assert "emb.weight" in res.ghost and res.per_row == []
    assert all(float(g["emb.weight"][3].abs().max()) == 0 for g in gu)  # the loop agrees: no gradient at padding_idx


def test_whole_gpt2_kernel_ghost_plus_per_row_equals_the_loop(batch, monkeypatch):
    """Every tensor of GPT-2, including wte tied to lm_head (embedding use + head use + their cross terms), wpe
    (called with (1, T) position ids shared by all rows: a copy of its output per row) by ghost products, and the
    LayerNorms' per-row gradients in closed form from the same pass (no vmap'd pass at all)."""
    from ckptforce.forces import ghost

    model = _gpt2()
    params = _params(model)
    assert model.module.lm_head.weight is model.module.transformer.wte.weight
    with monkeypatch.context() as m:
        m.setattr(ghost, "_per_row_grads", lambda *a, **k: pytest.fail("a vmap'd per-row pass"))
        res, _, _ = _check_against_loop(model, params, batch.select([0, 3, 5]), batch)
    assert "transformer.wte.weight" in res.ghost  # the tied tensor by ghost products, not a fallback
    assert "transformer.wpe.weight" in res.ghost
    assert {n for n in params if ".ln_" in n or "ln_f" in n} == set(res.per_row)
    plain = gradient_kernel(model.logits, params, batch.select([0, 3, 5]), batch, module=model.module, ghost=False)
    assert plain.ghost == [] and len(plain.per_row) == len(params)
    for products in ("formed", "auto"):  # ghost factors formed into per-row gradients: the same numbers
        other = gradient_kernel(model.logits, params, batch.select([0, 3, 5]), batch, module=model.module, products=products)
        torch.testing.assert_close(other.k, res.k, rtol=1e-10, atol=1e-12 * float(res.k.abs().max()))
        torch.testing.assert_close(other.probe_norm, res.probe_norm, rtol=1e-10, atol=0)
    torch.testing.assert_close(plain.k, res.k, rtol=1e-10, atol=1e-12 * float(res.k.abs().max()))


def test_one_probe_row_mixes_ghost_and_per_row_tensors(batch):
    """A tensor with ghost factors on one side and per-row gradients on the other is formed and dotted: one probe
    row by the ghost rules against training rows whose every tensor is per row (``ghost=False``), per tensor
    equal to both sides per row."""
    from ckptforce.forces.ghost import kernel_between, row_grads

    model = _gpt2()
    params = _params(model)
    probe, rows = batch.select([4]), batch.select([0, 1, 2])
    ghosted = row_grads(model.logits, params, probe, logp_rows, module=model.module)
    plain = row_grads(model.logits, params, probe, logp_rows, module=model.module, ghost=False)
    train = row_grads(model.logits, params, rows, logp_rows, module=model.module, ghost=False)
    assert "transformer.wpe.weight" in ghosted.factors and not train.factors
    mixed, want = kernel_between(ghosted, train), kernel_between(plain, train)
    for name, k in want.items():
        torch.testing.assert_close(mixed[name], k, rtol=1e-10, atol=1e-12 * float(k.abs().max()) + 1e-300, msg=name)


def test_ghost_factors_form_the_loops_per_example_gradients(batch):
    """Formed from the factors (for sketches and mixed pairs), each tensor's per-row gradient is the loop's, in
    the tensor's own layout: Conv1D (in, out), Linear (out, in), Embedding rows, biases, wte tied to lm_head."""
    from ckptforce.forces.ghost import materialise, row_grads

    model = _gpt2()
    params = _params(model)
    rows = batch.select([0, 2, 3])
    grads = row_grads(model.logits, params, rows, logp_rows, module=model.module)
    assert len(grads.factors["transformer.wte.weight"]) == 2  # the embedding use and the lm_head use
    # positions of zero δ are dropped: the head keeps the longest response (3 tokens of the 5 padded positions),
    # a layer every position but a row's last (4 for the 5-token row)
    assert rows.targets.shape[1] == 5
    assert [v.shape[1] for _, v in grads.factors["transformer.wte.weight"]] == [4, 3]  # (embedding δ, head input)
    assert grads.factors["transformer.h.0.mlp.c_fc.weight"][0][0].shape[1] == 4
    loop = _example_grads(model.logits, params, rows, _row(logp_rows))
    for name in grads.factors:
        want = torch.stack([g[name].flatten() for g in loop])
        torch.testing.assert_close(materialise(grads, name), want, rtol=1e-9, atol=1e-12, msg=name)


def test_factors_of_several_scores_from_one_forward_equal_separate_passes(batch):
    """log π(y) and log π(y*) of the same rows: one forward and a backward each give every tensor's per-row
    gradients (ghost factors, closed-form norms and the vmap'd rest) equal to a pass per score."""
    from ckptforce.forces.approx import _max_logp_rows
    from ckptforce.forces.ghost import materialise, row_grads, row_grads_each

    model = _gpt2()
    params = _params(model)
    rows = batch.select([0, 2, 3])
    calls = []
    fn = lambda p, b: calls.append(1) or model.logits(p, b)  # noqa: E731
    both = row_grads_each(fn, params, rows, [logp_rows, _max_logp_rows], module=model.module)
    assert len(calls) == 1
    for got, score in zip(both, (logp_rows, _max_logp_rows)):
        want = row_grads(model.logits, params, rows, score, module=model.module)
        assert (set(got.factors), set(got.dense), got.n) == (set(want.factors), set(want.dense), want.n) and got.factors
        for name in want.factors:
            torch.testing.assert_close(materialise(got, name), materialise(want, name), rtol=1e-12, atol=1e-14, msg=name)
        for name in want.dense:
            torch.testing.assert_close(got.dense[name], want.dense[name], rtol=1e-12, atol=1e-14, msg=name)
    assert not torch.allclose(materialise(both[0], "transformer.h.0.mlp.c_fc.weight"), materialise(both[1], "transformer.h.0.mlp.c_fc.weight"))


def test_per_row_fallback_without_vmap_agrees(batch, monkeypatch):
    """A model vmap cannot trace takes the batched backward for its per-row tensors; the numbers are the same."""
    import torch.func

    model = _gpt2()
    params = _params(model)
    fast = gradient_kernel(model.logits, params, batch.select([0, 3]), batch, module=model.module)

    def refuse(*args, **kwargs):
        raise RuntimeError("vmap: data-dependent control flow")

    monkeypatch.setattr(torch.func, "vmap", refuse)
    slow = gradient_kernel(model.logits, params, batch.select([0, 3]), batch, module=model.module)
    assert slow.per_row == fast.per_row != []
    torch.testing.assert_close(slow.k, fast.k, rtol=1e-10, atol=1e-12 * float(fast.k.abs().max()))


def test_chunks_change_no_number(batch):
    model = _gpt2()
    params = _params(model)
    whole = gradient_kernel(model.logits, params, batch.select([0, 1, 2]), batch, module=model.module, chunk_size=None)
    parts = gradient_kernel(model.logits, params, batch.select([0, 1, 2]), batch, module=model.module, chunk_size=2)
    torch.testing.assert_close(parts.k, whole.k, rtol=1e-10, atol=1e-12 * float(whole.k.abs().max()))
    torch.testing.assert_close(parts.train_norm, whole.train_norm, rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------------------------
# cosine, losses, projection, TracIn


def test_cosine_in_range_and_equal_to_the_loop(batch):
    model = _gpt2()
    params = _params(model)
    probes = batch.select([0, 2, 4])
    res = gradient_kernel(model.logits, params, probes, batch, module=model.module)
    go = _example_grads(model.logits, params, probes, _row(logp_rows))
    gu = _example_grads(model.logits, params, batch, _row(nll_rows))
    want = sum(_loop_kernel(go, gu).values()) / (_norms(go)[:, None] * _norms(gu)[None, :])
    torch.testing.assert_close(res.cosine, want, rtol=REL, atol=1e-12)
    assert float(res.cosine.abs().max()) <= 1 + 1e-12 and float(res.cosine.min()) < 0 < float(res.cosine.max())
    same = gradient_kernel(model.logits, params, batch, batch, module=model.module, probe_score=nll_rows)
    torch.testing.assert_close(same.cosine.diagonal(), torch.ones(len(batch), dtype=torch.float64), rtol=0, atol=1e-12)


def test_training_loss_weights_per_row_and_per_token(batch):
    model = _gpt2()
    params = _params(model)
    probes = batch.select([1, 3])
    gen = torch.Generator().manual_seed(0)
    w_row = torch.rand(len(batch), generator=gen, dtype=torch.float64) + 0.5
    w_tok = torch.rand(batch.targets.shape, generator=gen, dtype=torch.float64)
    plain = gradient_kernel(model.logits, params, probes, batch, module=model.module)
    per_row = gradient_kernel(model.logits, params, probes, batch, module=model.module, train_loss=w_row, chunk_size=4)
    torch.testing.assert_close(per_row.k, plain.k * w_row[None, :], rtol=1e-10, atol=0)
    per_tok = gradient_kernel(model.logits, params, probes, batch, module=model.module, train_loss=w_tok, chunk_size=4)

    def weighted(b, logits, single):
        logp = torch.log_softmax(logits, -1).gather(-1, single.targets.unsqueeze(-1)).squeeze(-1)[0]  # (T,)
        return -(logp * single.target_mask[0] * w_tok[b, : logp.shape[0]]).sum()

    go = _example_grads(model.logits, params, probes, _row(logp_rows))
    gu = _example_grads(model.logits, params, batch, weighted)
    want = sum(_loop_kernel(go, gu).values())
    torch.testing.assert_close(per_tok.k, want, rtol=REL, atol=1e-12 * float(want.abs().max()))
    callable_loss = gradient_kernel(model.logits, params, probes, batch, module=model.module, train_loss=lambda z, b: 2 * nll_rows(z, b))
    torch.testing.assert_close(callable_loss.k, 2 * plain.k, rtol=1e-10, atol=0)
    with pytest.raises(ValueError, match=r"train_loss weights have shape \(3,\); give \(U,\) or \(U, T\) with U = 6"):
        gradient_kernel(model.logits, params, probes, batch, train_loss=torch.ones(3))


def _wide_mlp(seed: int = 0) -> BoundModel:
    torch.manual_seed(seed)
    return BoundModel(_Mlp(d=5, hidden=2000).double().eval().requires_grad_(False), "classifier", "test", "none")


@pytest.mark.parametrize("kind", ["sign", "gaussian"])
def test_projection_is_labelled_and_close_for_a_large_sketch(kind):
    model = _wide_mlp()
    params = _params(model)
    probes, train = _class_batch(4, seed=1), _class_batch(12, seed=2)
    exact = gradient_kernel(model.logits, params, probes, train, module=model.module)

    def rel(k):
        return float(torch.linalg.matrix_norm(k - exact.k) / torch.linalg.matrix_norm(exact.k))

    big = gradient_kernel(model.logits, params, probes, train, module=model.module, projection=Projection(4000, seed=1, kind=kind))
    assert big.approximate and big.method == f"projection {kind} dim=4000 seed=1"
    assert 0 < rel(big.k) < 0.1, rel(big.k)
    assert float((big.probe_norm / exact.probe_norm - 1).abs().max()) < 0.1
    # unbiased: averaging sketches of independent seeds converges (≈ 1/√16 of one sketch's error)
    small = [gradient_kernel(model.logits, params, probes, train, module=model.module, projection=Projection(64, seed=s, kind=kind)).k for s in range(16)]
    single = sum(rel(k) for k in small) / len(small)
    assert rel(sum(small) / len(small)) < 0.5 * single, (rel(sum(small) / len(small)), single)
    # tensors no larger than the sketch are kept exactly: nothing projected, nothing labelled approximate
    whole = gradient_kernel(model.logits, params, probes, train, module=model.module, projection=Projection(10_000, kind=kind))
    assert not whole.approximate
    torch.testing.assert_close(whole.k, exact.k, rtol=1e-10, atol=1e-12 * float(exact.k.abs().max()))


def test_tracin_sums_eta_times_kernel_over_checkpoints(batch):
    model = _gpt2()
    first = _params(model)
    second = {n: p + d for (n, p), d in zip(first.items(), _direction(first, 0.05, seed=3).values())}
    probes = batch.select([0, 5])
    res = tracin_kernel(model.logits, [(first, 0.1), (second, 0.03)], probes, batch, module=model.module)
    want = 0
    for params, eta in [(first, 0.1), (second, 0.03)]:
        go = _example_grads(model.logits, params, probes, _row(logp_rows))
        gu = _example_grads(model.logits, params, batch, _row(nll_rows))
        want = want + eta * sum(_loop_kernel(go, gu).values())
    torch.testing.assert_close(res.k, want, rtol=REL, atol=1e-12 * float(want.abs().max()))
    assert res.per_checkpoint.shape == (2, 2, len(batch)) and res.etas == [0.1, 0.03] and not res.approximate
    assert float((res.per_checkpoint[0] - res.per_checkpoint[1]).abs().max()) > 1e-3 * float(res.k.abs().max())


# ------------------------------------------------------------------------------------------------------------
# classifiers: full V×V matrices


def test_class_k_equals_explicit_jacobian_contraction():
    model = _bound(_Mlp(), "classifier")
    params = _params(model)
    probes, train = _class_batch(3, seed=1), _class_batch(5, seed=2)
    forces = class_forces(model.logits, params, probes, train)
    names = list(params)
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].flatten() for n in names])

    def jac(x):  # (V, P): ∂z/∂θ of one input, θ flattened
        def z(theta):
            parts = {n: t.view(params[n].shape) for n, t in zip(names, theta.split(sizes))}
            return functional_call(model.module, parts, (x[None],))[0]

        return jacrev(z)(flat)

    for o in range(3):
        for u in range(5):
            torch.testing.assert_close(forces.k_term[o, u], jac(probes.x[o]) @ jac(train.x[u]).T, rtol=1e-10, atol=1e-12)
    pi = torch.softmax(model.logits(params, train)[:, 0], -1)
    torch.testing.assert_close(forces.g_term, pi - nn.functional.one_hot(train.targets[:, 0], 4).double())
    # the gradient kernel is one entry of A·K·G: ⟨∇ log π(y_o), ∇ CE_u⟩ = [A_o K_ou G_u]_{y_o}
    akg = torch.einsum("ovw,ouwx,ux->ouv", forces.a_term, forces.k_term, forces.g_term)  # (O, U, V)
    from_akg = akg.gather(2, probes.targets[:, None, :].expand(-1, 5, -1))[..., 0]
    ghost = gradient_kernel(model.logits, params, probes, train, module=model.module)
    torch.testing.assert_close(ghost.k, from_akg, rtol=1e-9, atol=1e-12)


def test_sgd_prediction_matches_one_step_to_first_order():
    model = _bound(_Mlp(), "classifier")
    params = _params(model)
    probes, train = _class_batch(4, seed=3), _class_batch(1, seed=4)
    forces = class_forces(model.logits, params, probes, train)
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    loss = nn.functional.cross_entropy(model.logits(leaves, train)[:, 0], train.targets[:, 0], reduction="sum")
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

    def error(eta):
        after = {n: p - eta * grads[n] for n, p in params.items()}
        before = torch.log_softmax(model.logits(params, probes)[:, 0], -1)
        observed = torch.log_softmax(model.logits(after, probes)[:, 0], -1) - before  # (O, V)
        return float((observed - sgd_prediction(forces, eta)).abs().max()), float(observed.abs().max())

    (e1, change), (e2, _), (e3, _) = error(0.02), error(0.01), error(0.005)
    assert e1 < 0.05 * change  # first order already explains the step
    assert 3.5 < e1 / e2 < 4.5 and 3.5 < e2 / e3 < 4.5, (e1, e2, e3)  # the remainder is O(η²)


# ------------------------------------------------------------------------------------------------------------
# errors


def test_ghost_with_a_module_that_fn_does_not_run_says_so(batch):
    model, other = _gpt2(), _gpt2(seed=1)
    params = _params(model)
    fn = lambda p, b: model.logits(params, b)
    with pytest.raises(ValueError, match="none of the module's Linear / Conv1D / Embedding layers ran"):
        gradient_kernel(fn, params, batch.select([0]), batch, module=other.module)
    with pytest.raises(ValueError, match="products='fast': give one of auto, ghost, formed"):
        gradient_kernel(model.logits, params, batch.select([0]), batch, products="fast")
    with pytest.raises(ValueError, match=r"Projection\(dim=0, kind='sign'\): need dim ≥ 1"):
        Projection(0)


def test_per_row_gradients_too_big_to_form_take_the_ghost_products(monkeypatch):
    """'auto' forms the per-row gradients where that is cheaper (long rows of a small layer), unless both sides'
    would hold more than ghost.MAX_FORMED numbers (a 124M model's tied embedding: 154 MB per row)."""
    from ckptforce.forces import ghost

    uses = [(torch.zeros(2, 50, 4), torch.zeros(2, 50, 3))]  # 2 rows × 50 positions of a (4, 3) layer
    assert not ghost._ghost_is_cheaper(uses, uses, 12, 2, 2)
    monkeypatch.setattr(ghost, "MAX_FORMED", 47)  # (2 + 2) rows × 12 = 48 numbers: one too many
    assert ghost._ghost_is_cheaper(uses, uses, 12, 2, 2)


def test_a_norm_whose_forward_is_not_the_closed_form_takes_the_per_row_pass():
    """A norm class named like Llama's RMSNorm but computing (1 + γ) ⊙ x̂ (Gemma's form) fails the check of its
    recorded call, so its per-row gradient comes from the vmap'd pass: equal to a per-row autograd loop."""
    from types import SimpleNamespace

    from ckptforce.forces import ghost

    class LlamaRMSNorm(nn.Module):
        def __init__(self, h):
            super().__init__()
            self.weight, self.variance_epsilon = nn.Parameter(torch.randn(h, dtype=torch.float64)), 1e-6

        def forward(self, x):
            return (1 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    torch.manual_seed(0)
    module = nn.Sequential(nn.Embedding(11, 4), LlamaRMSNorm(4), nn.Linear(4, 11)).double()
    params = {n: p.detach() for n, p in module.named_parameters()}
    ids = torch.randint(0, 11, (3, 5))
    rows = SimpleNamespace(input_ids=ids, targets=torch.roll(ids, -1, 1), target_mask=torch.ones(3, 5, dtype=torch.bool))
    fn = lambda p, b: functional_call(module, p, (b.input_ids,))  # noqa: E731
    called = []
    real = ghost._per_row_grads
    grads = None
    try:
        ghost._per_row_grads = lambda *a, **k: called.append(a[4]) or real(*a, **k)
        grads = ghost.row_grads(fn, params, rows, logp_rows, module=module)
    finally:
        ghost._per_row_grads = real
    assert called == [["1.weight"]] and "1.weight" in grads.dense
    for b in range(3):
        leaf = params["1.weight"].clone().requires_grad_(True)
        one = SimpleNamespace(**{k: v[b : b + 1] for k, v in vars(rows).items()})
        (want,) = torch.autograd.grad(logp_rows(fn({**params, "1.weight": leaf}, one), one).sum(), [leaf])
        torch.testing.assert_close(grads.dense["1.weight"][b], want, rtol=1e-10, atol=1e-12)
