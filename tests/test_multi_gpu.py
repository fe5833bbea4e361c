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
