"""Update statistics against hand computations in float64, and the warnings they raise."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from ckptforce import open_run, update_anatomy
from ckptforce import updates
from ckptforce.io import Checkpoint, LowRank
from ckptforce.updates import delta_stats, lowrank_delta, lowrank_inner


def test_delta_stats_match_definitions():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))
    b[0, :3] = a[0, :3]  # three exact zeros in the update
    s, d = delta_stats(a, b, None)
    assert s.update_norm == pytest.approx(float((b - a).norm()), rel=1e-6)
    assert s.param_norm == pytest.approx(float(a.norm()), rel=1e-6)
    assert s.zero_frac == pytest.approx(3 / 35)
    assert math.isnan(s.update_cos)
    s2, _ = delta_stats(b, c, d)
    want = float(torch.dot((b - a).ravel(), (c - b).ravel()) / ((b - a).norm() * (c - b).norm()))
    assert s2.update_cos == pytest.approx(want, abs=1e-6)


def test_lowrank_inner_equals_dense():
    g = torch.Generator().manual_seed(1)
    x = LowRank(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 0.5)
    y = LowRank(torch.randn(6, 3, generator=g), torch.randn(3, 5, generator=g), 2.0)
    assert lowrank_inner(x, y) == pytest.approx(float((x.dense().double() * y.dense().double()).sum()), rel=1e-5)
    d = lowrank_delta(x, y)
    torch.testing.assert_close(d.dense(), y.dense() - x.dense(), rtol=1e-5, atol=1e-6)


def _run(tmp_path, states: list[dict], dtype=torch.float32):
    for i, sd in enumerate(states):
        save_file({k: v.to(dtype) for k, v in sd.items()}, tmp_path / f"step_{i + 1}.safetensors")
    return update_anatomy(open_run(tmp_path))


def test_bf16_quantisation_warning(tmp_path):
    w = torch.randn(64, 64) * 10
    anatomy = _run(tmp_path, [{"w": w}, {"w": w + 1e-4}], dtype=torch.bfloat16)
    assert anatomy.intervals[0].tensors["w"].zero_frac > 0.9
    assert any("quantised by the stored dtype" in m for m in anatomy.warnings)


def test_nan_weights_are_reported(tmp_path):
    w = torch.ones(4, 4)
    bad = w.clone()
    bad[0, 0] = float("nan")
    anatomy = _run(tmp_path, [{"w": w}, {"w": bad}])
    assert anatomy.intervals[0].tensors["w"].nonfinite == 1
    assert any("NaN/Inf weights in w (1)" in m and "step 2" in m for m in anatomy.warnings)


def test_whole_model_cosine(tmp_path):
    a = {"x": torch.zeros(3), "y": torch.zeros(2)}
    b = {"x": torch.tensor([1.0, 0, 0]), "y": torch.tensor([0.0, 1])}
    c = {"x": torch.tensor([2.0, 0, 0]), "y": torch.tensor([0.0, 0])}
    anatomy = _run(tmp_path, [a, b, c])
    # Δ1 = (1,0,0 | 0,1), Δ2 = (1,0,0 | 0,-1): cosine 0 for the model, 1 for x, -1 for y
    assert anatomy.intervals[1].update_cos == pytest.approx(0.0, abs=1e-7)
    assert anatomy.intervals[1].tensors["x"].update_cos == pytest.approx(1.0)
    assert anatomy.intervals[1].tensors["y"].update_cos == pytest.approx(-1.0)


def test_optimizer_state_that_fits_no_order_is_a_warning(tmp_path):
    for step in (1, 2):
        opt = {"state": {0: {"exp_avg": torch.ones(3), "step": torch.tensor(1.0)}}, "param_groups": [{"params": [0], "lr": 0.1}]}
        torch.save({"model": {"w": torch.full((2, 2), float(step))}, "optimizer": opt, "iter_num": step}, tmp_path / f"ckpt_{step}.pt")
    anatomy = update_anatomy(open_run(tmp_path))
    assert anatomy.optimizers == []
    assert any("ckpt_1.pt: optimizer state (1 parameters) does not match" in w for w in anatomy.warnings)
    assert math.isnan(anatomy.intervals[0].lr)


def test_torch_checkpoint_reloads_after_release(tmp_path, monkeypatch):
    """Dropping the memory-mapped dict mid-run (to bound resident memory) changes no number."""
    g = torch.Generator().manual_seed(3)
    for step in (1, 2, 3):
        sd = {f"w{i}": torch.randn(32, 32, generator=g) for i in range(4)}
        opt = {"state": {i: {"exp_avg": torch.ones(32, 32)} for i in range(4)}, "param_groups": [{"params": [0, 1, 2, 3], "lr": 0.5}]}
        torch.save({"model": sd, "optimizer": opt, "iter_num": step}, tmp_path / f"ckpt_{step}.pt")
    whole = update_anatomy(open_run(tmp_path))
    monkeypatch.setattr(Checkpoint, "resident_budget", 1)  # release after every tensor
    monkeypatch.setattr(updates, "RESIDENT_BUDGET", 1)
    streamed = update_anatomy(open_run(tmp_path))
    for a, b in zip(whole.intervals, streamed.intervals):
        assert a.update_norm == b.update_norm and a.update_cos == b.update_cos or math.isnan(a.update_cos)
        assert a.lr == b.lr == 0.5
    assert len(streamed.optimizers) == 3
