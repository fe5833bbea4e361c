"""Mutual support between training examples (report/diagnostics_support.py): known answers on a hand-made cube,
and the section on a real analysis whose probes are its training examples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from ckptforce.report.diagnostics_support import mutual_support


def _cube(m: np.ndarray, logp: np.ndarray, groups: list[str], length: int = 4) -> xr.Dataset:
    """force (1 interval) = m on 'chosen', logp (C, N) summed over ``length`` tokens of −1 … per token."""
    n, c = m.shape[0], logp.shape[0]
    ids = [f"u{i}" for i in range(n)]
    sources = ids + ["momentum", "weight_decay"]
    force = np.zeros((1, n, 2, n + 2))
    force[0, :, 0, :n] = m
    tok = np.zeros((c, n, 2, length + 2))
    tok[..., :length] = -0.1  # nonzero on the response tokens
    return xr.Dataset(
        {
            "force": (("interval", "probe", "response", "source"), force),
            "logp": (("checkpoint", "probe", "response"), np.stack([logp, logp], -1)),
            "logp_tok": (("checkpoint", "probe", "response", "token"), tok),
        },
        coords={"probe": ids, "response": ["chosen", "argmax"], "source": sources, "checkpoint": list(range(c)), "interval": [0],
                "step": ("checkpoint", [10 * k for k in range(c)]), "probe_group": ("probe", groups),
                "source_kind": ("source", ["example"] * n + ["momentum", "weight_decay"])},
    )  # fmt: skip


def test_known_answers_on_a_hand_made_cube():
    groups = ["a", "a", "b", "b"]
    same = np.equal.outer(groups, groups)
    m = np.where(same, 1.0, -0.5)
    np.fill_diagonal(m, 2.0)
    m[3, 2] = -3.0  # u2 fights u3: u3 is the one example the rest does not help
    per_token = np.array([[-3.0, -3.0, -3.0, -3.0], [-1.0, -1.5, -2.5, -2.9], [-0.2, -0.5, -2.0, -2.8]])  # (C, N)
    d = mutual_support(_cube(m, per_token * 4, groups))
    ex = d.tables["examples"].set_index("example")
    np.testing.assert_allclose(ex["self"], [2, 2, 2, 2])
    np.testing.assert_allclose(ex["support"], [1 - 1, 1 - 1, 1 - 1, -3 - 1])
    np.testing.assert_allclose(ex["area"], (per_token - per_token[0]).mean(0))
    np.testing.assert_array_equal(ex["fitted_step"], [20.0, 20.0, np.nan, np.nan])  # per token ≥ log ½ ≈ −0.69 at step 20
    g = d.tables["groups"].set_index("group")
    assert g.loc["a", "within"] == pytest.approx(1.0) and g.loc["b", "within"] == pytest.approx((1 - 3) / 2)
    assert g.loc["a", "across"] == pytest.approx(-0.5)
    assert d.numbers["within"] == pytest.approx((1 + 1 + 1 - 3) / 4) and d.numbers["across"] == pytest.approx(-0.5)
    assert d.numbers["helped"] == 0 and d.numbers["fitted"] == 2
    assert "0 of 4 training examples are helped" in d.verdict and "support each other more than across groups (+0.00 vs −0.50" in d.verdict


def test_absent_without_the_examples_as_probes():
    ds = _cube(np.ones((3, 3)), np.zeros((2, 3)), ["a", "a", "a"]).assign_coords(probe=["p0", "p1", "p2"])
    d = mutual_support(ds)
    assert d.missing and "--probes TRAIN --train TRAIN" in d.missing


def test_on_a_real_analysis_of_training_examples_as_probes(tmp_path):
    """A Trainer run whose every step used the same 4 rows, analyzed with those rows as the probes and the training
    file: the section's numbers are the cube's forces, and the HTML report shows it with its verdict."""
    from click.testing import CliRunner

    from ckptforce.cli import main
    from fixtures.arch_runs import SEQ, VOCAB, write_arch_run
    from fixtures.trainers import SEED, _TokenDataset

    info = write_arch_run(tmp_path / "run", "gpt2", rows=4)
    rows = _TokenDataset(4, SEQ, VOCAB, SEED).ids
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"u{i}", "prompt_ids": r[:1].tolist(), "completion": r[1:].tolist(), "group": "ab"[i % 2]}) + "\n"
                             for i, r in enumerate(rows)))  # fmt: skip
    out = tmp_path / "audit"
    result = CliRunner().invoke(main, ["audit", str(info.root), "--probes", str(train), "--train", str(train), "-o", str(out), "-q",
                                       "--no-by-tensor", "--nodes", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out / "cube.h5", engine="h5netcdf") as ds:
        d = mutual_support(ds.load())
    assert not d.missing, d.missing
    m = ds["force"].sel(response="chosen", probe=[f"u{i}" for i in range(4)], source=[f"u{i}" for i in range(4)]).sum("interval").values
    np.testing.assert_allclose(d.tables["examples"]["support"], m.sum(1) - np.diag(m), rtol=1e-12)
    assert set(d.tables["groups"]["group"]) == {"a", "b"}
    html = (out / "report.html").read_text()
    assert "Mutual support between training examples" in html and d.verdict.split(";")[0].split(" (")[0] in html


def test_compare_support_ranks_runs_by_within_group_support_and_learning_speed():
    """Two hand-made runs of the same four examples: one whose groups support themselves and which is fitted by step 10,
    one with no shared structure that is never fitted; the comparison's numbers are each run's mutual_support."""
    from ckptforce.report.diagnostics_support import compare_support

    groups = ["a", "a", "b", "b"]
    same = np.equal.outer(groups, groups)
    fast = np.array([[-3.0] * 4, [-0.5, -0.4, -0.6, -0.3], [-0.1] * 4]) * 4  # (C, N): fitted at step 10
    slow = np.array([[-3.0] * 4, [-2.5] * 4, [-2.0] * 4]) * 4  # never reaches log ½ per token
    runs = {"compositional": _cube(np.where(same, 1.0, 0.1), fast, groups), "permuted": _cube(np.where(same, 0.0, 0.2), slow, groups)}
    d = compare_support(dict(reversed(runs.items())))  # the table is ranked by within-group support, not by order given
    t = d.tables["runs"].set_index("run")
    assert list(d.tables["runs"]["run"]) == ["compositional", "permuted"]
    for name, ds in runs.items():
        one = mutual_support(ds)
        assert t.loc[name, "within"] == pytest.approx(one.numbers["within"]) and t.loc[name, "across"] == pytest.approx(one.numbers["across"])
        assert t.loc[name, "area"] == pytest.approx(one.tables["examples"]["area"].mean())
    assert t.loc["compositional", "fitted"] == 4 and t.loc["compositional", "fitted_step"] == 10.0
    assert t.loc["permuted", "fitted"] == 0 and np.isinf(t.loc["permuted", "fitted_step"])
    assert d.verdict.startswith("compositional supports itself more within a group than permuted (+1.00 vs +0.00 nats per pair")
    assert "compositional learned faster" in d.verdict and "the median example never" in d.verdict
    assert compare_support({"one": runs["permuted"]}).missing.startswith("needs two runs")
