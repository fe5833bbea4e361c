"""``ckptforce analyze`` end to end on a real Trainer run: the cube's names and numbers, resume after SIGKILL,
Dask workers against serial, and the refusals (other settings, output inside the run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ckptforce.cli import main
from ckptforce.forces import DEFAULT_NODES
from conftest import tree_digest

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)

    def ids(k):
        return rng.integers(0, 64, k).tolist()

    lines = [
        {"id": f"q{i}", "prompt_ids": ids(4), "split": "train" if i < 3 else "test", "group": "g" + str(i % 2),
         "responses": {"chosen": ids(3), "rejected": ids(5), "random": ids(2)}}
        for i in range(5)
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("probes") / "probes.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def _analyze(*args) -> "object":
    return CliRunner().invoke(main, ["analyze", *map(str, args)])


def _data(ds: xr.Dataset) -> xr.Dataset:
    return ds.drop_attrs(deep=False)


@pytest.fixture(scope="module")
def serial_cube(runs, probes, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("serial") / "cube.h5"
    before = tree_digest(runs["hf"].root)
    result = _analyze(runs["hf"].root, "--probes", probes, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    assert tree_digest(runs["hf"].root) == before, "analyze wrote into the run directory"
    return out


def test_cube_has_the_documented_names_and_consistent_numbers(serial_cube, runs):
    with xr.open_dataset(serial_cube, engine="h5netcdf") as ds:
        assert list(ds["step"].values) == runs["hf"].steps
        assert list(ds["response"].values) == ["chosen", "rejected", "random", "argmax"]
        for name in ("logp", "dlogp_obs", "dlogp_lin", "dlogp_path", "update_norm", "param_norm", "update_cos", "dlogp_lin_tensor"):
            assert name in ds, name
        obs = ds["logp"].diff("checkpoint").values
        np.testing.assert_allclose(ds["dlogp_obs"].values, obs, rtol=1e-6, atol=1e-6)
        # the path integral is complete for smooth log π; y* switches tokens along the path (kinks), so only finite
        given = ds.drop_sel(response="argmax")
        np.testing.assert_allclose(given["dlogp_path"].values, given["dlogp_obs"].values, atol=1e-4)
        assert np.isfinite(ds["dlogp_path"].sel(response="argmax").values).all()
        np.testing.assert_allclose(ds["dlogp_lin_tensor"].sum("tensor").values, ds["dlogp_lin"].values, rtol=1e-4, atol=1e-6)
        assert (ds["logp"].sel(response="argmax") >= ds["logp"].sel(response="chosen") - 1e-6).all()
        assert float(ds["lr"][0]) > 0 and json.loads(ds.attrs["config"])["nodes"] == DEFAULT_NODES
        assert set(json.loads(ds.attrs["checkpoint_fingerprints"])) == {str(p) for p in runs["hf"].checkpoints}
    assert not Path(str(serial_cube) + ".parts").exists()


def test_sigkill_then_resume_gives_the_same_cube(serial_cube, runs, probes, tmp_path):
    out = tmp_path / "cube.h5"
    parts = Path(str(out) + ".parts")
    cmd = [sys.executable, "-m", "ckptforce.cli", "analyze", str(runs["hf"].root), "--probes", str(probes), "-o", str(out), "-q"]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).parents[1], start_new_session=True)
    deadline = time.time() + 120
    while not (parts / "interval-000000.h5").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if out.exists():
        pytest.skip("the run finished before the kill landed")
    assert (parts / "interval-000000.h5").exists() and not (parts / "interval-000001.h5").exists()
    result = _analyze(runs["hf"].root, "--probes", probes, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as resumed, xr.open_dataset(serial_cube, engine="h5netcdf") as serial:
        xr.testing.assert_allclose(_data(resumed), _data(serial), rtol=1e-6, atol=1e-7)


def test_dask_workers_equal_serial(serial_cube, runs, probes, tmp_path):
    out = tmp_path / "cube.h5"
    result = _analyze(runs["hf"].root, "--probes", probes, "-o", out, "--quiet", "--workers", "2")
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as par, xr.open_dataset(serial_cube, engine="h5netcdf") as serial:
        xr.testing.assert_allclose(_data(par), _data(serial), rtol=1e-6, atol=1e-7)


def test_progress_moves_within_an_interval_and_batches_change_nothing(serial_cube, runs, probes, tmp_path, monkeypatch):
    from ckptforce import pipeline

    monkeypatch.setattr(pipeline, "PROBE_BATCH", 4)  # 5 probes × 3 response rows = 15 rows → 4 batches
    seen: list[tuple[float, int]] = []
    config = pipeline.AnalysisConfig.for_run(runs["hf"].root, probes)
    out = pipeline.analyze(config, tmp_path / "cube.h5", progress=lambda done, n: seen.append((done, n)))
    fractions = [d for d, _ in seen if d != int(d)]
    assert fractions and all(0 < d < seen[-1][1] for d in fractions), seen
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == seen[-1][1]
    with xr.open_dataset(out, engine="h5netcdf") as batched, xr.open_dataset(serial_cube, engine="h5netcdf") as serial:
        xr.testing.assert_allclose(_data(batched), _data(serial), rtol=1e-6, atol=1e-7)


def test_other_settings_are_not_mixed_into_existing_parts(runs, probes, tmp_path):
    out = tmp_path / "cube.h5"
    parts = Path(str(out) + ".parts")
    parts.mkdir()
    (parts / "config.json").write_text(json.dumps({"nodes": 5}))
    (parts / "interval-000000.h5").write_bytes(b"")
    result = _analyze(runs["hf"].root, "--probes", probes, "-o", out)
    assert result.exit_code == 2
    assert "holds parts computed with other settings" in result.stderr and f"nodes: 5 (existing parts) vs {DEFAULT_NODES} (now)" in result.stderr


def test_output_inside_the_run_is_refused(runs, probes, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["hf"].root, run)
    result = _analyze(run, "--probes", probes, "-o", run / "cube.h5")
    assert result.exit_code == 2 and "would be written into the run directory" in result.stderr
    missing = _analyze(run, "--probes", probes, "-o", tmp_path / "nope" / "cube.h5")
    assert missing.exit_code == 2 and "no such directory for the output" in missing.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(runs, probes, tmp_path):
    result = _analyze(runs["hf"].root, "--probes", probes, "-o", tmp_path / "c.h5", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA GPU" in result.stderr and "--device cpu" in result.stderr


def test_poor_linearisation_is_named_per_interval():
    from ckptforce.pipeline import _linearisation_warnings

    ds = xr.Dataset(coords={"step_from": ("interval", [0, 10]), "step_to": ("interval", [10, 20])}, data_vars={"remainder_ratio": ("interval", [0.1, 0.8])})
    assert _linearisation_warnings(ds) == [
        "step 10→20: first-order prediction misses 80% of the observed change (remainder ratio); "
        "attribute with dlogp_path, or use checkpoints closer together"
    ]


@pytest.mark.slow  # two more analyses of the Trainer run
def test_split_by_layer_and_block_sum_the_tensor_split(serial_cube, runs, probes, tmp_path):
    """--split-by layer / block: each part is the sum of its tensors' contributions in the default cube (Δ_lin and
    Δ_path), the anatomy keeps its tensors, and the report names the leading part."""
    from ckptforce.report import diagnostics as dg
    from ckptforce.tensor_groups import group_of

    with xr.open_dataset(serial_cube, engine="h5netcdf") as ds:
        whole = ds.load()
    assert group_of("transformer.h.1.attn.c_attn.weight", "block") == "transformer.h.1"
    assert group_of("transformer.h.1.attn.c_attn.weight", "layer") == "transformer.h.1.attn.c_attn"
    assert group_of("model.layers.11.mlp.up_proj.weight", "block") == "model.layers.11" and group_of("lm_head.weight", "block") == "lm_head"
    for by in ("layer", "block"):
        out = tmp_path / f"{by}.h5"
        result = _analyze(runs["hf"].root, "--probes", probes, "-o", out, "--quiet", "--split-by", by)
        assert result.exit_code == 0, result.output
        with xr.open_dataset(out, engine="h5netcdf") as ds:
            part = ds.load()
        assert "dlogp_lin_tensor" not in part and list(part["tensor"].values) == list(whole["tensor"].values)  # the anatomy's tensors
        labels = [group_of(str(t), by) for t in whole["tensor"].values]
        assert sorted(part["part"].values.tolist()) == sorted(set(labels)) and len(set(labels)) < whole.sizes["tensor"]
        for name in ("dlogp_lin", "dlogp_path"):
            grouped = whole[f"{name}_tensor"].assign_coords(part=("tensor", labels)).groupby("part").sum(min_count=1)
            np.testing.assert_allclose(part[f"{name}_part"].transpose(*grouped.dims).sel(part=grouped["part"]).values, grouped.values, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(part["dlogp_lin_part"].sum("part").values, part["dlogp_lin"].values, rtol=1e-4, atol=1e-6)
        d = dg.tensor_split(part)
        assert not d.missing and d.numbers["lead"] in part["part"].values and d.tables["share"].index.name == "part"
