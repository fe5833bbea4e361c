"""Oracle tests for G per objective and the per-example force attribution (float64, tiny seeded models),
and an AdamW step rebuilt from a real Trainer's optimizer.pt and logged lr against the real Δθ."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ckptforce.forces import delta_lin, observe
from ckptforce.forces.attribution import direction_force, example_forces
from ckptforce.forces.precondition import Preconditioner, preconditioner
from ckptforce.forces.objectives import loss, residual, response_weights
from ckptforce.probes import load_probe_set, make_batch, tokenize
from test_forces import _gpt2, _params, batch  # noqa: F401 - the probe-batch fixture

pytestmark = pytest.mark.filterwarnings("ignore")


def _rows(tmp_path, examples: list[dict], name="rows.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(x) for x in examples) + "\n")
    return make_batch(tokenize(load_probe_set(path)))


# --- G = w·R equals autograd of each objective's loss w.r.t. the logits ---------------------------------


@pytest.mark.parametrize("objective", ["sft", "unlearn", "dpo", "ipo", "simpo", "grpo"])
def test_g_equals_autograd_of_the_loss_wrt_logits(objective):
    torch.manual_seed(0)
    n_ex, n_resp, T, V = 3, (1 if objective in ("sft", "unlearn") else 4 if objective == "grpo" else 2), 5, 7
    logits = torch.randn(n_ex, n_resp, T, V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (n_ex, n_resp, T))
    lengths = torch.randint(2, T + 1, (n_ex, n_resp))
    mask = torch.arange(T)[None, None, :] < lengths[..., None]
    ref = torch.randn(n_ex, n_resp, dtype=torch.float64) * 3 - 8
    rewards = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 0]], dtype=torch.float64)[:, :n_resp]
    kw = {"ref_logp": ref, "lengths": lengths.double(), "rewards": rewards, "beta": 0.3}
    logp = (torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1) * mask).sum(-1)  # (U, R)
    (autograd,) = torch.autograd.grad(loss(objective, logp, **kw).sum(), logits)
    w = response_weights(objective, logp.detach(), **kw)  # (U, R)
    g = w[..., None, None] * residual(logits.detach().flatten(0, 1), targets.flatten(0, 1), mask.flatten(0, 1)).view_as(logits)
    torch.testing.assert_close(g, autograd, rtol=1e-10, atol=1e-12)
    if objective in ("dpo", "ipo", "simpo") and objective != "ipo":
        assert (w[:, 0] > 0).all() and (w[:, 1] < 0).all(), "preferences pull chosen up and push rejected down"


def test_dpo_weight_is_beta_sigmoid_of_minus_beta_margin():
    logp = torch.tensor([[-3.0, -5.0]], dtype=torch.float64)
    ref = torch.tensor([[-4.0, -4.0]], dtype=torch.float64)
    w = response_weights("dpo", logp, ref_logp=ref, beta=0.5)
    h = (-3 + 4) - (-5 + 4)  # 2
    expected = 0.5 / (1 + math.exp(0.5 * h))
    torch.testing.assert_close(w, torch.tensor([[expected, -expected]], dtype=torch.float64))


# --- one plain SGD step on a batch: Σ_u −η·A·K·G = Δ_lin, and ≈ Δ_obs to first order -------------------


def _sgd_step(model, params, train, owners, weights, eta, n_ex):
    """θ' = θ − η ∇ (1/U) Σ_u Σ_r w_r (−log π(y_r|x_u)) by plain autograd (the trainer's step)."""
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    logp = observe_rows(model, leaves, train)
    total = -(weights * logp).sum() / n_ex
    grads = torch.autograd.grad(total, list(leaves.values()))
    return {n: p - eta * g for (n, p), g in zip(params.items(), grads)}


def observe_rows(model, params, batch):
    logits = model.logits(params, batch)
    logp = torch.log_softmax(logits, -1).gather(-1, batch.targets[..., None]).squeeze(-1)
    return (logp * batch.target_mask).sum(-1)


@pytest.mark.parametrize("objective", ["sft", "dpo"])
def test_sum_of_example_forces_equals_delta_lin_for_an_sgd_step(objective, tmp_path, batch):
    model = _gpt2()
    params = _params(model)
    if objective == "sft":
        examples = [{"id": f"u{i}", "prompt_ids": [1 + i, 2], "responses": {"completion": [3 + i, 4, 5 + i]}} for i in range(3)]
    else:
        examples = [{"id": f"u{i}", "prompt_ids": [1 + i, 2], "responses": {"chosen": [3 + i, 4], "rejected": [9, 10 - i, 11]}} for i in range(3)]
    train = _rows(tmp_path, examples)
    owners = [i for i, _ in train.rows]
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
    lin = delta_lin(model.logits, params, batch, step)
    sgd = Preconditioner("sgd", None, None, None)
    forces = example_forces(model.logits, params, batch, train, owners, weights, torch.full((n_ex,), eta / n_ex, dtype=torch.float64), sgd)
    torch.testing.assert_close(forces.total.sum(0), lin.total.double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(forces.pos_argmax.sum(0) + forces.neg_argmax.sum(0), lin.argmax.double(), rtol=1e-9, atol=1e-12)
    # per token: the positive and negative parts add up to Δ_lin at every response position
    torch.testing.assert_close(forces.pos_tok + forces.neg_tok, lin.tok.double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((forces.pos_tok).sum(1), forces.pos.sum(0), rtol=1e-9, atol=1e-12)
    if objective == "dpo":
        assert forces.neg.abs().sum() > 0 and forces.pos.abs().sum() > 0
    else:
        assert forces.neg.abs().sum() == 0
    # first order: the gap to the observed change shrinks like η² (halving η quarters it)
    gaps = []
    for e in (eta, eta / 2):
        moved = _sgd_step(model, params, train, owners, weights, e, n_ex)
        obs = observe(model.logits, moved, batch).logp - observe(model.logits, params, batch).logp
        f = example_forces(model.logits, params, batch, train, owners, weights, torch.full((n_ex,), e / n_ex, dtype=torch.float64), sgd)
        gaps.append(float((obs.double() - f.total.sum(0)).abs().max()))
    assert 3.0 < gaps[0] / gaps[1] < 5.0, gaps


# --- an AdamW step rebuilt from a real Trainer's saved state and logged lr ------------------------------


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    """A real Hugging Face Trainer run of a tiny GPT-2: AdamW with weight decay, linear decay of the lr,
    a checkpoint (with optimizer.pt) after every step."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

    set_seed(0)
    root = tmp_path_factory.mktemp("adamw")
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=32, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 32, (16, 8), generator=g)]
    args = TrainingArguments(output_dir=str(root), max_steps=4, save_steps=1, logging_steps=1, learning_rate=5e-3, weight_decay=0.1,
                             warmup_steps=0, lr_scheduler_type="linear", per_device_train_batch_size=4, use_cpu=True,
                             report_to="none", disable_tqdm=True, save_only_model=False)  # fmt: skip
    Trainer(model=GPT2LMHeadModel(cfg), args=args, train_dataset=data).train()
    return root


def test_adamw_step_rebuilt_from_optimizer_state_and_logged_lr_equals_real_update(adamw_run):
    from ckptforce.io import open_run
    from ckptforce.updates import update_anatomy

    run = open_run(adamw_run)
    lrs = {(iv.step_from, iv.step_to): iv.lr for iv in update_anatomy(run).intervals}
    checked = 0
    for a, b in zip(run.checkpoints[1:-1], run.checkpoints[2:]):  # intervals with a saved state at both ends
        with run.open(a) as ca, run.open(b) as cb:
            start, end = ca.optimizer(), cb.optimizer()
            theta = {n: ca.tensor(n).double() for n in ca.names()}
            delta = {n: cb.tensor(n).double() - theta[n] for n in theta}
        assert end.kind == "adam" and end.unmapped == 0
        lr = lrs[(a.step, b.step)]
        pre = preconditioner(theta, start=start, end=end, lr=lr, n_steps=b.step - a.step)
        group = {n: gr for gr in end.groups for n in gr["names"]}
        for name in theta:
            b1 = group[name]["betas"][0]
            m0, m1 = (s.per_param[name]["exp_avg"].double() for s in (start, end))
            grad = (m1 - b1 * m0) / (1 - b1)  # the batch gradient this step used, recovered from the two states
            attributable = -lr * pre.scale[name] * grad
            rebuilt = attributable + pre.momentum[name] + pre.decay.get(name, torch.zeros_like(grad))
            scale = float(delta[name].abs().max())
            assert float((rebuilt - delta[name]).abs().max()) <= 1e-4 * scale + 1e-9, name
            checked += 1
        assert any(g["weight_decay"] > 0 for g in end.groups) and pre.decay
    assert checked > 0


def test_direction_force_is_zero_without_a_direction(batch):
    model = _gpt2()
    z, zs = direction_force(model.logits, _params(model), batch, None)
    assert z.shape == (len(batch),) and float(z.abs().sum()) == 0 and float(zs.abs().sum()) == 0


# --- the pipeline: analyze --train on a real TRL SFT run ------------------------------------------------


def test_analyze_with_training_examples_on_a_real_trl_run(runs, tmp_path):
    import xarray as xr
    from click.testing import CliRunner

    from ckptforce.cli import main
    from fixtures.trainers import _sft_examples

    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"id": f"t{i}", **r}) for i, r in enumerate(_sft_examples())) + "\n")
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"Q : where does {w} live ? A :", "split": "train",
                                            "responses": {"chosen": f" {w} lives in paris .", "random": " in . where ?"}})
                                for i, w in enumerate(["alice", "bob"])) + "\n")  # fmt: skip
    out = tmp_path / "cube.h5"
    result = CliRunner().invoke(main, ["analyze", str(runs["trl"].root), "--probes", str(probes), "--train", str(train), "-o", str(out), "-q", "--nodes", "0", "--no-by-tensor"])
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds["force"].dims == ("interval", "probe", "response", "source")
        assert list(ds["source"].values[-2:]) == ["momentum", "weight_decay"] and ds.sizes["source"] == 16 + 2
        assert ds.attrs["objective"] == "sft" and ds.attrs["preconditioner"] == "adam"
        # the budget closes: Σ sources + unexplained = Δ_lin, on every probe row and on y*
        np.testing.assert_allclose((ds["force"].sum("source") + ds["dlogp_unexplained"]).values, ds["dlogp_lin"].values, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(ds["force_pos"].isel(source=slice(0, 16)).values, ds["force"].isel(source=slice(0, 16)).values, rtol=1e-6)
        assert np.all(ds["force_neg"].isel(source=slice(0, 16)).values == 0), "SFT has no negative gradient"
        assert float(abs(ds["force"].sel(source="momentum")).max()) > 0, "the Trainer saved Adam's first moment at the start"
        assert ((ds["g_one_minus_p"].isel(source=slice(0, 16)) > 0) & (ds["g_one_minus_p"].isel(source=slice(0, 16)) < 1)).all()
        assert "no 'steps'" in ds.attrs["warnings"]


def test_training_file_errors_name_the_line_and_the_fix(tmp_path):
    from ckptforce.errors import ProbeFileError
    from ckptforce.train_examples import load_training_set

    cases = [
        ('{"prompt": "a", "completion": "b", "chosen": "c"}', "exactly one of"),
        ('{"prompt": "a", "completion": "b", "chosen_": "c"}', "did you mean 'chosen'?"),
        ('{"prompt": "a", "completion": "b", "meta": [1]}', "meta: expected an object of your own fields"),
        ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"objective": "dpo"}', "first line"),
        ('{"objective": "sft"}\n{"prompt": "a", "chosen": "b", "rejected": "c"}', "trains on completion examples"),
        ('{"prompt": "a", "completions": ["b", "c"], "rewards": [1]}', "one reward per completion"),
        ('{"id": "x", "prompt": "a", "completion": "b"}\n{"id": "x", "prompt": "a", "completion": "c"}', "already used on line 1"),
        ("not json", "not valid JSON"),
    ]
    for i, (text, words) in enumerate(cases):
        path = tmp_path / f"t{i}.jsonl"
        path.write_text(text + "\n")
        with pytest.raises(ProbeFileError) as e:
            load_training_set(path)
        assert words in str(e.value) and str(path) in str(e.value), (text, str(e.value))
    ok = tmp_path / "ok.jsonl"
    ok.write_text('{"objective": "ipo", "beta": 0.2}\n{"prompt": "a", "chosen": "b", "rejected": "c", "steps": [1, 5]}\n')
    tset = load_training_set(ok)
    assert (tset.objective, tset.beta, tset.objective_source, tset.examples[0].steps) == ("ipo", 0.2, "header", [1, 5])
    assert load_training_set(ok, "dpo").objective == "dpo"
    own = tmp_path / "own.jsonl"  # fields of the user's own are kept as the example's labels
    own.write_text('{"prompt": "a", "completion": "b", "colour": 1, "meta": {"source": "wiki"}}\n{"prompt": "c", "completion": "d"}\n')
    assert load_training_set(own).labels == {"colour": ["1", ""], "meta.source": ["wiki", ""]}


def test_classifier_run_with_class_probes_and_training_arrays(runs, tmp_path):
    """A Lightning classifier: probes and training examples as arrays; the whole distribution per probe lands
    in logp_class, flipped labels form their own probe group, and the force budget closes."""
    import xarray as xr
    from click.testing import CliRunner

    from ckptforce.cli import main
    from fixtures.trainers import SEED

    g = torch.Generator().manual_seed(SEED)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)  # the fixture's training data
    np.savez(tmp_path / "train.npz", x=x.numpy(), y=y.numpy())
    flipped = np.zeros(6, dtype=bool)
    flipped[:2] = True
    np.savez(tmp_path / "probes.npz", x=torch.randn(6, 8, generator=g).numpy(), y=np.array([0, 1, 2, 0, 1, 2]), flipped=flipped)
    out = tmp_path / "cube.h5"
    args = ["analyze", str(runs["lightning"].root), "--probes", str(tmp_path / "probes.npz"), "--train", str(tmp_path / "train.npz"),
            "--model", "fixtures.models:tiny_classifier", "-o", str(out), "-q", "--dtype", "float64"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        assert ds["logp_class"].dims == ("checkpoint", "probe", "class") and ds.sizes["class"] == 3
        np.testing.assert_allclose(np.exp(ds["logp_class"]).sum("class"), 1.0, rtol=1e-9)
        np.testing.assert_allclose(ds["logp"].sel(response="label").values,
                                   np.take_along_axis(ds["logp_class"].values, np.array([0, 1, 2, 0, 1, 2])[None, :, None], 2)[..., 0], rtol=1e-9)  # fmt: skip
        assert list(ds["probe_group"].values) == ["flipped", "flipped", "clean", "clean", "clean", "clean"]
        assert ds.sizes["source"] == 64 + 2 and ds.attrs["objective"] == "ce"
        np.testing.assert_allclose((ds["force"].sum("source") + ds["dlogp_unexplained"]).values, ds["dlogp_lin"].values, rtol=1e-7, atol=1e-10)
        assert float(abs(ds["force"].isel(source=slice(0, 64))).sum()) > 0
        # the kernel at checkpoint 0 against a plain loop: ⟨∇ log π(label_o), ∇ −log π(y_u)⟩ for a few pairs
        from ckptforce.io import open_run
        from ckptforce.model import bind

        run = open_run(runs["lightning"].root)
        with run.open(run.checkpoints[0]) as ckpt:
            model = bind(ckpt, model="fixtures.models:tiny_classifier", kind="classifier")
            theta = {n: t.double() for n, t in model.params_from(ckpt).items()}
        module = model.module.double()
        probe_x = torch.from_numpy(np.load(tmp_path / "probes.npz")["x"]).double()

        def grad_of(xi, yi, sign):
            params = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
            out = torch.func.functional_call(module, params, (xi[None],))
            logp = torch.log_softmax(out, -1)[0, yi]
            return torch.autograd.grad(sign * logp, list(params.values()))

        for o, u in [(0, 0), (3, 17), (5, 63)]:
            go, gu = grad_of(probe_x[o], [0, 1, 2, 0, 1, 2][o], 1.0), grad_of(x[u].double(), int(y[u]), -1.0)
            k = sum(float((a * b).sum()) for a, b in zip(go, gu))
            cos = k / (math.sqrt(sum(float((a * a).sum()) for a in go)) * math.sqrt(sum(float((b * b).sum()) for b in gu)))
            assert float(ds["kernel"].isel(checkpoint=0, probe=o, source=u)) == pytest.approx(k, rel=1e-6)
            assert float(ds["kernel_cos"].isel(checkpoint=0, probe=o, source=u)) == pytest.approx(cos, rel=1e-6)
        assert np.isnan(ds["kernel"].sel(source="momentum")).all()
        assert not np.isnan(ds["kernel"].isel(source=slice(0, 64))).any(), "every checkpoint has its kernel, the last one too"
        lr = ds["lr"].values
        tracin = sum(lr[i] * ds["kernel"].isel(checkpoint=i).values for i in range(len(lr)))
        np.testing.assert_allclose(ds["kernel_tracin"].values[:, :64], tracin[:, :64], rtol=1e-9)
        assert ds.attrs["kernel_approximate"] == 0 and "exact" in ds.attrs["kernel_method"]
        # the full classifier matrices: the kernel is the probe label's row of A·K·G (DESIGN §1)
        akg = np.einsum("pvw,puwx,ux->puv", ds["a_class"].isel(interval=0).values, ds["k_class"].isel(interval=0, source=slice(0, 64)).values,
                        ds["g_class"].isel(interval=0, source=slice(0, 64)).values)  # fmt: skip
        at_label = np.take_along_axis(akg, np.array([0, 1, 2, 0, 1, 2])[:, None, None], 2)[..., 0]
        np.testing.assert_allclose(at_label, ds["kernel"].isel(checkpoint=0, source=slice(0, 64)).values, rtol=1e-8)
        exact = ds["kernel"].isel(checkpoint=0, source=slice(0, 64)).values
    featured = CliRunner().invoke(main, [*args[:-5], "-o", str(tmp_path / "feat.h5"), "-q", "--dtype", "float64", "--nodes", "0",
                                         "--no-by-tensor", "--feature-layer", "backbone"])  # fmt: skip
    assert featured.exit_code == 0, featured.output
    with xr.open_dataset(tmp_path / "feat.h5", engine="h5netcdf") as ds:
        np.testing.assert_allclose(ds["feature_drift"].isel(checkpoint=0), 0, atol=1e-12)
        feats = [torch.func.functional_call(module.backbone, {n.split(".", 1)[1]: t.double() for n, t in model.params_from(c).items() if n.startswith("backbone.")}, (probe_x,))
                 for c in (run.open(run.checkpoints[0]), run.open(run.checkpoints[-1]))]  # fmt: skip
        np.testing.assert_allclose(ds["feature_drift"].isel(checkpoint=-1), (feats[1] - feats[0]).norm(dim=-1).detach().numpy(), rtol=1e-9)
        np.testing.assert_allclose(ds["feature_norm"].isel(checkpoint=-1), feats[1].norm(dim=-1).detach().numpy(), rtol=1e-9)
        assert ds.attrs["feature_layer"] == "backbone"
    bad = CliRunner().invoke(main, [*args[:-5], "-o", str(tmp_path / "bad.h5"), "-q", "--feature-layer", "backbon"])
    assert bad.exit_code == 2 and "did you mean backbone" in bad.output, bad.output
    sketched = CliRunner().invoke(main, [*args[:-5], "-o", str(tmp_path / "sketch.h5"), "-q", "--dtype", "float64", "--nodes", "0",
                                         "--no-by-tensor", "--kernel-projection", "48"])  # fmt: skip
    assert sketched.exit_code == 0, sketched.output
    with xr.open_dataset(tmp_path / "sketch.h5", engine="h5netcdf") as ds:
        assert ds.attrs["kernel_approximate"] == 1 and "projection sign dim=48" in ds.attrs["kernel_method"]
        approx = ds["kernel"].isel(checkpoint=0, source=slice(0, 64)).values
        assert np.corrcoef(approx.ravel(), exact.ravel())[0, 1] > 0.5, "a sketch of 48 coordinates still tracks the exact kernel"


def test_tensors_without_optimizer_state_are_not_moved(tmp_path):
    from ckptforce.io.base import OptimizerState

    params = {"a": torch.ones(3, dtype=torch.float64), "frozen": torch.ones(2, dtype=torch.float64), "unused": torch.ones(2, dtype=torch.float64)}
    adam = {"exp_avg": torch.full((3,), 0.1), "exp_avg_sq": torch.full((3,), 0.04), "step": torch.tensor(5.0)}
    group = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "names": ["a", "unused"]}
    end = OptimizerState(tmp_path / "optimizer.pt", {"a": adam, "unused": {}}, [group], "test")
    pre = preconditioner(params, start=end, end=end, lr=1e-3)
    assert pre.kind == "adam" and "2 tensors have no optimizer state" in pre.note
    assert float(pre.scale["frozen"].abs().sum()) == 0 and float(pre.scale["unused"].abs().sum()) == 0
    expected = (1 - 0.9) / (1 - 0.9**5) / ((0.04 / (1 - 0.999**5)) ** 0.5 + 1e-8)
    torch.testing.assert_close(pre.scale["a"], torch.full((3,), expected, dtype=torch.float64))
    none = preconditioner(params, start=None, end=OptimizerState(tmp_path / "o.pt", {"x": adam}, [group], "test"), lr=1e-3)
    assert none.kind == "sgd" and none.scale is None and "none of the model's tensors" in none.note


def test_grpo_group_with_equal_rewards_has_no_gradient():
    from ckptforce.forces.objectives import advantages

    adv = advantages(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    assert float(adv[0].abs().sum()) == 0
    s = torch.tensor([1.0, 0.0, 0.0]).std(unbiased=True)
    torch.testing.assert_close(adv[1], (torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) - 1 / 3) / (float(s) + 1e-4))
