"""One reader suite over every layout, on runs written by the real trainers.

For each run: the detected layout, the steps and their source, the tensor names, every tensor, and every Δθ
statistic equal a direct computation with the plain loaders (tests/direct.py) in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

import direct
from ckptforce import open_run, update_anatomy
from conftest import EXPECTED_LAYOUT

RUN_NAMES = list(EXPECTED_LAYOUT)


@pytest.fixture(scope="module")
def opened(runs):
    """Each run as saved: an adapter run's start (its base model, which open_run puts in front) is left out
    here and checked on its own (test_adapter_run_starts_at_its_base_model)."""
    out = {name: open_run(info.root) for name, info in runs.items()}
    for run in out.values():
        run.listing.checkpoints = [c for c in run.checkpoints if c.adapter is None]
    return out


def test_adapter_run_starts_at_its_base_model(runs):
    """A LoRA run starts at the base model adapter_config.json names: step 0, W = W_base (B = 0), a note says so;
    the first update is the whole first adapter, ‖scale·B₂A₂‖."""
    info = runs["peft"]
    run = open_run(info.root)
    start = run.checkpoints[0]
    assert [c.step for c in run.checkpoints] == [0, *info.steps] and start.step_source == "init" and start.adapter == info.checkpoints[0]
    assert any("starts at the base model" in n for n in run.notes), run.notes
    with run.open(start) as ckpt, run.open(run.checkpoints[1]) as first:
        assert ckpt.names() == first.names() and ckpt.optimizer() is None and ckpt.lr_log() == []
        for n in ckpt.names():
            assert float(ckpt.tensor(n).abs().max()) == 0  # the adapter's ΔW at the start
        first_norm = math.sqrt(sum(float(first.tensor(n).double().norm()) ** 2 for n in first.names()))
    assert update_anatomy(run).intervals[0].update_norm == pytest.approx(first_norm, rel=1e-5)


@pytest.fixture(scope="module")
def anatomies(opened):
    return {name: update_anatomy(run) for name, run in opened.items()}


@pytest.mark.parametrize("name", RUN_NAMES)
def test_layout_steps_and_order(name, runs, opened):
    run, info = opened[name], runs[name]
    assert run.layout == EXPECTED_LAYOUT[name]
    assert [c.step for c in run.checkpoints] == info.steps
    assert [c.path for c in run.checkpoints] == info.checkpoints


@pytest.mark.parametrize("name", RUN_NAMES)
def test_step_source(name, opened):
    expected = "name" if name in ("plain", "safetensors", "dcp") else "record"
    assert {c.step_source for c in opened[name].checkpoints} == {expected}


@pytest.mark.parametrize("name", RUN_NAMES)
def test_tensors_equal_direct_reading(name, runs, opened):
    run, info = opened[name], runs[name]
    # Stored tensors must come back bit for bit; LoRA's scale·BA is a float32 product.
    tol = {"rtol": 1e-5, "atol": 1e-8} if name == "peft" else {"rtol": 0, "atol": 0}
    for i, ref in enumerate(run.checkpoints):
        want = direct.state(name, info, i)
        with run.open(ref) as ckpt:
            assert sorted(ckpt.names()) == sorted(want), ref.path
            for n, w in want.items():
                got = ckpt.tensor(n).double()
                torch.testing.assert_close(got, w, **tol, msg=lambda m: f"{ref.path}: {n}: {m}")
                assert ckpt.info(n).shape == tuple(w.shape), n


@pytest.mark.parametrize("name", RUN_NAMES)
def test_update_statistics_equal_direct(name, runs, anatomies):
    info, anatomy = runs[name], anatomies[name]
    states = [direct.state(name, info, i) for i in range(len(info.steps))]
    assert [(iv.step_from, iv.step_to) for iv in anatomy.intervals] == list(zip(info.steps, info.steps[1:]))
    for k, iv in enumerate(anatomy.intervals):
        before, after = states[k], states[k + 1]
        for n, s in iv.tensors.items():
            delta = after[n] - before[n]
            assert s.update_norm == pytest.approx(float(delta.norm()), rel=1e-5, abs=1e-9), n
            assert s.param_norm == pytest.approx(float(before[n].norm()), rel=1e-5), n
            if k > 0:
                prev = before[n] - states[k - 1][n]
                cos = float(torch.dot(prev.ravel(), delta.ravel()) / (prev.norm() * delta.norm()))
                assert s.update_cos == pytest.approx(cos, abs=1e-5), n
            if not s.dtype.startswith("lora"):
                assert s.zero_frac == pytest.approx(float((delta == 0).double().mean())), n
        total = math.sqrt(sum(float((after[n] - before[n]).norm()) ** 2 for n in after))
        assert iv.update_norm == pytest.approx(total, rel=1e-5)


def test_tied_weights_counted_once(opened):
    with opened["nanogpt"].open(opened["nanogpt"].checkpoints[0]) as ckpt:
        assert "lm_head.weight" not in ckpt.names()
        assert ckpt.aliases == {"lm_head.weight": "transformer.wte.weight"}
        assert ckpt.param_count() == sum(ckpt.info(n).numel for n in ckpt.names())
    with opened["hf-bin"].open(opened["hf-bin"].checkpoints[0]) as ckpt:
        assert ckpt.aliases == {"lm_head.weight": "transformer.wte.weight"}


def test_prefixes_stripped(opened):
    for name in ("nanogpt", "plain", "peft", "dcp"):
        with opened[name].open(opened[name].checkpoints[-1]) as ckpt:
            assert not [n for n in ckpt.names() if n.startswith(("_orig_mod.", "module.", "base_model.", "model."))], name


def test_bf16_sharded_is_read_as_stored(opened):
    with opened["hf-bf16-sharded"].open(opened["hf-bf16-sharded"].checkpoints[0]) as ckpt:
        assert len(ckpt.files()) >= 2
        assert {ckpt.info(n).dtype for n in ckpt.names()} == {torch.bfloat16}
        assert ckpt.tensor(ckpt.names()[0]).dtype == torch.bfloat16


def test_hf_optimizer_state_mapped_to_names(runs, opened):
    """optimizer.pt positions -> names equals the live Trainer optimizer's state per parameter."""
    run, live = opened["hf"], runs["hf"].extra["optimizer_state"]
    with run.open(run.checkpoints[-1]) as ckpt:
        state = ckpt.optimizer()
    assert state is not None and state.kind == "adam" and "Trainer" in state.mapping
    assert set(state.per_param) == set(live)
    for n, want in live.items():
        torch.testing.assert_close(state.per_param[n]["exp_avg"], want["exp_avg"], rtol=0, atol=0, msg=n)
        torch.testing.assert_close(state.per_param[n]["exp_avg_sq"], want["exp_avg_sq"], rtol=0, atol=0, msg=n)
    assert [g["weight_decay"] for g in state.groups] == [0.01, 0.0]


def test_nanogpt_optimizer_state_mapped_to_names(runs, opened):
    """nanoGPT's groups: matrices (decay) first, then the rest, each in named_parameters order."""
    info, run = runs["nanogpt"], opened["nanogpt"]
    names = [n.removeprefix("_orig_mod.") for n in info.extra["param_names"]]
    raw = torch.load(info.checkpoints[-1], weights_only=True)
    sd = direct.torch_file(info.checkpoints[-1])
    order = [n for n in names if sd[n].dim() >= 2] + [n for n in names if sd[n].dim() < 2]
    with run.open(run.checkpoints[-1]) as ckpt:
        state = ckpt.optimizer()
    assert state.mapping.startswith("matrices first")
    for i, n in enumerate(order):
        torch.testing.assert_close(state.per_param[n]["exp_avg"], raw["optimizer"]["state"][i]["exp_avg"], rtol=0, atol=0, msg=n)


def test_lightning_optimizer_state_in_order(runs, opened):
    info, run = runs["lightning"], opened["lightning"]
    raw = torch.load(info.checkpoints[-1], weights_only=True)
    with run.open(run.checkpoints[-1]) as ckpt:
        state = ckpt.optimizer()
        names = ckpt.names()
    for i, n in enumerate(names):
        torch.testing.assert_close(state.per_param[n]["exp_avg"], raw["optimizer_states"][0]["state"][i]["exp_avg"], rtol=0, atol=0)


def test_hf_interval_lr_from_trainer_log(runs, anatomies):
    log = dict(runs["hf"].extra["lr_log"])
    for iv in anatomies["hf"].intervals:
        want = [lr for s, lr in log.items() if iv.step_from < s <= iv.step_to]
        assert iv.lr == pytest.approx(sum(want) / len(want)) and iv.lr_source == "trainer log"


def test_final_model_at_run_root_listed_once(runs, opened):
    assert (runs["hf"].root / "model.safetensors").exists()
    assert runs["hf"].root not in [c.path for c in opened["hf"].checkpoints]
    assert any("listed once" in n for n in opened["hf"].notes)


def test_init_added_first(runs):
    info = runs["nanogpt"]
    run = open_run(info.root, init=info.extra["init"])
    assert [c.step for c in run.checkpoints] == [0, *info.steps]
    assert run.checkpoints[0].step_source == "init"
    anatomy = update_anatomy(run)
    first = direct.torch_file(info.extra["init"])
    second = direct.torch_file(info.checkpoints[0])
    n = "transformer.wte.weight"
    assert anatomy.intervals[0].tensors[n].update_norm == pytest.approx(float((second[n] - first[n]).norm()), rel=1e-5)


def test_lora_update_stays_factored_and_equals_dense(runs, opened):
    """‖scale(B₂A₂ − B₁A₁)‖ from the factors equals the dense difference."""
    run = opened["peft"]
    with run.open(run.checkpoints[0]) as a, run.open(run.checkpoints[1]) as b:
        for n in a.names():
            fa, fb = a.factors(n), b.factors(n)
            assert fa is not None and fa.left.shape[1] == 4  # rank r, not dense
            dense = fb.dense().double() - fa.dense().double()
            from ckptforce.updates import lowrank_delta, lowrank_inner

            d = lowrank_delta(fa, fb)
            assert math.sqrt(lowrank_inner(d, d)) == pytest.approx(float(dense.norm()), rel=1e-5)
