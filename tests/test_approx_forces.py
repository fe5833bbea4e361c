"""``--forces approximate`` through the CLI: the cube stores the approximate forces, labelled, with their error
against the exact forces of the first examples — and that error is the one a user computes from an exact run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ckptforce.cli import main
from ckptforce.names import ARGMAX
from fixtures.arch_runs import SEQ, VOCAB, write_arch_run
from fixtures.trainers import SEED, _TokenDataset
from test_model import _id_probes


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("approx")
    info = write_arch_run(root / "run", "qwen2", rows=4)  # every step used these four rows: the training file
    _id_probes(root, vocab=VOCAB, n=4)
    train = root / "train.jsonl"
    rows = _TokenDataset(4, SEQ, VOCAB, SEED).ids
    train.write_text("".join(json.dumps({"id": f"u{i}", "prompt_ids": r[:1].tolist(), "completion": r[1:].tolist()}) + "\n" for i, r in enumerate(rows)))
    return info.root, root / "probes.jsonl", train


def _analyze(run, out, *extra):
    root, probes, train = run
    result = CliRunner().invoke(main, ["analyze", str(root), "--probes", str(probes), "--train", str(train), "-o", str(out), "-q",
                                       "--no-by-tensor", "--nodes", "0", *extra])  # fmt: skip
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        return ds.load()


def test_approximate_forces_are_labelled_and_their_error_is_measured(run, tmp_path):
    exact = _analyze(run, tmp_path / "exact.h5")
    approx = _analyze(run, tmp_path / "approx.h5", "--forces", "approximate")
    assert np.isnan(exact["force_approx_error"].values).all()
    errors = approx["force_approx_error"].values
    assert np.isfinite(errors).all() and (errors > 0).all()
    assert any("approximate: Adafactor-style rank-one P" in w for w in json.loads(approx.attrs["warnings"]))
    examples = [f"u{i}" for i in range(4)]
    for k, err in enumerate(errors):  # the stored error is the one between the two cubes
        rows = [r for r in exact["response"].values if r != ARGMAX]  # the stored error is over the probe rows, not y*
        a = approx["force"].isel(interval=k).sel(source=examples, response=rows).values
        e = exact["force"].isel(interval=k).sel(source=examples, response=rows).values
        a, e = a[np.isfinite(e)], e[np.isfinite(e)]
        assert err == pytest.approx(np.linalg.norm(a - e) / np.linalg.norm(e), rel=1e-4), k
    # momentum and weight decay are the same exact directions; the per-token split is exact too
    for source in ("momentum", "weight_decay"):
        np.testing.assert_allclose(approx["force"].sel(source=source).values, exact["force"].sel(source=source).values, rtol=1e-5, atol=1e-9)
    budget = approx["force"].sum("source") + approx["dlogp_unexplained"]
    np.testing.assert_allclose(budget.values, approx["dlogp_lin"].values, rtol=1e-5, atol=1e-7)
