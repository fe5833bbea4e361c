"""budget.py: row chunks sized from a memory budget, and the same cube whatever the chunk."""

from __future__ import annotations

import pytest

from ckptforce.budget import ACTIVATION_COPIES, VOCAB_COPIES, default_memory_gb, model_shape, rows_per_chunk


def test_rows_per_chunk_fits_the_budget_and_never_drops_below_one():
    per_row = 480 * (VOCAB_COPIES * 50257 + ACTIVATION_COPIES * 768 * 12) * 4  # GPT-2 small, 480 tokens, float32
    assert rows_per_chunk(4.0, width=480, vocab=50257, hidden=768, layers=12) == int(4 * 2**30 // per_row)
    assert rows_per_chunk(4.0, width=480, vocab=50257, hidden=768, layers=12) * per_row <= 4 * 2**30
    assert rows_per_chunk(0.001, width=480, vocab=150_000, hidden=4096, layers=32) == 1
    # longer rows or a bigger vocabulary: fewer rows; float64 halves them
    short = rows_per_chunk(2.0, width=16, vocab=50257)
    assert short > rows_per_chunk(2.0, width=512, vocab=50257) and short > rows_per_chunk(2.0, width=16, vocab=150_000)
    assert rows_per_chunk(2.0, width=16, vocab=50257, dtype_bytes=8) == pytest.approx(short / 2, abs=1)


def test_default_budget_and_model_shape():
    assert 0 < default_memory_gb("cpu") <= 8.0
    from fixtures.archs import llama_config

    class M:
        config = llama_config(64)

    assert model_shape(M()) == (32, 2) and model_shape(object()) == (None, None)


def test_a_tiny_budget_gives_one_row_chunks_and_the_same_cube(runs, tmp_path):
    """The whole pipeline with --memory so small that every chunk is one row equals the default run."""
    import json

    import numpy as np
    import xarray as xr
    from click.testing import CliRunner

    from ckptforce.cli import main

    info = runs["hf"]
    probes = tmp_path / "p.jsonl"
    probes.write_text("".join(json.dumps({"id": f"p{i}", "prompt_ids": [1, 2, 3 + i], "responses": {"chosen": [4, 5, 6], "rejected": [7, 8]}}) + "\n"
                              for i in range(3)))  # fmt: skip
    cubes = []
    for extra in ([], ["--memory", "0.05"]):
        out = tmp_path / f"cube{len(cubes)}.h5"
        r = CliRunner().invoke(main, ["analyze", str(info.root), "--probes", str(probes), "-o", str(out), "-q", "--nodes", "1", *extra])
        assert r.exit_code == 0, r.output
        with xr.open_dataset(out, engine="h5netcdf") as ds:
            cubes.append(ds.load())
        assert json.loads(cubes[-1].attrs["config"])["memory_gb"] == (0.05 if extra else None)
    for name in ("logp", "dlogp_lin", "dlogp_path", "dlogp_lin_tensor"):
        np.testing.assert_allclose(cubes[0][name].values, cubes[1][name].values, rtol=1e-5, atol=1e-7, err_msg=name)


def test_analyze_says_what_it_will_cost_before_it_starts(runs, tmp_path):
    import json
    import re

    from click.testing import CliRunner

    from ckptforce.budget import forwards_per_interval
    from ckptforce.cli import main

    probes = tmp_path / "p.jsonl"
    probes.write_text(json.dumps({"id": "p0", "prompt_ids": [1, 2, 3], "responses": {"chosen": [4, 5, 6]}}) + "\n")
    out = tmp_path / "cube.h5"
    r = CliRunner().invoke(main, ["analyze", str(runs["hf"].root), "--probes", str(probes), "-o", str(out), "--memory", "1"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("estimate: "))
    n = len(runs["hf"].steps) - 1
    assert re.match(rf"estimate: {n} interval\(s\) × \(~{forwards_per_interval(True, 2):.0f} forwards of 1 probe rows\) "
                    r"\(one forward ≈ [0-9.]+ s here\): about [0-9]+ s; chunks of \d+ rows \(memory budget 1.0 GiB\)$", line), line
    assert forwards_per_interval(False, 0) < forwards_per_interval(False, 2) < forwards_per_interval(True, 2)


def test_the_estimate_and_the_progress_count_the_training_examples_forces(runs, tmp_path):
    """With --train the one-line estimate adds the examples' forces (budget.training_forwards) and the progress moves
    through them: fractions of the interval that only grow, past the probe rows' share, to the end."""
    import json
    import re

    from ckptforce.budget import forwards_per_interval, training_forwards
    from ckptforce.pipeline import AnalysisConfig, analyze
    from fixtures.trainers import _sft_examples

    train = tmp_path / "train.jsonl"
    examples = _sft_examples()
    train.write_text("\n".join(json.dumps({"id": f"t{i}", **r}) for i, r in enumerate(examples)) + "\n")
    probes = tmp_path / "probes.jsonl"
    probes.write_text(json.dumps({"id": "q0", "prompt": "Q : where does alice live ? A :", "responses": {"chosen": " alice lives in paris ."}}) + "\n")
    config = AnalysisConfig.for_run(str(runs["trl"].root), str(probes), train=str(train), nodes=0, by_tensor=False)
    lines, seen = [], []
    analyze(config, tmp_path / "cube.h5", notify=lines.append, progress=lambda done, n: seen.append(done / n))
    extra = training_forwards(len(examples))
    assert re.search(rf"× \(~{forwards_per_interval(False, 0):.0f} forwards of 1 probe rows \+ ~{extra:.0f} for the forces of "
                     rf"{len(examples)} training examples\)", lines[0]), lines  # fmt: skip
    share = forwards_per_interval(False, 0) / (forwards_per_interval(False, 0) + extra) / (len(runs["trl"].steps) - 1)
    assert seen == sorted(seen) and seen[-1] == 1.0
    assert any(share < f < 1 / (len(runs["trl"].steps) - 1) for f in seen), seen  # within the first interval, in its examples
