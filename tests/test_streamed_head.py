"""The streamed LM head (forces/head.py): bounded memory whatever the response length and vocabulary, and the
same numbers as the full (B, T, V) logits. Float64 oracles:

    head_stats                  the explicit log-softmax of z = h Wᵀ + b, its JVP and autograd's ∂/∂h   rel 1e-12
    observe / Δ_lin / split     a SplitLM in chunks of 5 positions × 7 vocabulary entries (V = 67) against the
                                model's own logits (the unsplit path), GPT-2 / Llama / Qwen2 / Phi (a biased head)   rel 1e-9
    no vocabulary-sized tensor  no tensor the split paths create has the vocabulary as a dimension, but W's (V, H), b's (V,)
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ckptforce.budget import HEAD_COPIES, HEAD_SHARE, MIN_HEAD_POSITIONS, RESIDENT_COPIES, RUNTIME_GB, head_chunks, rows_budget, rows_per_chunk
from ckptforce.forces import contributions_by_tensor, delta_lin, delta_path, interval_forces, observe
from ckptforce.forces import head as head_mod
from ckptforce.forces.factored import factored_tangent
from ckptforce.forces.head import SplitLM, head_stats
from ckptforce.model import bind_hf
from fixtures.archs import ARCHS
from test_model import _id_probes

V = 67  # no other dimension of the tiny models is 67: a tensor with a 67 in its shape is vocabulary-sized
CHUNKS = dict(positions=5, vocab=7)  # both smaller than the batch's positions and V, neither divides them


def _close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str) -> None:
    scale = float(want.abs().max())
    assert scale > 0, f"{what}: all zero, the comparison would prove nothing"
    err = float((got.double() - want.double()).abs().max())
    assert err <= rel * scale, f"{what}: max |Δ| {err:.3g} > {rel:g} × {scale:.3g}"


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """These models are tiny: one intra-op thread (conftest.one_thread_module)."""


# ------------------------------------------------------------------------------------------------------------
# head_stats against the explicit softmax


def _explicit(h, w, b, y, dh, dw, db):
    z = h @ w.T + b  # (N, V)
    logp = torch.log_softmax(z, -1)
    pi = logp.exp()
    top, star = logp.max(-1)
    dz = dh @ w.T + h @ dw.T + db
    a_dz = dz - (pi * dz).sum(-1, keepdim=True)  # A δz
    rows = torch.arange(len(y))
    return dict(lse=torch.logsumexp(z, -1), logp=logp[rows, y], argmax=star, logp_max=top, entropy=-(pi * logp).sum(-1),
                sumsq=pi.square().sum(-1), dlogp=a_dz[rows, y], dlogp_max=a_dz[rows, star])  # fmt: skip


@pytest.mark.parametrize("positions, vocab", [(None, None), (3, 5), (1, 1), (4, 23)])
def test_head_stats_equal_the_explicit_softmax(positions, vocab):
    g = torch.Generator().manual_seed(0)
    n, hid, v = 11, 6, 23
    h, w, b = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n, hid), (v, hid), (v,)))
    dh, dw, db = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n, hid), (v, hid), (v,)))
    w = w * 3  # peaked distributions: the running max moves between chunks
    y = torch.randint(0, v, (n,), generator=g)
    got = head_stats(h, w, b, y, tangent=(dh, dw, db), grad=True, positions=positions, vocab=vocab)
    want = _explicit(h, w, b, y, dh, dw, db)
    assert torch.equal(got.argmax, want.pop("argmax"))
    for name, value in want.items():
        _close(getattr(got, name), value, 1e-12, name)
    # ∂ log π(y)/∂h and ∂ log π(y*)/∂h by autograd through the explicit log-softmax
    leaf = h.clone().requires_grad_(True)
    logp = torch.log_softmax(leaf @ w.T + b, -1)
    rows = torch.arange(n)
    (g_y,) = torch.autograd.grad(logp[rows, y].sum(), leaf, retain_graph=True)
    (g_star,) = torch.autograd.grad(logp.max(-1).values.sum(), leaf)
    _close(got.grad, g_y, 1e-12, "grad")
    _close(got.grad_max, g_star, 1e-12, "grad_max")
    # the parts along δW alone and δb alone, from the same pass (the head's columns of a split), for every mix
    zero = {"dh": torch.zeros_like(dh), "dw": torch.zeros_like(dw), "db": torch.zeros_like(db)}
    only_w = _explicit(h, w, b, y, zero["dh"], dw, zero["db"])
    only_b = _explicit(h, w, b, y, zero["dh"], zero["dw"], db)
    for mix in list(itertools.product((dh, None), (dw, None), (db, None)))[:-1]:  # the last: no tangent at all
        both = head_stats(h, w, b, y, tangent=mix, parts=True, positions=positions, vocab=vocab)
        which = [m is not None for m in mix]
        alone = _explicit(h, w, b, y, *(zero[k] if m is None else m for k, m in zip(("dh", "dw", "db"), mix)))
        _close(both.dlogp, alone["dlogp"], 1e-12, f"dlogp beside its parts, tangent {which}")
        for part, want, moves in (("w", only_w, mix[1] is not None), ("b", only_b, mix[2] is not None)):
            if not moves:
                assert getattr(both, f"dlogp_{part}") is None, f"dlogp_{part} without δ{part.upper()}: {which}"
                continue
            _close(getattr(both, f"dlogp_{part}"), want["dlogp"], 1e-12, f"dlogp_{part}, tangent {which}")
            _close(getattr(both, f"dlogp_max_{part}"), want["dlogp_max"], 1e-12, f"dlogp_max_{part}, tangent {which}")
    plain = head_stats(h, w, b, y, tangent=(dh, dw, db))
    assert plain.dlogp_w is None and plain.dlogp_b is None  # not asked for: not computed


@pytest.mark.parametrize("vocab", [None, 40_000])
def test_float32_head_stats_keep_float32_precision_over_a_large_vocabulary(vocab):
    """Float32 sums over Qwen2's 152,064 entries (in one chunk, or in chunks of 40,000, rounded to the 128-entry
    blocks, that do not divide it) agree with the float64 softmax to 1e-6 of each statistic's largest value, the
    head's columns along δW and δb alone included. One float32 running sum over the whole vocabulary (a plain batched
    product) is off by ~1e-4 here: the entropy, Σπ² and πᵀδz would fail."""
    g = torch.Generator().manual_seed(3)
    n, hid, v = 6, 16, 152_064
    h, dh, w, dw = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((n, hid), (n, hid), (v, hid), (v, hid)))
    b, db = (torch.randn(v, generator=g, dtype=torch.float64) for _ in range(2))
    w = w * 0.5  # entropy ~9 of log V ≈ 11.9 nats: mass spread over the whole vocabulary
    y = torch.randint(0, v, (n,), generator=g)
    zero = lambda t: torch.zeros_like(t)  # noqa: E731
    want = _explicit(h, w, b, y, dh, dw, db)
    only_w, only_b = _explicit(h, w, b, y, zero(dh), dw, zero(db)), _explicit(h, w, b, y, zero(dh), zero(dw), db)
    got = head_stats(h.float(), w.float(), b.float(), y, tangent=(dh.float(), dw.float(), db.float()), parts=True, vocab=vocab)
    assert got.entropy.dtype == torch.float32
    for name in ("lse", "logp", "logp_max", "entropy", "sumsq", "dlogp", "dlogp_max"):
        _close(getattr(got, name), want[name], 1e-6, f"float32 {name}")
    for part, alone in (("w", only_w), ("b", only_b)):
        _close(getattr(got, f"dlogp_{part}"), alone["dlogp"], 1e-6, f"float32 dlogp_{part}")
        _close(getattr(got, f"dlogp_max_{part}"), alone["dlogp_max"], 1e-6, f"float32 dlogp_max_{part}")


def test_head_stats_take_the_first_maximiser_across_chunks():
    """Two vocabulary entries tie for the maximum in different chunks: y* is the first, as torch.max says."""
    hid, v = 4, 12
    w = torch.randn(v, hid, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w[9] = w[2]
    b = torch.zeros(v, dtype=torch.float64)
    b[2] = b[9] = 50.0
    h = torch.randn(3, hid, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 9, 2])
    full = torch.log_softmax(h @ w.T + b, -1).max(-1)
    for vocab in (None, 3, 5):  # 2 and 9 in one chunk, or in two
        st = head_stats(h, w, b, y, vocab=vocab)
        assert st.argmax.tolist() == full.indices.tolist() == [2, 2, 2]
        _close(st.logp_max, full.values, 1e-12, f"logp_max, vocab chunk {vocab}")


# ------------------------------------------------------------------------------------------------------------
# SplitLM on tiny GPT-2 / Llama / Qwen2 models against their own logits


def _phi_config(vocab_size: int):
    """A Phi-shaped config: the one common head with a bias (z = h Wᵀ + b), LayerNorm, partial rotary, dense biases."""
    from transformers import PhiConfig

    return PhiConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)  # fmt: skip


HEADS = {**ARCHS, "phi": _phi_config}  # the architecture matrix, and a biased head for the streamed head's δb


@pytest.fixture(scope="module", params=sorted(HEADS))
def lm(request, tmp_path_factory):
    """(arch, BoundModel, θ, a seeded direction v, probe rows, SplitLM in small chunks), all float64."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp(request.param)
    HEADS[request.param](V).save_pretrained(folder)
    model = bind_hf(folder).to("cpu", torch.float64)
    theta = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    g = torch.Generator().manual_seed(1)
    v = {n: 0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in theta.items()}
    batch = _id_probes(folder, vocab=V, n=6)
    assert int(batch.target_mask.sum()) > CHUNKS["positions"] and batch.input_ids.shape[1] < V
    head = model.head()
    want = {"gpt2": ("transformer.wte.weight", None), "phi": ("lm_head.weight", "lm_head.bias")}.get(request.param, ("lm_head.weight", None))
    assert head == want  # tied / untied / with a bias
    return request.param, model, theta, v, batch, SplitLM(model.logits, model.body, *head, **CHUNKS)


class _NoVocabTensors(TorchDispatchMode):
    """Records every tensor an op creates that has the vocabulary as a dimension, but (V, H) matrices and, for a
    biased head, (V,) (the bias or its move: the size of a parameter)."""

    def __init__(self, hidden: int, bias: bool = False):
        super().__init__()
        self.allowed = {(V, hidden), (hidden, V)} | ({(V,)} if bias else set())
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and V in t.shape and tuple(t.shape) not in self.allowed:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_split_observe_equals_the_full_logits(lm):
    arch, model, theta, _, batch, split = lm
    want, got = observe(model.logits, theta, batch), observe(split, theta, batch)
    assert torch.equal(got.argmax_ids, want.argmax_ids)
    for name in ("logp_tok", "logp", "argmax_logp_tok", "argmax_logp", "entropy", "top1", "peakiness"):
        _close(getattr(got, name), getattr(want, name), 1e-9, f"{arch} {name}")
    chunked = observe(split, theta, batch, chunk_size=4)  # rows in chunks too
    _close(chunked.logp_tok, want.logp_tok, 1e-9, f"{arch} logp_tok, chunks of rows")


@pytest.mark.parametrize("method", ["jvp", "double_vjp"])
def test_split_delta_lin_equals_the_full_jvp(lm, method):
    arch, model, theta, v, batch, split = lm
    want = delta_lin(model.logits, theta, batch, v, method=method)
    got = delta_lin(split, theta, batch, v, method=method, chunk_size=4)
    assert got.method == method
    for name in ("tok", "total", "argmax_tok", "argmax"):
        _close(getattr(got, name), getattr(want, name), 1e-9, f"{arch} {method} {name}")
    head_only = {split.weight: v[split.weight]}  # only the head moves (GPT-2: the tied embedding moves too)
    _close(delta_lin(split, theta, batch, head_only, method=method).total, delta_lin(model.logits, theta, batch, head_only, method=method).total,
           1e-9, f"{arch} {method} head only")  # fmt: skip


def test_split_factored_split_equals_the_full_one_per_tensor(lm):
    arch, model, theta, v, batch, split = lm
    names, want, want_star = contributions_by_tensor(model.logits, theta, batch, v, module=model.module)
    passes = []
    real = head_mod.head_stats
    head_mod.head_stats = lambda *a, **k: passes.append(k.get("tangent") is not None) or real(*a, **k)  # noqa: E731
    try:
        names_s, got, got_star = contributions_by_tensor(split, theta, batch, v, module=model.module, factored_chunk=4)
    finally:
        head_mod.head_stats = real
    assert names_s == names
    # one streamed pass over the head per chunk of rows: the capture's, which also takes δ log π along δW
    assert passes == [True] * math.ceil(len(batch) / 4), passes
    for k, name in enumerate(names):
        if float(want[:, k].abs().max()) > 0:
            _close(got[:, k], want[:, k], 1e-9, f"{arch} {name}")
            _close(got_star[:, k], want_star[:, k], 1e-9, f"{arch} {name} (y*)")
    k = names.index(split.weight)  # the head's column is the streamed one (plus the embedding's share when tied)
    _close(got[:, k], want[:, k], 1e-9, f"{arch} {split.weight}")
    _close(got.sum(1), delta_lin(model.logits, theta, batch, v).total, 1e-9, f"{arch} Σ_k C = Δ_lin")


def test_factored_tangent_is_observe_delta_lin_and_the_split_in_one_head_pass(lm):
    """observe(θ), Δ_lin and the factored split of a SplitLM from one streamed head pass per chunk of rows, equal
    to the three separate calls on the model's own logits (float64, rel 1e-9)."""
    arch, model, theta, v, batch, split = lm
    obs, lin = observe(model.logits, theta, batch), delta_lin(model.logits, theta, batch, v)
    names, want, want_star = contributions_by_tensor(model.logits, theta, batch, v, module=model.module)
    passes = []
    real = head_mod.head_stats
    head_mod.head_stats = lambda *a, **k: passes.append((k.get("tangent") is not None, k.get("grad"))) or real(*a, **k)  # noqa: E731
    try:
        got_obs, got_lin, (names_f, got, got_star), missing = factored_tangent(split, model.module, theta, batch, v, chunk_size=4)
    finally:
        head_mod.head_stats = real
    assert passes == [(True, True)] * math.ceil(len(batch) / 4), passes  # one pass per chunk: tangent and gradient
    assert names_f == names and not missing and got_lin.method == "jvp"
    assert torch.equal(got_obs.argmax_ids, obs.argmax_ids)
    for name in ("logp_tok", "logp", "argmax_logp_tok", "argmax_logp", "entropy", "top1", "peakiness"):
        _close(getattr(got_obs, name), getattr(obs, name), 1e-9, f"{arch} {name}")
    for name in ("tok", "total", "argmax_tok", "argmax"):
        _close(getattr(got_lin, name), getattr(lin, name), 1e-9, f"{arch} Δ_lin {name}")
    for k, name in enumerate(names):
        if float(want[:, k].abs().max()) > 0:
            _close(got[:, k], want[:, k], 1e-9, f"{arch} {name}")
            _close(got_star[:, k], want_star[:, k], 1e-9, f"{arch} {name} (y*)")
    _close(got.sum(1), got_lin.total, 1e-9, f"{arch} Σ_k C = Δ_lin (the JVP's)")
    head_alone = {split.weight: v[split.weight]}  # only W moves (GPT-2's tied W moves the body's embedding too)
    _, lin_h, (_, c_h, _), _ = factored_tangent(split, model.module, theta, batch, head_alone)
    _close(c_h.sum(1), delta_lin(model.logits, theta, batch, head_alone).total, 1e-9, f"{arch} head alone")
    _close(lin_h.total, c_h.sum(1), 1e-9, f"{arch} head alone, Δ_lin")


def test_split_interval_and_path_equal_the_full_ones(lm):
    arch, model, theta, v, batch, split = lm
    after = {n: p + v[n] for n, p in theta.items()}
    want = interval_forces(model.logits, theta, after, batch, nodes=2, by_tensor=True, module=model.module)
    got = interval_forces(split, theta, after, batch, nodes=2, by_tensor=True, module=model.module, chunk_size=4)
    for name in ("dlogp_obs", "dlogp_lin", "dlogp_lin_tok", "dlogp_path", "argmax_obs", "argmax_lin", "argmax_path", "lin_by_tensor", "path_by_tensor"):
        _close(getattr(got, name), getattr(want, name), 1e-9, f"{arch} {name}")
    for name in ("logp_tok", "entropy", "top1", "peakiness"):  # θ_t's observation from the tangent's pass
        _close(getattr(got.before, name), getattr(want.before, name), 1e-9, f"{arch} before.{name}")
    jvp_path = delta_path(split, theta, batch, v, nodes=2)  # the JVP at each node, no split
    _close(jvp_path.total, want.dlogp_path, 1e-9, f"{arch} Δ_path by JVPs")


def test_a_factored_split_that_misses_delta_lin_falls_back_to_per_row_gradients(lm, monkeypatch):
    """A model whose factors are misread (here: the factored columns doubled) fails the split's own check Σ_k C = Δ_lin;
    the interval then takes the per-row split instead, equal to the model's own, and says so in ``split_method``."""
    from ckptforce.forces import interval as interval_mod
    from ckptforce.pipeline import _split_warnings

    arch, model, theta, v, batch, split = lm
    after = {n: p + v[n] for n, p in theta.items()}
    assert interval_forces(split, theta, after, batch, nodes=0, by_tensor=True, module=model.module).split_method == interval_mod.SPLIT_FACTORED
    real = interval_mod.factored_tangent

    def misread(*args, **kw):
        obs, lin, (names, columns, star), missing = real(*args, **kw)
        return obs, lin, (names, 2 * columns, star), missing

    monkeypatch.setattr(interval_mod, "factored_tangent", misread)
    got = interval_forces(split, theta, after, batch, nodes=0, by_tensor=True, module=model.module, chunk_size=4)
    want = interval_forces(model.logits, theta, after, batch, nodes=0, by_tensor=True)  # no module: per-row gradients
    assert got.split_method == want.split_method == interval_mod.SPLIT_PER_ROW
    assert got.tensor_names == want.tensor_names
    _close(got.lin_by_tensor, want.lin_by_tensor, 1e-9, f"{arch} the per-row split after the fallback")
    _close(got.lin_by_tensor.sum(1), got.dlogp_lin, 1e-9, f"{arch} the fallback's split sums to Δ_lin")
    import xarray as xr

    assert _split_warnings(xr.Dataset(attrs={"split_method": f"{interval_mod.SPLIT_FACTORED},{interval_mod.SPLIT_PER_ROW}"}))
    assert not _split_warnings(xr.Dataset(attrs={"split_method": interval_mod.SPLIT_FACTORED}))


def test_split_paths_form_no_vocabulary_sized_tensor(lm):
    """Observe, the JVP, the double VJP and the factored split of a SplitLM never make a tensor with V in its
    shape (but W's own (V, H) and b's (V,)), and never call the model's full logits."""
    arch, model, theta, v, batch, split = lm
    hidden = theta[split.weight].shape[1]

    def refuse(params, batch):
        raise AssertionError("the full logits were computed")

    split = SplitLM(refuse, split.hidden, split.weight, split.bias, **CHUNKS)
    with _NoVocabTensors(hidden, bias=split.bias is not None) as mode:
        observe(split, theta, batch)
        delta_lin(split, theta, batch, v, method="jvp")
        delta_lin(split, theta, batch, v, method="double_vjp")
        contributions_by_tensor(split, theta, batch, v, module=model.module)
    assert not mode.seen, f"{arch}: vocabulary-sized tensors {mode.seen[:5]}"
    with _NoVocabTensors(hidden) as mode:  # the check itself sees the unsplit path's (B, T, V) logits
        observe(model.logits, theta, batch)
    assert any(V in shape and len(shape) == 3 for _, shape in mode.seen)


def test_a_head_that_is_not_one_linear_map_is_not_split(tmp_path):
    """Soft-capped logits (Gemma 2's final_logit_softcapping) are not lm_head(base(x)): the model is not split."""
    from fixtures.archs import llama_config

    config = llama_config(V)
    config.save_pretrained(tmp_path)
    model = bind_hf(tmp_path)
    assert model.head() == ("lm_head.weight", None)
    model.module.lm_head.register_forward_hook(lambda m, args, out: 30 * torch.tanh(out / 30))
    model._head = None  # found again
    assert model.head() is None


# ------------------------------------------------------------------------------------------------------------
# chunk sizes from the budget


def test_head_chunks_fit_their_share_of_the_budget():
    cells = lambda gb: HEAD_SHARE * gb * 2**30 / (HEAD_COPIES * 4)  # noqa: E731
    positions, vocab = head_chunks(4.0, vocab=50257)
    assert vocab == 50257 and positions * vocab <= cells(4.0) and positions >= MIN_HEAD_POSITIONS  # the whole vocabulary
    positions, vocab = head_chunks(0.05, vocab=150_000)
    assert vocab < 150_000 and positions * vocab <= cells(0.05) and positions >= MIN_HEAD_POSITIONS  # slices of it
    assert head_chunks(1e-9, vocab=150_000) == (1, 1)
    # the parameters held come off the budget first, never more than three quarters of it
    assert rows_budget(6.0, parameters=124_000_000) == pytest.approx(6.0 - RUNTIME_GB - RESIDENT_COPIES * 124e6 * 4 / 2**30)
    assert rows_budget(6.0, parameters=10**10) == 1.5
    # a streamed head: no vocabulary term per row, so long rows of a big vocabulary take more rows per chunk
    long = dict(width=496, hidden=768, layers=12, heads=12)
    assert rows_per_chunk(3.0, vocab=None, **long) > 1.5 * rows_per_chunk(3.0, vocab=50257, **long)
    assert rows_per_chunk(3.0, vocab=None, **long) < rows_per_chunk(3.0, vocab=None, **{**long, "heads": None})  # attention maps count


def test_analyze_with_the_head_in_chunks_writes_the_unsplit_cube(runs, tmp_path, monkeypatch):
    """The whole pipeline (float64) on a Trainer run: the head streamed in chunks of 3 positions × 5 vocabulary
    entries gives the cube of the model's own logits, per token and per tensor included."""
    import json

    import xarray as xr
    from click.testing import CliRunner

    from ckptforce import pipeline
    from ckptforce.cli import main

    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps({"id": f"p{i}", "prompt_ids": [1, 2, 3 + i], "responses": {"chosen": [4, 5, 6, 9], "rejected": [7, 8]}}) + "\n"
                              for i in range(3)))  # fmt: skip
    real, used = pipeline.forces_fn, []

    def unsplit(p):
        return p.model.logits

    def recorded(p):
        used.append(real(p))
        return used[-1]

    cubes = []
    for fn, chunks in ((unsplit, None), (recorded, (3, 5))):
        monkeypatch.setattr(pipeline, "forces_fn", fn)
        if chunks:
            monkeypatch.setattr(pipeline, "head_chunks", lambda budget, **kw: chunks)
        out = tmp_path / f"cube{len(cubes)}.h5"
        r = CliRunner().invoke(main, ["analyze", str(runs["hf"].root), "--probes", str(probes), "-o", str(out), "-q", "--nodes", "1", "--dtype", "float64"])
        assert r.exit_code == 0, r.output
        with xr.open_dataset(out, engine="h5netcdf") as ds:
            cubes.append(ds.load())
    assert used and all(isinstance(f, SplitLM) and (f.positions, f.vocab) == (3, 5) for f in used)
    assert cubes[1].attrs["split_method"] == "backprop factors"  # the factored split added up: no fallback
    for name in ("logp", "logp_tok", "entropy", "top1", "peakiness", "dlogp_obs", "dlogp_lin", "dlogp_lin_tok", "dlogp_path", "dlogp_lin_tensor"):
        _close(torch.from_numpy(cubes[1][name].fillna(0).values), torch.from_numpy(cubes[0][name].fillna(0).values), 1e-9, name)
