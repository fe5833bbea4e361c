"""The Trainer's multi-GPU layouts: FSDP (sharded DCP folders) and DeepSpeed ZeRO (``global_stepN/``).

Each is read through the CLI (``scan``, and ``analyze`` where the layout holds a model) with the run directory
byte-identical afterwards; tensors and the optimizer's moments equal what the live training held, per name.
"""

from __future__ import annotations

import json

import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from ckptforce import open_run
from ckptforce.cli import main
from conftest import tree_digest
from fixtures import multi_gpu


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    return multi_gpu.write_fsdp_run(tmp_path_factory.mktemp("fsdp") / "run")


def _probes(tmp_path):
    path = tmp_path / "probes.jsonl"
    rows = [{"id": f"p{i}", "prompt_ids": [1 + i, 2, 3], "split": "train", "responses": {"chosen": [4 + i, 5], "rejected": [9, 8 + i]}} for i in range(2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _scan_json(run_dir):
    before = tree_digest(run_dir)
    result = CliRunner().invoke(main, ["scan", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert tree_digest(run_dir) == before, "scan wrote into the run directory"
    return json.loads(result.stdout)


def _analyze(run_dir, tmp_path):
    before = tree_digest(run_dir)
    out = tmp_path / "cube.h5"
    result = CliRunner().invoke(main, ["analyze", str(run_dir), "--probes", str(_probes(tmp_path)), "-o", str(out), "-q", "--nodes", "0", "--no-by-tensor"])
    assert result.exit_code == 0, result.output
    assert tree_digest(run_dir) == before, "analyze wrote into the run directory"
    return xr.open_dataset(out, engine="h5netcdf")


# --- FSDP ------------------------------------------------------------------------------------------------


def test_fsdp_scan(fsdp):
    summary = _scan_json(fsdp.root)
    assert summary["layout"] == "fsdp"
    assert [c["step"] for c in summary["checkpoints"]] == fsdp.steps
    assert {c["step_source"] for c in summary["checkpoints"]} == {"record"}
    assert summary["intervals"][0]["update_norm"] > 0


def test_fsdp_tensors_and_optimizer_equal_the_live_run(fsdp):
    run = open_run(fsdp.root)
    for ref in run.checkpoints:
        want, live = fsdp.extra["states"][ref.step], fsdp.extra["optimizer_state"][ref.step]
        with run.open(ref) as ckpt:
            assert ckpt.aliases == {"lm_head.weight": "transformer.wte.weight"}
            assert sorted(ckpt.names()) == sorted(n for n in want if n != "lm_head.weight")
            for n in ckpt.names():
                torch.testing.assert_close(ckpt.tensor(n), want[n], rtol=0, atol=0, msg=n)
            state = ckpt.optimizer()
            assert state.kind == "adam" and state.mapping.startswith("by name")
            assert set(state.per_param) == set(live)
            for n, moments in live.items():
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(state.per_param[n][key], moments[key], rtol=0, atol=0, msg=f"{n} {key}")
                assert state.per_param[n]["step"] == ref.step
            assert state.groups[0]["lr"] == fsdp.extra["lr"] and len(state.groups[0]["names"]) == len(live)


def test_fsdp_analyze(fsdp, tmp_path):
    cube = _analyze(fsdp.root, tmp_path)
    assert list(cube["step"].values) == fsdp.steps
    assert cube["dlogp_obs"].notnull().all() and cube["dlogp_lin"].notnull().all()


# --- DeepSpeed ZeRO --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    return multi_gpu.write_deepspeed_run(tmp_path_factory.mktemp("zero2") / "run", stage=2, world_size=2)


def test_deepspeed_scan(zero2):
    summary = _scan_json(zero2.root)
    assert summary["layout"] == "deepspeed"
    assert [c["step"] for c in summary["checkpoints"]] == zero2.steps
    assert summary["intervals"][0]["update_norm"] > 0


def test_deepspeed_fp32_masters_and_moments_equal_the_live_run(zero2):
    """ZeRO-2 flat partitions of 2 ranks cut back into named fp32 tensors and Adam moments, bit for bit."""
    run = open_run(zero2.root)
    for ref in run.checkpoints:
        want, live = zero2.extra["states"][ref.step], zero2.extra["optimizer_state"][ref.step]
        with run.open(ref) as ckpt:
            assert ckpt.aliases == {"lm_head.weight": "transformer.wte.weight"}
            assert sorted(ckpt.names()) == sorted(n for n in want if n != "lm_head.weight")
            for n in ckpt.names():
                assert ckpt.info(n).dtype == torch.float32  # the master weights, not the bf16 module copy
                torch.testing.assert_close(ckpt.tensor(n), want[n], rtol=0, atol=0, msg=n)
            state = ckpt.optimizer()
            assert state.kind == "adam" and set(state.per_param) == set(live)
            for n, moments in live.items():
                for key in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(state.per_param[n][key], moments[key], rtol=0, atol=0, msg=f"{n} {key}")
                assert state.per_param[n]["step"] == ref.step
            assert [g["weight_decay"] for g in state.groups] == [0.01, 0.0]
            assert sum(len(g["names"]) for g in state.groups) == len(live)


def test_deepspeed_save_dir_without_trainer(zero2, tmp_path):
    """DeepSpeed's own save_dir (global_stepN/ folders, latest): steps from the model states' global_steps."""
    import shutil

    root = tmp_path / "ds"
    for ckpt in zero2.checkpoints:
        tag = next(ckpt.glob("global_step*"))
        shutil.copytree(tag, root / tag.name)
    (root / "latest").write_text(f"global_step{zero2.steps[-1]}")
    summary = _scan_json(root)
    assert summary["layout"] == "deepspeed" and [c["step"] for c in summary["checkpoints"]] == zero2.steps
    assert {c["step_source"] for c in summary["checkpoints"]} == {"record"}


def test_deepspeed_analyze(zero2, tmp_path):
    cube = _analyze(zero2.root, tmp_path)
    assert list(cube["step"].values) == zero2.steps
    assert cube["dlogp_obs"].notnull().all() and cube["dlogp_lin"].notnull().all()


def test_deepspeed_zero3_says_to_run_zero_to_fp32(tmp_path):
    info = multi_gpu.write_deepspeed_run(tmp_path / "run", stage=3, world_size=2, steps=2)
    before = tree_digest(info.root)
    result = CliRunner().invoke(main, ["scan", str(info.root)])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert "global_step2: a ZeRO-3 checkpoint keeps every parameter partitioned across ranks" in line
    assert "zero_to_fp32.py" in line and "point ckptforce at OUT_DIR" in line
    assert tree_digest(info.root) == before


class Foreign:  # a class no DeepSpeed checkpoint holds
    pass


def test_deepspeed_file_with_a_foreign_class_is_refused(zero2, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(zero2.checkpoints[0], run / "checkpoint-2")
    shutil.copytree(zero2.checkpoints[1], run / "checkpoint-4")
    states = run / "checkpoint-4" / "global_step4" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "evil": Foreign()}, states)
    result = CliRunner().invoke(main, ["scan", str(run)])
    assert result.exit_code == 2
    assert f"{states}: reading this file needs a full unpickle" in result.stderr and "--trust-pickles" in result.stderr
