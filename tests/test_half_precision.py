"""``--dtype bfloat16 | float16``: the model's arithmetic in half precision (for GPUs), softmax, reductions and
Δθ in float32. On CPU the same code runs; the numbers agree with the float32 analysis to half precision and
the cube says which dtype it was computed in."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ckptforce.cli import main
from fixtures.arch_runs import SEQ, VOCAB, write_arch_run
from fixtures.trainers import SEED, _TokenDataset
from test_model import _id_probes


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("half")
    info = write_arch_run(root / "run", "llama", rows=4)  # every step used the same four rows: the training file
    _id_probes(root, vocab=VOCAB, n=4)
    train = root / "train.jsonl"
    rows = _TokenDataset(4, SEQ, VOCAB, SEED).ids
    train.write_text("".join(json.dumps({"id": f"u{i}", "prompt_ids": r[:1].tolist(), "completion": r[1:].tolist()}) + "\n" for i, r in enumerate(rows)))
    reference = _analyze(info.root, root / "probes.jsonl", train, root / "f32.h5", "float32")
    return info.root, root / "probes.jsonl", train, reference


def _analyze(run, probes, train, out, dtype):
    args = ["analyze", str(run), "--probes", str(probes), "--train", str(train), "-o", str(out), "-q", "--dtype", dtype, "--nodes", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        return ds.load()


@pytest.mark.slow  # ~40 s per dtype on 2 cores: three analyses with training examples
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_agrees_with_float32(llama, tmp_path, dtype):
    run, probes, train, ref = llama
    half = _analyze(run, probes, train, tmp_path / f"{dtype}.h5", dtype)
    assert half.attrs["dtype"] == dtype and json.loads(half.attrs["config"])["dtype"] == dtype and ref.attrs["dtype"] == "float32"
    for name, tol in (("logp", 0.02), ("dlogp_lin", 0.1), ("force", 0.1)):
        want, got = ref[name].values, half[name].values
        scale = np.nanmax(np.abs(want))
        assert np.all(np.isfinite(got[np.isfinite(want)])), name
        err = np.nanmax(np.abs(got - want)) / scale
        assert err < tol, (dtype, name, err)
        assert scale > 0
