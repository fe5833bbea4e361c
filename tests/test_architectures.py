"""The float64 oracles of the force engine over an architecture matrix: GPT-2, Llama, Qwen2 and a LoRA adapter
on Llama (tests/fixtures/archs.py: GQA, RMSNorm, RoPE, SwiGLU, an untied head; Qwen2's q/k/v biases).

Each architecture's run is written once by the real trainers (``transformers.Trainer``, PEFT's
``get_peft_model`` for the adapter; tests/fixtures/arch_runs.py), read back through ckptforce (``open_run``,
``bind``, ``BoundModel.params_from``) and cast to float64. The oracles and their tolerances are the ones the
GPT-2 tests hold (test_forces.py, test_kernels.py, test_attribution.py, test_model.py); the kernels' slow twin and
the SGD step are imported from there, the rest is the same oracle written over the real update Δθ of the run:

    observed log π          the trainer's own model (from_pretrained / PeftModel), each row alone   rel 1e-12
    Δ_lin                   explicit Jacobian (jacrev over the flattened θ), A = I − 1πᵀ as a matrix  rel 1e-9
                            central finite difference                                         rtol 1e-6, atol 1e-9
    JVP vs double VJP, chunked vs whole                                                     rtol 1e-10, atol 1e-12
    split by tensor         sums to Δ_lin; each tensor = the JVP restricted to it        rtol 1e-9, atol 1e-12
    Δ_path                  → Δ_obs as nodes grow; 6 nodes within 1e-9 of max |Δ_obs|; split sums (1e-9)
    kernels                 ghost + per-row against a per-example autograd loop, per tensor            rel 1e-6
    per-example forces      Σ_u −η·A·J·g_u = Δ_lin of a real SGD step (1e-9); gap to Δ_obs is O(η²)
    AdamW step              rebuilt from optimizer.pt and the logged lr = the real Δθ, per tensor     1e-4 × max
    ckptforce analyze       (slow) the cube's Δ_obs, Δ_lin, split = the engine's (1e-9); kernels = the loop (1e-6)

For the LoRA run θ is the base model with the merged adapter, W + scale·BA, and only the adapted weights move;
the per-example forces then differentiate those weights alone (the tensors training moved). Hugging Face's
Llama / Qwen2 code rounds RMSNorm and the attention softmax to float32 even in a float64 model;
``BoundModel.logits`` keeps float64 (``ckptforce.model.keep_float64``), and so do the oracles here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call, jacrev

from ckptforce import open_run
from ckptforce.forces import (
    contributions_by_tensor,
    delta_lin,
    delta_path,
    gradient_kernel,
    interval_forces,
    logp_rows,
    nll_rows,
    observe,
)
from ckptforce.forces.head import SplitLM
from ckptforce.forces.attribution import example_forces
from ckptforce.forces.precondition import Preconditioner, lora_preconditioner, preconditioner
from ckptforce.forces.objectives import response_weights
from ckptforce.model import BoundModel, bind, keep_float64
from fixtures.arch_runs import LORA_TARGETS, MATRIX, VOCAB, train_rows, write_arch_run
from test_attribution import _rows, _sgd_step, observe_rows
from test_forces import _row_logp
from test_kernels import _check_against_loop, _example_grads, _row
from test_model import _id_probes

pytestmark = pytest.mark.filterwarnings("ignore")


@dataclass
class Case:
    """One architecture's run, bound through ckptforce, every checkpoint's θ in float64."""

    arch: str
    root: Path
    base: Path | None  # LoRA: the base model folder
    checkpoints: list[Path | None]  # as the trainer saved them (None: an adapter run's start, the base model)
    model: BoundModel
    thetas: list[dict[str, torch.Tensor]]
    probes: object  # TokenBatch: 4 probes × (chosen, rejected, random)
    probe_file: Path
    moving: list[str]  # tensors the run updates (LoRA: the adapted weights)

    def step(self, k: int = 0) -> dict[str, torch.Tensor]:
        """Δθ of interval k (checkpoint k → k + 1), over the tensors that move."""
        return {n: self.thetas[k + 1][n] - self.thetas[k][n] for n in self.moving}

    def unit_step(self, k: int = 0) -> dict[str, torch.Tensor]:
        """Δθ scaled to max |entry| = 1: the real direction, at the scale of the GPT-2 tests' random directions."""
        step = self.step(k)
        scale = max(float(d.abs().max()) for d in step.values())
        return {n: d / scale for n, d in step.items()}

    def moving_model(self, theta: dict) -> "_Moving":
        """A model whose parameters are the moving tensors only (the rest held at ``theta``)."""
        return _Moving(self.model, {n: p for n, p in theta.items() if n not in self.moving})


class _Moving:
    """``logits(params, batch)`` over the moving tensors, the others fixed."""

    def __init__(self, model: BoundModel, fixed: dict):
        self.model, self.fixed = model, fixed

    def logits(self, params, batch):
        return self.model.logits({**self.fixed, **params}, batch)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread_module):
    """These models are tiny: one intra-op thread (conftest.one_thread_module)."""


@pytest.fixture(scope="module", params=MATRIX)
def case(request, tmp_path_factory) -> Case:
    arch = request.param
    info = write_arch_run(tmp_path_factory.mktemp(arch), arch)
    run = open_run(info.root)
    lora = arch.startswith("lora")
    assert [r.step for r in run.checkpoints] == [0] * lora + [1, 2, 3] and info.steps == [1, 2, 3]
    assert run.layout == ("peft" if lora else "hf")  # an adapter run starts at its base model (B = 0), step 0
    base = info.extra.get("base")
    thetas = []
    for ref in run.checkpoints:
        with run.open(ref) as ckpt:
            if not thetas:
                model = bind(ckpt, run_root=run.root, base_model=base).to("cpu", torch.float64)
            thetas.append(model.params_from(ckpt, dtype=torch.float64))
    assert model.attention == "eager" and model.module.config._attn_implementation == "eager"
    moving = [n for n in thetas[0] if any(bool((t[n] != thetas[0][n]).any()) for t in thetas[1:])]
    folder = tmp_path_factory.mktemp(f"{arch}-probes")
    probes = _id_probes(folder, vocab=VOCAB, n=4)
    return Case(arch, info.root, base, [None] * lora + info.checkpoints, model, thetas, probes, folder / "probes.jsonl", moving)


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    """Four training rows (prompt + completion) cut from the rows the runs trained on."""
    examples = [{"id": f"u{i}", "prompt_ids": p, "responses": {"completion": c}} for i, (p, c) in enumerate(train_rows(4))]
    return _rows(tmp_path_factory.mktemp("train"), examples)


# ------------------------------------------------------------------------------------------------------------
# binding: the matrix is what it claims, and θ is the trainer's model


def test_bound_model_is_the_trainers_model(case):
    """log π of every probe row at every checkpoint equals the model loaded the trainer's own way
    (``from_pretrained``; ``PeftModel`` over the base for the adapter), each row alone and unpadded."""
    from transformers import AutoModelForCausalLM

    cfg, module = case.model.module.config, case.model.module
    tied = module.lm_head.weight is module.get_input_embeddings().weight
    if case.arch == "gpt2":
        assert tied and cfg.model_type == "gpt2" and "lm_head.weight" not in case.thetas[0]  # tied: listed once
    else:  # the shapes the matrix is about
        assert not tied and "lm_head.weight" in case.thetas[0] and "model.embed_tokens.weight" in case.thetas[0]
        assert cfg.num_key_value_heads < cfg.num_attention_heads and cfg.hidden_act == "silu"
        assert type(module.model.norm).__name__.endswith("RMSNorm")
        assert (cfg.model_type == "qwen2") == any(n.endswith("q_proj.bias") for n in case.thetas[0])
    if case.arch == "lora-llama":
        targets = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(cfg.num_hidden_layers) for m in LORA_TARGETS]
        assert sorted(case.moving) == sorted(targets)
    else:
        assert case.moving == list(case.thetas[0])
    for ref, theta in zip(case.checkpoints, case.thetas):
        obs = observe(case.model.logits, theta, case.probes)
        if case.base is not None and ref is None:  # the adapter run's start: the base model itself (B = 0)
            direct = AutoModelForCausalLM.from_pretrained(case.base)
        elif case.base is not None:
            from peft import PeftModel

            direct = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(case.base), ref)
        else:
            direct = AutoModelForCausalLM.from_pretrained(ref)
        direct = direct.double().eval()  # its default (SDPA) attention; LoRA unmerged: W x + scale·B A x
        own = SimpleNamespace(module=direct)
        own_params = dict(direct.named_parameters())
        with keep_float64():  # Llama's RMSNorm and softmax would round to float32
            want = torch.stack([_row_logp(own, own_params, case.probes, b) for b in range(len(case.probes))])
        torch.testing.assert_close(obs.logp, want.detach(), rtol=1e-12, atol=0, msg=f"{case.arch} {ref}")


# ------------------------------------------------------------------------------------------------------------
# Δ_lin, its split by tensor, Δ_path


def _explicit_delta_lin(model: BoundModel, theta: dict, batch, v: dict) -> torch.Tensor:
    """(B,) Σ_t e_yᵀ A_t J_t v per row alone and unpadded: J_t = ∂z_t/∂θ by ``jacrev`` over the flattened moving
    tensors at the row's response positions, A_t = I − 1π_tᵀ as a matrix."""
    names = list(v)
    sizes = [theta[n].numel() for n in names]
    flat = torch.cat([theta[n].flatten() for n in names])
    v_flat = torch.cat([v[n].flatten() for n in names])
    out = []
    for b in range(len(batch)):
        n = int(batch.attention_mask[b].sum())
        ids = batch.input_ids[b : b + 1, :n]
        pos = batch.target_mask[b, :n].nonzero().flatten()

        def z(t):
            parts = {**theta, **{k: x.view(theta[k].shape) for k, x in zip(names, t.split(sizes))}}
            return functional_call(model.module, parts, (ids,)).logits[0, pos]  # (m, V)

        with keep_float64():  # as BoundModel.logits does for float64 parameters
            jac = jacrev(z)(flat)  # (m, V, P)
            dz, logits = jac @ v_flat, z(flat)
        total = 0.0
        for i, t in enumerate(pos):
            pi = torch.softmax(logits[i], -1)
            a_term = torch.eye(len(pi), dtype=pi.dtype) - torch.ones(len(pi), 1, dtype=pi.dtype) @ pi[None, :]  # (V, V)
            total += float((a_term @ dz[i])[ids[0, t + 1]])
        out.append(total)
    return torch.tensor(out, dtype=torch.float64)


def test_delta_lin_equals_explicit_jacobian_and_finite_difference(case):
    """Forward-mode AD (``method="jvp"``, no fallback) through RoPE, RMSNorm, GQA and SwiGLU, along the run's
    own update direction."""
    theta, v, fn, batch = case.thetas[0], case.unit_step(0), case.model.logits, case.probes
    lin = delta_lin(fn, theta, batch, v, method="jvp")
    assert lin.method == "jvp"
    want = _explicit_delta_lin(case.model, theta, batch, v)
    for b in range(len(batch)):
        assert float(lin.total[b]) == pytest.approx(float(want[b]), rel=1e-9), (case.arch, batch.rows[b])
    eps = 1e-6  # as in test_forces: truncation and rounding both far below the tolerance

    def moved(sign):
        return observe(fn, {n: p + sign * eps * v[n] if n in v else p for n, p in theta.items()}, batch)

    plus, minus = moved(1), moved(-1)
    torch.testing.assert_close(lin.total, (plus.logp - minus.logp) / (2 * eps), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(lin.argmax, (plus.argmax_logp - minus.argmax_logp) / (2 * eps), rtol=1e-6, atol=1e-9)


def test_jvp_double_vjp_and_chunks_agree(case):
    theta, v, fn, batch = case.thetas[1], case.unit_step(1), case.model.logits, case.probes
    a = delta_lin(fn, theta, batch, v, method="jvp")
    b = delta_lin(fn, theta, batch, v, method="double_vjp")
    assert (a.method, b.method) == ("jvp", "double_vjp")
    torch.testing.assert_close(a.tok, b.tok, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(a.argmax, b.argmax, rtol=1e-10, atol=1e-12)
    one_by_one = delta_lin(fn, theta, batch, v, chunk_size=1)  # each row unpadded: padding and positions
    torch.testing.assert_close(one_by_one.total, a.total, rtol=1e-10, atol=1e-12)


def test_split_by_tensor_sums_to_whole_and_matches_restricted_jvp(case, monkeypatch):
    """Every tensor's share (per-row gradients by vmap) equals the JVP restricted to that tensor alone."""
    from ckptforce.forces import linear

    theta, v, fn, batch = case.thetas[0], case.unit_step(0), case.model.logits, case.probes
    names, contrib, contrib_star = contributions_by_tensor(fn, theta, batch, v, chunk_size=4)
    assert names == list(v)
    lin = delta_lin(fn, theta, batch, v)
    torch.testing.assert_close(contrib.sum(1), lin.total, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(contrib_star.sum(1), lin.argmax, rtol=1e-9, atol=1e-12)
    for k, name in enumerate(names):
        only = delta_lin(fn, theta, batch, {name: v[name]})
        assert float(only.total.abs().max()) > 0, f"{case.arch} {name}: no share, the comparison would prove nothing"
        torch.testing.assert_close(contrib[:, k], only.total, rtol=1e-9, atol=1e-12, msg=f"{case.arch} {name}")
    # the vmap path ran (a model vmap refuses would silently take the slow path), and the slow path agrees
    moving = {n: theta[n] for n in v}
    fixed = {n: p for n, p in theta.items() if n not in v}
    linear._vmapped_row_grads(fn, fixed, moving, batch.select([0, 1]))

    def refuse(*args, **kwargs):
        raise RuntimeError("vmap: data-dependent control flow")

    monkeypatch.setattr(linear, "_vmapped_row_grads", refuse)
    _, slow, slow_star = contributions_by_tensor(fn, theta, batch, v, chunk_size=4)
    torch.testing.assert_close(slow, contrib, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(slow_star, contrib_star, rtol=1e-10, atol=1e-13)


def test_factored_split_equals_the_per_row_split(case):
    """The split from backprop factors (module output gradients × each module's own tangent) equals the per-row
    gradients' split per tensor, for y and y*; in chunks of rows as in one; and the factored path (no JVP at the
    nodes) equals the JVP path, per tensor and in total."""
    theta, v, fn, batch, module = case.thetas[0], case.unit_step(0), case.model.logits, case.probes, case.model.module
    names, rows, rows_star = contributions_by_tensor(fn, theta, batch, v, chunk_size=4)
    names_f, fact, fact_star = contributions_by_tensor(fn, theta, batch, v, module=module)
    assert names_f == names
    for k, name in enumerate(names):
        torch.testing.assert_close(fact[:, k], rows[:, k], rtol=1e-9, atol=1e-12, msg=f"{case.arch} {name}")
        torch.testing.assert_close(fact_star[:, k], rows_star[:, k], rtol=1e-9, atol=1e-12, msg=f"{case.arch} {name} (y*)")
    _, chunked, chunked_star = contributions_by_tensor(fn, theta, batch, v, module=module, factored_chunk=2)
    torch.testing.assert_close(chunked, fact, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked_star, fact_star, rtol=1e-12, atol=1e-14)
    before, step = case.thetas[1], case.step(1)
    jvp_path = delta_path(fn, before, batch, step, nodes=2, by_tensor=True)
    fact_path = delta_path(fn, before, batch, step, nodes=2, by_tensor=True, module=module)
    for got, want in ((fact_path.total, jvp_path.total), (fact_path.argmax, jvp_path.argmax), (fact_path.by_tensor, jvp_path.by_tensor)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=case.arch)


def test_a_misread_factored_split_falls_back_to_the_per_row_one(case, monkeypatch):
    """The factored split is checked against the JVP (Σ_k C = Δ_lin); a module it misreads sends the interval
    to the per-row split, whose numbers the cube then holds."""
    from ckptforce.forces import factored

    fn, batch, module = case.model.logits, case.probes, case.model.module
    before, after = case.thetas[1], case.thetas[2]
    want = interval_forces(fn, before, after, batch, nodes=0, by_tensor=True)
    real = factored._tangent
    monkeypatch.setattr(factored, "_tangent", lambda *a: None if (t := real(*a)) is None else 1.5 * t)
    got = interval_forces(fn, before, after, batch, nodes=0, by_tensor=True, module=module)
    torch.testing.assert_close(got.lin_by_tensor, want.lin_by_tensor, rtol=1e-10, atol=1e-13)


def test_path_attribution_converges_to_observed_change(case):
    """A real step of the run (its second AdamW step, checkpoint 2 → 3): more nodes, smaller gap to Δ_obs."""
    fn, batch = case.model.logits, case.probes
    before, after, step = case.thetas[1], case.thetas[2], case.step(1)
    observed = observe(fn, after, batch).logp - observe(fn, before, batch).logp
    lin = delta_lin(fn, before, batch, step).total
    errors = []
    for n in (1, 2, 3, 4, 6):
        path = delta_path(fn, before, batch, step, nodes=n)
        errors.append(float((path.total - observed).abs().max()))
    assert errors == sorted(errors, reverse=True), (case.arch, errors)
    assert errors[0] < float((lin - observed).abs().max()), case.arch
    assert errors[-1] < 1e-9 * float(observed.abs().max()), (case.arch, errors)
    by = delta_path(fn, before, batch, step, nodes=4, by_tensor=True)
    torch.testing.assert_close(by.by_tensor.sum(1), by.total, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(by.by_tensor.sum(1), observed, rtol=0, atol=1e-7)


def test_interval_forces_ties_the_pieces_together(case):
    fn, batch = case.model.logits, case.probes
    before, after = case.thetas[1], case.thetas[2]
    res = interval_forces(fn, before, after, batch, nodes=4, by_tensor=True)
    assert res.method == "jvp"
    moved = [n for j, n in enumerate(res.tensor_names) if float(res.lin_by_tensor[:, j].abs().max()) > 0]
    assert sorted(moved) == sorted(case.moving), case.arch
    torch.testing.assert_close(res.dlogp_obs, observe(fn, after, batch).logp - observe(fn, before, batch).logp)
    torch.testing.assert_close(res.lin_by_tensor.sum(1), res.dlogp_lin, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.path_by_tensor.sum(1), res.dlogp_path, rtol=1e-9, atol=1e-12)
    assert float(res.path_gap.abs().max()) < 1e-7 < float(res.remainder.abs().max()), case.arch
    assert 0 < res.remainder_ratio < 1, (case.arch, res.remainder_ratio)


# ------------------------------------------------------------------------------------------------------------
# probe × training-example kernels


def test_ghost_kernel_equals_the_loop_per_tensor(case, train, monkeypatch):
    """Every tensor: Linear / Embedding weights (and Qwen2's q/k/v biases, GPT-2's shared position table) by ghost
    products, RMSNorm / LayerNorm per row in closed form from the same pass (no vmap'd pass); an untied lm_head is
    its own ghost tensor, one use."""
    from ckptforce.forces import ghost
    from ckptforce.forces.ghost import row_grads
    from ckptforce.forces.kernels import logp_rows

    model, theta = case.model, case.thetas[1]
    probes = case.probes.select([0, 4, 8, 10])
    with monkeypatch.context() as m:
        if not case.arch.startswith("lora"):  # PEFT's layers are not plain Linear: their tensors take the vmap'd pass
            m.setattr(ghost, "_per_row_grads", lambda *a, **k: pytest.fail("a vmap'd per-row pass"))
        res, _, _ = _check_against_loop(model, theta, probes, train)  # per tensor: rel 1e-6 of the loop's max; norms
    norms = {n for n in theta if "norm" in n or ".ln_" in n}
    assert norms and norms <= set(res.per_row), case.arch
    linear = {n for n, p in theta.items() if n not in norms}
    assert set(res.ghost) == linear, (case.arch, set(res.ghost) ^ linear)
    if case.arch != "gpt2":
        grads = row_grads(model.logits, theta, probes, logp_rows, module=model.module)
        assert len(grads.factors["lm_head.weight"]) == 1 and len(grads.factors["model.embed_tokens.weight"]) == 1
    plain = gradient_kernel(model.logits, theta, probes, train, module=model.module, ghost=False)
    assert plain.ghost == [] and len(plain.per_row) == len(theta)
    scale = float(res.k.abs().max())
    torch.testing.assert_close(plain.k, res.k, rtol=1e-10, atol=1e-12 * scale)
    for products in ("formed", "auto"):
        other = gradient_kernel(model.logits, theta, probes, train, module=model.module, products=products)
        torch.testing.assert_close(other.k, res.k, rtol=1e-10, atol=1e-12 * scale)
        torch.testing.assert_close(other.probe_norm, res.probe_norm, rtol=1e-10, atol=0)


# ------------------------------------------------------------------------------------------------------------
# per-example forces, and the optimizer's step


def _three_examples(objective: str, folder: Path):
    """(rows, owner of each row): three of the runs' training rows as SFT examples, or as preference pairs whose
    rejected answer is the chosen one reversed."""
    rows = train_rows(3)
    if objective == "sft":
        examples = [{"id": f"u{i}", "prompt_ids": p, "responses": {"completion": c}} for i, (p, c) in enumerate(rows)]
    else:
        examples = [{"id": f"u{i}", "prompt_ids": p, "responses": {"chosen": c, "rejected": c[::-1][:3]}}
                    for i, (p, c) in enumerate(rows)]  # fmt: skip
    train = _rows(folder, examples)
    return train, [i for i, _ in train.rows]


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_sum_of_example_forces_equals_delta_lin_for_an_sgd_step(case, objective, tmp_path):
    """test_attribution's oracle over the moving tensors: one plain SGD step on three examples."""
    params = {n: case.thetas[1][n] for n in case.moving}
    model = case.moving_model(case.thetas[1])
    train, owners = _three_examples(objective, tmp_path)
    lengths = train.target_mask.sum(1).double()
    logp = observe_rows(model, params, train).detach()
    if objective == "sft":
        weights = response_weights("sft", logp[:, None], lengths=lengths[:, None])[:, 0]
    else:
        ref = logp.view(3, 2) - torch.tensor([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.0]], dtype=torch.float64)
        weights = response_weights("dpo", logp.view(3, 2), ref_logp=ref, beta=0.5).flatten()
    eta, n_ex = 0.002, 3
    after = _sgd_step(model, params, train, owners, weights, eta, n_ex)
    step = {n: after[n] - params[n] for n in params}
    lin = delta_lin(model.logits, params, case.probes, step)
    sgd = Preconditioner("sgd", None, None, None)

    def coeff(e):
        return torch.full((n_ex,), e / n_ex, dtype=torch.float64)

    forces = example_forces(model.logits, params, case.probes, train, owners, weights, coeff(eta), sgd)
    torch.testing.assert_close(forces.total.sum(0), lin.total, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(forces.pos_argmax.sum(0) + forces.neg_argmax.sum(0), lin.argmax, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(forces.pos_tok + forces.neg_tok, lin.tok, rtol=1e-9, atol=1e-12)
    if objective == "dpo":
        assert forces.neg.abs().sum() > 0 and forces.pos.abs().sum() > 0
    else:
        assert forces.neg.abs().sum() == 0 < forces.pos.abs().sum()
    gaps = []
    for e in (eta, eta / 2):  # first order: halving η quarters the gap to the observed change
        moved = _sgd_step(model, params, train, owners, weights, e, n_ex)
        obs = observe(model.logits, moved, case.probes).logp - observe(model.logits, params, case.probes).logp
        f = example_forces(model.logits, params, case.probes, train, owners, weights, coeff(e), sgd)
        gaps.append(float((obs - f.total.sum(0)).abs().max()))
    assert 3.0 < gaps[0] / gaps[1] < 5.0, (case.arch, gaps)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_example_forces_from_captured_factors_equal_one_jvp_per_example(case, objective, tmp_path):
    """The fast path of the per-example forces (one capture of the probe rows, each δθ_u contracted with it)
    equals one JVP per example — totals, y*, and the per-token split — under a random elementwise P, in chunks."""
    theta = case.thetas[1]
    train, owners = _three_examples(objective, tmp_path)
    gen = torch.Generator().manual_seed(1)
    weights = torch.rand(len(owners), generator=gen, dtype=torch.float64) + 0.5
    weights[1::2] *= -1  # both signs, so that both parts are checked
    scale = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) * (n in case.moving) for n, p in theta.items()}
    pre = Preconditioner("adam", scale, None, None)
    coeff = torch.tensor([1e-3, 2e-3, 0.5e-3], dtype=torch.float64)
    fn = case.model.logits
    slow = example_forces(fn, theta, case.probes, train, owners, weights, coeff, pre, own=True)
    ways = {  # the per-example contraction; the batched linear layers (the other tensors' gradients from the block's capture
        # unless own=True asks for each example's whole gradient), all examples in one block or one per block in small pieces
        "factors": dict(batched=False, own=True), "factors (batched)": dict(own=False), "factors (batched) ": dict(train_chunk=2, elements=4096, own=True),
    }  # fmt: skip
    head = case.model.head()
    kept = SplitLM(fn, case.model.body, *head) if head else fn  # the head's π kept for the contractions (forces/head_directional)
    streamed = SplitLM(fn, case.model.body, *head, positions=3, vocab=24) if head else fn  # too big to keep: the statistics each time
    for chunk, fn in ((None, fn), (5, fn), (None, kept), (5, streamed)):
        for method, extra in ways.items():
            fast = example_forces(fn, theta, case.probes, train, owners, weights, coeff, pre, module=case.model.module, chunk_size=chunk, **extra)
            assert fast.method == method.strip() and slow.method == "jvp"
            for name in ("pos", "neg", "pos_argmax", "neg_argmax", "pos_tok", "neg_tok") + (("own_pos", "own_neg") if extra["own"] else ()):
                want = getattr(slow, name)
                torch.testing.assert_close(getattr(fast, name), want, rtol=1e-9, atol=1e-12 * float(want.abs().max()) + 1e-300,
                                           msg=lambda m: f"{case.arch} {method} {name}: {m}")  # fmt: skip
    assert float(slow.neg.abs().max()) > 0 and float(slow.pos.abs().max()) > 0


@pytest.mark.parametrize("chunk", [None, 5])
def test_batched_forces_capture_each_training_row_once(case, chunk, tmp_path, monkeypatch):
    """The blocks of training rows are the outer loop: every training row is captured once, in its block, and the
    probe rows once per block (once in all when one chunk holds them, plus the first chunk read for the set-up)."""
    import ckptforce.forces.attribution as attribution

    theta = case.thetas[1]
    train, owners = _three_examples("dpo", tmp_path)
    weights = torch.tensor([0.7, -0.4, 1.1, -0.9, 0.5, -1.3], dtype=torch.float64)
    pre = Preconditioner("sgd", None, None, None)
    coeff = torch.tensor([1e-3, 2e-3, 0.5e-3], dtype=torch.float64)
    seen, real = [], attribution.capture
    monkeypatch.setattr(attribution, "capture", lambda fn, found, params, sub, **kw: seen.append((kw.get("star", True), len(sub))) or real(fn, found, params, sub, **kw))
    forces = example_forces(case.model.logits, theta, case.probes, train, owners, weights, coeff, pre, module=case.model.module, chunk_size=chunk,
                            train_chunk=4)  # fmt: skip
    assert forces.method == "factors (batched)"
    blocks, pieces = 3 * 2 // 4 + 1, -(-len(case.probes) // (chunk or len(case.probes)))  # two pairs, then one
    assert [n for star, n in seen if not star] == [4, 2]  # each training row once
    probe = [n for star, n in seen if star]
    assert len(probe) == (1 if pieces == 1 else 1 + blocks * pieces) and sum(probe[1:]) == (0 if pieces == 1 else blocks * len(case.probes)), probe
    assert pieces > 1 or chunk is None


def test_approximate_forces_are_exact_for_a_rank_one_preconditioner(case, tmp_path, monkeypatch):
    """forces/approx.py: with P = r cᵀ on every matrix (any P on vectors) the ghost products with scaled factors
    equal one JVP per example (1e-9), totals and y*; with a general P they are an approximation whose error is
    what ``relative_error`` reports (finite, and not 0)."""
    from ckptforce.forces import approx as approx_mod
    from ckptforce.forces.approx import approximate_forces, relative_error
    from ckptforce.forces.ghost import row_grads_each

    theta = case.thetas[1]
    train, owners = _three_examples("dpo", tmp_path)
    gen = torch.Generator().manual_seed(2)
    weights = torch.tensor([0.7, -0.4, 1.1, -0.9, 0.5, -1.3], dtype=torch.float64)
    coeff = torch.tensor([1e-3, 2e-3, 0.5e-3], dtype=torch.float64)
    names = list(case.moving)

    def draw(shape):
        if len(shape) == 2:
            return (torch.rand(shape[0], 1, generator=gen, dtype=torch.float64) + 0.1) * (torch.rand(1, shape[1], generator=gen, dtype=torch.float64) + 0.1)
        return torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1

    fn, module = case.model.logits, case.model.module
    for rank_one in (True, False):
        scale = {n: draw(theta[n].shape) if rank_one else torch.rand(theta[n].shape, generator=gen, dtype=torch.float64) + 0.1 for n in names}
        scale.update({n: torch.zeros_like(p) for n, p in theta.items() if n not in names})
        exact = example_forces(fn, theta, case.probes, train, owners, weights, coeff, Preconditioner("adam", scale, None, None))
        pos, neg, pos_star, neg_star, fitted = approximate_forces(fn, theta, case.probes, train, owners, weights, coeff,
                                                                  {n: scale[n] for n in names}, module=module, names=names)  # fmt: skip
        assert fitted, case.arch
        if rank_one:
            for got, want in ((pos, exact.pos), (neg, exact.neg), (pos_star, exact.pos_argmax), (neg_star, exact.neg_argmax)):
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()), msg=lambda m: f"{case.arch}: {m}")
            # in chunks of half of 3 rows: the probe rows' factors held, or (no room) captured again for every chunk
            for held_bytes, blocks in ((None, 6), (0, 6)):
                seen = []
                chunked = approximate_forces(fn, theta, case.probes, train, owners, weights, coeff, {n: scale[n] for n in names}, module=module,
                                             names=names, chunk_size=3, held_bytes=held_bytes, progress=lambda done, total: seen.append(done))  # fmt: skip
                assert seen == [6 // blocks * (i + 1) for i in range(blocks)], (held_bytes, seen)
                for got, want in zip(chunked[:4], (pos, neg, pos_star, neg_star)):
                    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13 * float(want.abs().max()))
            # probes not held, but room for every training chunk (sizes counted in rows, 12 probe rows): one block, so every probe
            # chunk is captured once for it (plus the first chunk's estimate), not once per training chunk
            captures = []
            monkeypatch.setattr(approx_mod, "_nbytes", lambda g: float(g.n))
            monkeypatch.setattr(approx_mod, "row_grads_each", lambda *a, **k: captures.append(1) or row_grads_each(*a, **k))
            seen = []
            gathered = approximate_forces(fn, theta, case.probes, train, owners, weights, coeff, {n: scale[n] for n in names}, module=module,
                                          names=names, chunk_size=3, held_bytes=len(case.probes) - 0.5, progress=lambda done, total: seen.append(done))  # fmt: skip
            monkeypatch.undo()
            assert len(case.probes) == 12 and seen == [6] and len(captures) == 1 + len(case.probes), (seen, len(captures))
            for got, want in zip(gathered[:4], (pos, neg, pos_star, neg_star)):
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13 * float(want.abs().max()))
        else:
            err = relative_error(pos + neg, exact.total)
            assert 0 < err < 10, (case.arch, err)


def check_lora_adamw_steps(run, thetas: list[dict]) -> None:
    """An adapter run's AdamW steps on the factors, mapped to W (``lora_preconditioner``): for every interval and
    adapted weight, −η·P·g + momentum + decay of the factors (g from the two saved first moments) seen from W,
    plus the second-order s·δL·δR of the real factor steps, is the real ΔW of the merged weights; the frozen
    base tensors do not move. The first interval starts at the base model (B = 0, no optimizer state)."""
    from ckptforce.training_forces import adapter_factors, interval_lr

    checked = set()
    for k, (a, b) in enumerate(zip(run.checkpoints[:-1], run.checkpoints[1:])):
        with run.open(a) as ca, run.open(b) as cb:
            start, end = ca.optimizer(), cb.optimizer()
            trained, after = adapter_factors(ca, thetas[k]), adapter_factors(cb, thetas[k + 1])
        assert end.kind == "adam" and end.unmapped == 0 and set(end.per_param) == {n for f in trained.values() for n in (f.left_name, f.right_name)}
        assert (start is None) == (k == 0) and a.step_source == ("init" if k == 0 else "record")
        lr = interval_lr(run, k)
        pre = lora_preconditioner(thetas[k], trained, start=start, end=end, lr=lr, n_steps=b.step - a.step)
        assert pre.kind == "adam on LoRA factors" and set(pre.lora) == set(trained)
        assert all(float(pre.scale[n].abs().max()) == 0 for n in thetas[k] if n not in trained)  # the base is frozen
        group = {n: gr for gr in end.groups for n in gr["names"]}
        for name, f in pre.lora.items():
            moves = []
            for key in (f.left_name, f.right_name):
                b1 = group[key]["betas"][0]
                m1 = end.per_param[key]["exp_avg"].double()
                m0 = start.per_param[key]["exp_avg"].double() if start is not None else torch.zeros_like(m1)
                moves.append(f.stored((m1 - b1 * m0) / (1 - b1)))  # the factor's batch gradient, W's orientation
            d_left, d_right = -lr * f.p_left * moves[0], -lr * f.p_right * moves[1]
            first_order = f.to_weight(d_left, d_right) + (pre.momentum or {}).get(name, 0) + (pre.decay or {}).get(name, 0)
            true_left, true_right = after[name].left - f.left, after[name].right - f.right
            delta = thetas[k + 1][name] - thetas[k][name]
            rebuilt = first_order + f.scale * true_left @ true_right
            if k == 0:  # A at step 0 was not saved (the first adapter's A stands in): check B's step from 0 alone
                b_pred, b_true, a_true = (d_right, true_right, true_left) if f.transposed else (d_left, true_left, true_right)
                assert float(a_true.abs().max()) == 0 and float(b_true.abs().max()) > 0
                assert float((b_pred - b_true).abs().max()) <= 1e-4 * float(b_true.abs().max()), (name, k)
                continue
            tol = 1e-4 * float(delta.abs().max())
            assert float((rebuilt - delta).abs().max()) <= tol, (name, k, float((rebuilt - delta).abs().max()), tol)
            checked.add(name)
    assert checked == set(pre.lora)


def test_lora_preconditioner_is_the_factor_jacobian_around_p(case):
    """P_W g = J diag(P_L, P_R) Jᵀ g with J = ∂W/∂(L, R) at θ_t (W = W_base + s·L R): the closed form against
    torch.func's vjp / jvp through the adapter's own parametrisation, for a random ∇_W."""
    if case.arch != "lora-llama":
        pytest.skip("an adapter run only")
    from ckptforce.training_forces import adapter_factors

    run = open_run(case.root)
    with run.open(run.checkpoints[2]) as ca, run.open(run.checkpoints[3]) as cb:
        trained, state = adapter_factors(ca, case.thetas[2]), cb.optimizer()
    pre = lora_preconditioner(case.thetas[2], trained, end=state, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for name, f in pre.lora.items():
        g = torch.randn(case.thetas[2][name].shape, generator=gen, dtype=torch.float64)
        merged = lambda left, right: f.scale * left @ right  # noqa: E731 - W − W_base as a function of the factors
        _, pull = torch.func.vjp(merged, f.left, f.right)
        g_left, g_right = pull(g)
        _, want = torch.func.jvp(merged, (f.left, f.right), (f.p_left * g_left, f.p_right * g_right))
        torch.testing.assert_close(pre.apply({name: g})[name], want, rtol=1e-12, atol=1e-15)
        assert float(f.p_left.abs().max()) > 0 and float(f.p_right.abs().max()) > 0


def test_adamw_step_rebuilt_from_optimizer_state_and_logged_lr_equals_real_update(case):
    """optimizer.pt mapped back to names (decay / no-decay groups: RMSNorm and biases without decay, an untied
    lm_head of its own), the lr from trainer_state.json: P·g + momentum + decay = the real Δθ, per tensor."""
    from ckptforce.updates import update_anatomy

    run = open_run(case.root)
    if case.arch == "lora-llama":
        check_lora_adamw_steps(run, case.thetas)
        return
    lrs = {(iv.step_from, iv.step_to): iv.lr for iv in update_anatomy(run).intervals}
    checked = set()
    for a, b in zip(run.checkpoints[:-1], run.checkpoints[1:]):
        with run.open(a) as ca, run.open(b) as cb:
            start, end = ca.optimizer(), cb.optimizer()
            theta = {n: ca.tensor(n).double() for n in ca.names()}
            delta = {n: cb.tensor(n).double() - theta[n] for n in theta}
        assert end.kind == "adam" and end.unmapped == 0 and "Trainer decay/no-decay groups" in end.mapping
        lr = lrs[(a.step, b.step)]
        pre = preconditioner(theta, start=start, end=end, lr=lr, n_steps=b.step - a.step)
        group = {n: gr for gr in end.groups for n in gr["names"]}
        assert set(group) == set(theta)
        no_decay = {n for n in theta if group[n]["weight_decay"] == 0}
        assert no_decay == {n for n in theta if "norm" in n or ".ln_" in n or n.endswith(".bias")}, (case.arch, no_decay)
        for name in theta:
            b1 = group[name]["betas"][0]
            m0, m1 = (s.per_param[name]["exp_avg"].double() for s in (start, end))
            grad = (m1 - b1 * m0) / (1 - b1)  # the batch gradient of this step, from the two saved states
            rebuilt = -lr * pre.scale[name] * grad + pre.momentum[name] + pre.decay.get(name, torch.zeros_like(grad))
            scale = float(delta[name].abs().max())
            assert float((rebuilt - delta[name]).abs().max()) <= 1e-4 * scale + 1e-9, (case.arch, a.step, name)
            checked.add(name)
    assert checked == set(case.thetas[0]) and not math.isnan(lr)


# ------------------------------------------------------------------------------------------------------------
# the pipeline on each run


@pytest.mark.slow  # about 4 s per architecture: the whole pipeline, kernels at three checkpoints
def test_analyze_with_training_examples_matches_the_oracles(case, train, tmp_path):
    """``ckptforce analyze --train --dtype float64`` on the run: the cube's Δ_obs, Δ_lin and its split by tensor are
    the force engine's on the same rows (the split by per-row gradients, per tensor), the force budget closes,
    and the kernel of a few pairs equals the per-example loop."""
    import json

    import xarray as xr
    from click.testing import CliRunner

    from ckptforce.cli import main

    train_file = tmp_path / "train.jsonl"  # the rows of the ``train`` fixture, in TRL's prompt + completion form
    lines = [{"id": f"u{i}", "prompt_ids": p, "completion": c} for i, (p, c) in enumerate(train_rows(4))]
    train_file.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "cube.h5"
    args = ["analyze", str(case.root), "--probes", str(case.probe_file), "--train", str(train_file), "-o", str(out), "-q",
            "--dtype", "float64"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    fn = case.model.logits
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds.sizes["interval"] == len(case.thetas) - 1 and ds.sizes["source"] == 4 + 2
        assert ds.attrs["preconditioner"] == ("adam on LoRA factors" if case.arch == "lora-llama" else "adam"), ds.attrs["preconditioner"]
        for k in range(len(case.thetas) - 1):
            lin = delta_lin(fn, case.thetas[k], case.probes, case.step(k)).total
            obs = observe(fn, case.thetas[k + 1], case.probes).logp - observe(fn, case.thetas[k], case.probes).logp
            rows = [(f"p{o}", r) for o, r in case.probes.rows]

            def pick(name, **at):
                values = ds[name].isel(interval=k)
                return torch.tensor([float(values.sel(probe=o, response=r, **at)) for o, r in rows], dtype=torch.float64)

            torch.testing.assert_close(pick("dlogp_lin"), lin, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(pick("dlogp_obs"), obs, rtol=1e-9, atol=1e-12)
            names, split, _ = contributions_by_tensor(fn, case.thetas[k], case.probes, case.step(k))  # per-row gradients
            for j, name in enumerate(names):
                torch.testing.assert_close(pick("dlogp_lin_tensor", tensor=name), split[:, j], rtol=1e-9, atol=1e-12,
                                           msg=lambda m: f"{case.arch} interval {k} {name}: {m}")  # fmt: skip
        budget = (ds["force"].sum("source") + ds["dlogp_unexplained"]).values
        assert abs(budget - ds["dlogp_lin"].values).max() <= 1e-9 * abs(ds["dlogp_lin"].values).max()
        assert float(abs(ds["force"].isel(source=slice(0, 4))).max()) > 0
        kernel = ds["kernel"].isel(checkpoint=0)
        chosen = case.probes.select([b for b, (_, r) in enumerate(case.probes.rows) if r == "chosen"])
        go = _example_grads(fn, case.thetas[0], chosen, _row(logp_rows))
        gu = _example_grads(fn, case.thetas[0], train, _row(nll_rows))
        lengths = train.target_mask.sum(1).double()
        logp = observe_rows(case.model, case.thetas[0], train)[:, None]
        w = response_weights("sft", logp, lengths=lengths[:, None])[:, 0]  # TRL's mean over tokens: 1/|y|
        for o, u in [(0, 0), (1, 3), (3, 2)]:  # K[o, u] = ⟨∇ log π(y_o|x_o), ∇ w_u·(−log π(y_u|x_u))⟩
            want = float(w[u]) * sum(float((go[o][n] * gu[u][n]).sum()) for n in go[o])
            assert float(kernel.isel(probe=o, source=u)) == pytest.approx(want, rel=1e-6), (case.arch, o, u)
