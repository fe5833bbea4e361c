"""The ``compose`` sample run (sample_runs/recipes/compose.py): a compositional and a permuted mapping of equal size,
and, from ckptforce's own cubes, the simplicity bias of the force analysis (Ren, arXiv 2509.19554; Ren et al., arXiv
2409.09626): the compositional run's examples of one factor support each other more, and it is learned faster."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose():
    sys.path.insert(0, str(ROOT))
    from sample_runs.recipes import compose

    return compose


def test_the_two_mappings_share_inputs_and_outputs_but_not_structure(compose, tmp_path):
    comp, perm = compose.examples("compositional"), compose.examples("permuted")
    assert len(comp) == len(perm) == compose.CONFIG.values**2
    assert [r["prompt"] for r in comp] == [r["prompt"] for r in perm] and [r["meta"] for r in comp] == [r["meta"] for r in perm]
    assert Counter(r["completion"] for r in comp) == Counter(r["completion"] for r in perm)  # the same 36 outputs

    def words_of(rows, factor: str, position: int) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for r in rows:
            out.setdefault(r["meta"][factor], set()).add(r["completion"].split()[position])
        return out

    assert all(len(w) == 1 for w in words_of(comp, "colour", 0).values())  # each output word is one factor's word
    assert all(len(w) == 1 for w in words_of(comp, "shape", 1).values())
    assert all(len(w) > 1 for w in words_of(perm, "colour", 0).values())  # no colour decides a permuted first word
    assert all(len(w) > 1 for w in words_of(perm, "shape", 1).values())
    with pytest.raises(ValueError, match="known: compositional, permuted"):
        compose.examples("holistic")
    with pytest.raises(ValueError, match="each factor has 2 to 6 values"):
        compose.examples("compositional", values=7)


def test_the_training_files_are_probe_files_grouped_by_factor(compose, tmp_path):
    from ckptforce.probe_file import load_probe_set
    from ckptforce.train_examples import load_training_set

    files = compose.write_data(tmp_path)
    assert set(files) == {f"train_{m}" for m in compose.MAPPINGS}
    for name in files.values():
        probes = load_probe_set(tmp_path / name)
        assert {"meta.colour", "meta.shape"} <= set(probes.labels)
        tset = load_training_set(tmp_path / name)
        assert tset.objective == "sft" and len(tset.examples) == compose.CONFIG.values**2
    tok = compose.tokenizer()
    row = json.loads((tmp_path / files["train_compositional"]).read_text().splitlines()[0])
    ids = tok(row["prompt"] + row["completion"])["input_ids"]
    assert tok.unk_token_id not in ids and ids[0] == tok.bos_token_id and len(ids) + 1 <= compose.N_POSITIONS  # + <eos>


@pytest.mark.slow  # about 5 min on 2 busy cores: both runs trained (~15 s), then analysed with every example as a probe
def test_compositional_run_supports_itself_within_a_factor_and_learns_faster(compose, tmp_path):
    import xarray as xr
    from click.testing import CliRunner

    from ckptforce.cli import main
    from ckptforce.report.diagnostics_support import compare_support
    from sample_runs import recipes

    run = recipes.ensure("compose", tmp_path / "cache")
    cubes = {}
    for m in compose.MAPPINGS:
        ckpts = sorted(int(p.name.split("-")[1]) for p in (run / m).glob("checkpoint-*"))
        assert ckpts == list(range(compose.CONFIG.save, compose.CONFIG.steps + 1, compose.CONFIG.save))
        train = str(run / f"train_{m}.jsonl")
        args = ["analyze", str(run / m), "--init", str(run / "init"), "--probes", train, "--train", train,
                "-o", str(tmp_path / f"{m}.h5"), "--no-by-tensor", "--nodes", "0", "-q"]  # fmt: skip
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        with xr.open_dataset(tmp_path / f"{m}.h5", engine="h5netcdf") as ds:
            cubes[m] = ds.load()
    for by in ("meta.colour", "meta.shape"):
        d = compare_support(cubes, by=by)
        t = d.tables["runs"].set_index("run")
        print(f"\n{by}\n{d.tables['runs'].to_string()}\n{d.verdict}")
        comp, perm = t.loc["compositional"], t.loc["permuted"]
        assert comp["within"] > max(perm["within"], comp["across"], 0), d.verdict  # stronger within-factor support
        assert perm["within"] < perm["across"], d.verdict  # same input word, different outputs: they fight
        assert comp["area"] > perm["area"] and comp["fitted"] == comp["examples"], d.verdict  # faster learning
        assert comp["fitted_step"] < perm["fitted_step"], d.verdict
        assert d.verdict.startswith(f"compositional supports itself more within a {by} group than permuted")
        assert "compositional learned faster" in d.verdict
    assert np.isfinite(cubes["compositional"]["force"].values).all()
