"""A LoRA adapter's optimizer.pt mapped to lora_A / lora_B names equals the live Trainer optimizer's state."""

from __future__ import annotations

import pytest
import torch

from ckptforce import open_run
from fixtures.lora import write_lora_run


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    return write_lora_run(tmp_path_factory.mktemp("lora"))


def test_adapter_optimizer_state_mapped_to_factor_names(lora):
    run = open_run(lora.root)
    live = lora.extra["optimizer_state"]
    with run.open(run.checkpoints[-1]) as ckpt:
        state = ckpt.optimizer()
        factors = ckpt.factor_names()
    assert state is not None and state.kind == "adam" and state.mapping.startswith("PeftModel's trainable parameters")
    assert set(state.per_param) == set(live) == {n for pair in factors.values() for n in pair}
    for n, want in live.items():
        torch.testing.assert_close(state.per_param[n]["exp_avg"], want["exp_avg"], rtol=0, atol=0, msg=n)
        torch.testing.assert_close(state.per_param[n]["exp_avg_sq"], want["exp_avg_sq"], rtol=0, atol=0, msg=n)
    assert [len(g["names"]) for g in state.groups] == [len(live), 0]


def test_forces_on_a_lora_run_use_the_factor_preconditioner(tmp_path, monkeypatch):
    """``analyze --train`` on a LoRA run (Trainer + PEFT, AdamW) whose every step used the same four rows, given as
    the training examples: the run starts at the base model (B = 0), the adapter's optimizer state is read for
    the factors and mapped to W, and the examples' forces with momentum and weight decay explain Δ_lin up to
    second order; the dense fallback (P = I on W, what ckptforce did before) leaves most of it unexplained."""
    import json

    import xarray as xr
    from click.testing import CliRunner

    from ckptforce.cli import main
    from ckptforce.forces import precondition
    from fixtures.arch_runs import SEQ, VOCAB, write_arch_run
    from fixtures.trainers import SEED, _TokenDataset
    from test_model import _id_probes

    info = write_arch_run(tmp_path / "run", "lora-llama", rows=4, lr=2e-3)  # small steps: s·δB·δA is second order
    _id_probes(tmp_path, vocab=VOCAB, n=4)
    rows = _TokenDataset(4, SEQ, VOCAB, SEED).ids  # the Trainer's loss: every token after the first, mean over the batch
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"u{i}", "prompt_ids": r[:1].tolist(), "completion": r[1:].tolist()}) + "\n" for i, r in enumerate(rows)))

    def unexplained(out):
        args = ["analyze", str(info.root), "--probes", str(tmp_path / "probes.jsonl"), "--train", str(train), "-o", str(out), "-q",
                "--dtype", "float64", "--no-by-tensor"]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        with xr.open_dataset(out, engine="h5netcdf") as ds:
            assert list(ds["step"].values) == [0, 1, 2, 3] and ds["step_source"].values[0] == "init"
            assert str(info.extra["base"]) in str(ds["checkpoint_path"].values[0])
            lin, rest = ds["dlogp_lin"].values, ds["dlogp_unexplained"].values
            return float(abs(rest).max() / abs(lin).max()), ds.attrs["preconditioner"], json.loads(ds.attrs["warnings"])

    ratio, kind, warnings = unexplained(tmp_path / "lora.h5")
    assert kind == "adam on LoRA factors" and any("starts at the base model" in w for w in warnings), warnings
    monkeypatch.setattr("ckptforce.training_forces.adapter_factors", lambda ckpt, params: None)  # the dense path
    monkeypatch.setattr(precondition, "_first_step", lambda state: True)
    dense, dense_kind, _ = unexplained(tmp_path / "dense.h5")
    assert dense_kind == "sgd"
    assert ratio < 0.05 and dense > 0.5, (ratio, dense)  # measured: 2e-5, 0.025, 0.012 per interval; dense 0.97, 0.98, 0.90
