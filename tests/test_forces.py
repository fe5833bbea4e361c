"""Oracle tests for the force engine, in float64 on tiny seeded models.

Every fast path is compared with a slow, obviously correct twin: the explicit Jacobian of the logits with
A = I − 1πᵀ as a matrix, a central finite difference, per-row loops without padding, and the JVP restricted
to one tensor for the per-tensor split.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from ckptforce.forces import contributions_by_tensor, delta_lin, delta_path, observe
from ckptforce.model import BoundModel
from ckptforce.probes import load_probe_set, make_batch, tokenize

pytestmark = pytest.mark.filterwarnings("ignore")


def _gpt2(seed: int = 0) -> BoundModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=8, n_positions=16, vocab_size=16, attn_implementation="eager",
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    module = GPT2LMHeadModel(cfg).double().eval().requires_grad_(False)
    return BoundModel(module, "lm", "test", "eager", 16)


def _params(model: BoundModel) -> dict:
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


def _direction(params: dict, scale: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    path = tmp_path_factory.mktemp("probes") / "probes.jsonl"
    lines = [
        {"id": "a", "prompt_ids": [1, 2, 3], "responses": {"chosen": [4, 5], "rejected": [6, 7, 8, 9]}},
        {"id": "b", "prompt_ids": [10], "responses": {"chosen": [11, 12, 13], "random": [3]}},
        {"id": "c", "prompt_ids": [5, 5, 5, 5, 5], "responses": {"chosen": [1]}},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return make_batch(tokenize(load_probe_set(path)))


def _row_logp(model, params, batch, b: int) -> torch.Tensor:
    """log π(y|x) of row b alone, unpadded, by a plain loop over its response positions."""
    n = int(batch.attention_mask[b].sum())
    ids = batch.input_ids[b : b + 1, :n]
    logits = functional_call(model.module, params, (ids,)).logits[0]  # (n, V)
    logp = torch.log_softmax(logits, -1)
    positions = batch.target_mask[b, :n].nonzero().flatten()
    return sum(logp[t, ids[0, t + 1]] for t in positions)


def test_observed_logp_equals_unpadded_loop(batch):
    model = _gpt2()
    params = _params(model)
    obs = observe(model.logits, params, batch)
    for b in range(len(batch)):
        assert float(obs.logp[b]) == pytest.approx(float(_row_logp(model, params, batch, b)), rel=1e-12)
    # peakiness ‖I − 1πᵀ‖_F² at one position, explicitly
    logits = model.logits(params, batch)
    t = int(batch.target_mask[0].nonzero()[0])
    pi = torch.softmax(logits[0, t], -1)
    a_term = torch.eye(len(pi), dtype=pi.dtype) - torch.ones(len(pi), 1, dtype=pi.dtype) @ pi[None, :]  # (V, V)
    assert float(obs.peakiness[0, t]) == pytest.approx(float((a_term**2).sum()), rel=1e-12)
    assert obs.top1[0, t] == pytest.approx(float(pi.max()))


def test_delta_lin_equals_explicit_jacobian_and_finite_difference(batch):
    model = _gpt2()
    params = _params(model)
    v = _direction(params, 1.0, seed=1)
    lin = delta_lin(model.logits, params, batch, v, method="jvp")

    # Explicit: J_z = ∂z/∂θ (B, T, V, |θ|), A_t = I − 1π_tᵀ as a matrix, Δ_lin = Σ_t e_yᵀ A_t J_t v.
    names = list(params)
    flat = torch.cat([params[n].flatten() for n in names])
    sizes = [params[n].numel() for n in names]

    def logits_of(theta):
        parts = dict(zip(names, [p.view(params[n].shape) for p, n in zip(theta.split(sizes), names)]))
        return model.logits(parts, batch)

    jac = jacrev(logits_of)(flat)  # (B, T, V, P)
    v_flat = torch.cat([v[n].flatten() for n in names])
    dz = jac @ v_flat  # (B, T, V)
    logits = logits_of(flat)
    for b in range(len(batch)):
        want = 0.0
        for t in batch.target_mask[b].nonzero().flatten():
            pi = torch.softmax(logits[b, t], -1)
            a_term = torch.eye(len(pi), dtype=pi.dtype) - torch.ones(len(pi), 1, dtype=pi.dtype) @ pi[None, :]
            want += float((a_term @ dz[b, t])[batch.targets[b, t]])
        assert float(lin.total[b]) == pytest.approx(want, rel=1e-9)

    # Central finite difference of the observed log π.
    eps = 1e-6  # truncation O(eps² ‖v‖³) and rounding O(1e-16 / eps) both far below 1e-6
    plus = observe(model.logits, {n: p + eps * v[n] for n, p in params.items()}, batch).logp
    minus = observe(model.logits, {n: p - eps * v[n] for n, p in params.items()}, batch).logp
    fd = (plus - minus) / (2 * eps)
    torch.testing.assert_close(lin.total, fd, rtol=1e-6, atol=1e-9)
    # the argmax response y* too (stable under a tiny step)
    plus_s = observe(model.logits, {n: p + eps * v[n] for n, p in params.items()}, batch).argmax_logp
    minus_s = observe(model.logits, {n: p - eps * v[n] for n, p in params.items()}, batch).argmax_logp
    torch.testing.assert_close(lin.argmax, (plus_s - minus_s) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_jvp_and_double_vjp_agree(batch):
    model = _gpt2()
    params = _params(model)
    v = _direction(params, 1.0, seed=2)
    a = delta_lin(model.logits, params, batch, v, method="jvp")
    b = delta_lin(model.logits, params, batch, v, method="double_vjp")
    assert (a.method, b.method) == ("jvp", "double_vjp")
    torch.testing.assert_close(a.tok, b.tok, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.argmax, b.argmax, rtol=1e-10, atol=1e-12)


def test_chunking_and_padding_do_not_change_rows(batch):
    model = _gpt2()
    params = _params(model)
    v = _direction(params, 1.0, seed=3)
    whole = delta_lin(model.logits, params, batch, v)
    one_by_one = delta_lin(model.logits, params, batch, v, chunk_size=1)
    torch.testing.assert_close(whole.total, one_by_one.total, rtol=1e-10, atol=1e-12)


def test_split_by_tensor_sums_to_whole_and_matches_restricted_jvp(batch):
    model = _gpt2()
    params = _params(model)
    v = _direction(params, 1.0, seed=4)
    names, contrib, contrib_star = contributions_by_tensor(model.logits, params, batch, v, chunk_size=2)
    lin = delta_lin(model.logits, params, batch, v)
    torch.testing.assert_close(contrib.sum(1), lin.total, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(contrib_star.sum(1), lin.argmax, rtol=1e-9, atol=1e-12)
    for k in (0, len(names) // 2, len(names) - 1):  # one tensor alone: the JVP restricted to it
        only = delta_lin(model.logits, params, batch, {names[k]: v[names[k]]})
        torch.testing.assert_close(contrib[:, k], only.total, rtol=1e-9, atol=1e-12, msg=names[k])


def test_split_by_tensor_fallback_without_vmap_agrees(batch, monkeypatch):
    """A model vmap cannot trace takes the batched-backward path; the numbers are the same."""
    from ckptforce.forces import linear

    model = _gpt2()
    params = _params(model)
    v = _direction(params, 1.0, seed=8)
    _, fast, fast_star = contributions_by_tensor(model.logits, params, batch, v)

    def refuse(*args, **kwargs):
        raise RuntimeError("vmap: data-dependent control flow")

    monkeypatch.setattr(linear, "_vmapped_row_grads", refuse)
    _, slow, slow_star = contributions_by_tensor(model.logits, params, batch, v, chunk_size=2)
    torch.testing.assert_close(slow, fast, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(slow_star, fast_star, rtol=1e-10, atol=1e-13)


def test_path_attribution_converges_to_observed_change(batch):
    model = _gpt2()
    params = _params(model)
    step = _direction(params, 0.002, seed=5)  # ~10 % of the init scale per entry: a large training step
    after = {n: p + step[n] for n, p in params.items()}
    observed = observe(model.logits, after, batch).logp - observe(model.logits, params, batch).logp
    lin = delta_lin(model.logits, params, batch, step).total
    errors = []
    for n in (1, 2, 3, 4, 6):
        path = delta_path(model.logits, params, batch, step, nodes=n)
        errors.append(float((path.total - observed).abs().max()))
    assert errors == sorted(errors, reverse=True), errors  # more nodes, smaller gap
    assert errors[0] < float((lin - observed).abs().max())  # one midpoint node already beats the tangent
    assert errors[-1] < 1e-9 * float(observed.abs().max())
    by = delta_path(model.logits, params, batch, step, nodes=4, by_tensor=True)
    torch.testing.assert_close(by.by_tensor.sum(1), by.total, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(by.by_tensor.sum(1), observed, rtol=0, atol=1e-7)


class _Mlp(nn.Module):
    def __init__(self, d: int = 5, hidden: int = 7, classes: int = 4):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(d, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.backbone(x))


class _ClassBatch:
    def __init__(self, x, labels):
        self.x, self.targets = x, labels[:, None]
        self.target_mask = torch.ones_like(self.targets, dtype=torch.bool)

    def __len__(self):
        return len(self.x)

    def select(self, index):
        return _ClassBatch(self.x[index], self.targets[index, 0])


def test_classifier_full_distribution_equals_explicit_akv():
    torch.manual_seed(0)
    model = BoundModel(_Mlp().double().eval(), "classifier", "test", "none")
    params = _params(model)
    v = _direction(params, 1.0, seed=6)
    batch = _ClassBatch(torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1]))
    lin = delta_lin(model.logits, params, batch, v, full=True)
    names = list(params)
    for b in range(len(batch)):
        x = batch.x[b : b + 1]

        def z(*ps):
            return functional_call(model.module, dict(zip(names, ps)), (x,))[0]

        jac = jacrev(z, argnums=tuple(range(len(names))))(*params.values())  # per tensor (V, *shape)
        dz = sum((j.flatten(1) @ v[n].flatten()) for j, n in zip(jac, names))  # (V,)
        pi = torch.softmax(z(*params.values()), -1)
        a_term = torch.eye(4, dtype=pi.dtype) - torch.ones(4, 1, dtype=pi.dtype) @ pi[None, :]  # (V, V)
        torch.testing.assert_close(lin.full[b], a_term @ dz, rtol=1e-10, atol=1e-12)
        assert float(lin.total[b]) == pytest.approx(float((a_term @ dz)[batch.targets[b, 0]]), rel=1e-10)


def test_interval_forces_ties_the_pieces_together(batch):
    from ckptforce.forces import interval_forces

    model = _gpt2()
    before = _params(model)
    step = _direction(before, 0.002, seed=7)
    after = {n: p + step[n] for n, p in before.items()}
    res = interval_forces(model.logits, before, after, batch, nodes=4, by_tensor=True)
    torch.testing.assert_close(res.dlogp_obs, observe(model.logits, after, batch).logp - observe(model.logits, before, batch).logp)
    torch.testing.assert_close(res.lin_by_tensor.sum(1), res.dlogp_lin, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.path_by_tensor.sum(1), res.dlogp_path, rtol=1e-9, atol=1e-12)
    assert float(res.path_gap.abs().max()) < 1e-7 < float(res.remainder.abs().max())
    assert 0 < res.remainder_ratio < 1


def test_interval_forces_in_probe_batches_equal_one_batch(batch):
    """Splitting the rows into probe batches (progress within an interval) changes no number."""
    from dataclasses import fields

    from ckptforce.forces import interval_forces
    from ckptforce.forces.interval import IntervalForces

    model = _gpt2()
    before = _params(model)
    after = {n: p + d for (n, p), d in zip(before.items(), _direction(before, 0.002, seed=3).values())}
    whole = interval_forces(model.logits, before, after, batch, nodes=2, by_tensor=True)
    seen = []
    parts = interval_forces(model.logits, before, after, batch, nodes=2, by_tensor=True, batch_rows=2, progress=lambda r, n: seen.append((r, n)))
    assert seen == [(min(k, len(batch)), len(batch)) for k in range(2, len(batch) + 2, 2)]
    for f in fields(IntervalForces):
        a, b = getattr(whole, f.name), getattr(parts, f.name)
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=f.name)
        elif f.name in ("before", "after"):
            for g in ("logp", "logp_tok", "argmax_logp", "entropy", "top1"):
                torch.testing.assert_close(getattr(b, g), getattr(a, g), rtol=1e-9, atol=1e-12, msg=f"{f.name}.{g}")
    assert parts.remainder_ratio == pytest.approx(whole.remainder_ratio, rel=1e-9)


def test_classifier_interval_forces_in_probe_batches_equal_one_batch():
    """Classifier rows (one position each) split into probe batches: the same numbers (a batch of more probes than
    one chunk used to fail on the missing input_ids)."""
    from ckptforce.class_probes import ClassBatch
    from ckptforce.forces import interval_forces

    torch.manual_seed(0)
    model = BoundModel(_Mlp().double().eval(), "classifier", "test", "none")
    before = _params(model)
    after = {n: p + d for (n, p), d in zip(before.items(), _direction(before, 0.01, seed=4).values())}
    y = torch.tensor([[0], [1], [2], [3], [0]])
    batch = ClassBatch(torch.randn(5, 5, dtype=torch.float64), y, torch.ones_like(y, dtype=torch.bool), list(range(5)))
    whole = interval_forces(model.logits, before, after, batch, nodes=2)
    parts = interval_forces(model.logits, before, after, batch, nodes=2, batch_rows=2)
    for name in ("dlogp_obs", "dlogp_lin", "dlogp_path"):
        torch.testing.assert_close(getattr(parts, name), getattr(whole, name), rtol=1e-9, atol=1e-12, msg=name)
    torch.testing.assert_close(parts.after.logp_tok, whole.after.logp_tok, rtol=1e-9, atol=1e-12)


def test_response_topk_is_the_top_of_the_full_log_softmax_in_chunks(batch):  # noqa: F811
    """forces/topk.py: the k largest of log_softmax at response positions, largest first, −1 / NaN elsewhere; chunks
    of rows give the same numbers as the whole batch."""
    from ckptforce.forces.topk import response_topk

    model = _gpt2()
    fn, params = model.logits, _params(model)
    ids, logp = response_topk(fn, params, batch, 4)
    full = torch.log_softmax(fn(params, batch).double(), -1)
    want, want_ids = full.topk(4, -1)
    mask = batch.target_mask.bool()
    assert torch.equal(ids[mask], want_ids[mask]) and torch.allclose(logp[mask].double(), want[mask], rtol=1e-6, atol=1e-7)
    assert bool((ids[~mask] == -1).all()) and bool(torch.isnan(logp[~mask]).all())
    chunked = response_topk(fn, params, batch, 4, chunk_size=2)
    assert torch.equal(chunked[0], ids) and torch.allclose(chunked[1], logp, rtol=1e-12, atol=1e-12, equal_nan=True)
