"""The sample-run recipes (sample_runs/recipes): their files, their runs, and the sign table of the LLM paper.

The sign table (Ren & Sutherland, ICLR 2025; DESIGN §4 "Trends the papers report") is read from ckptforce's
own cube: ``logp`` at the last checkpoint minus the first, averaged over the probes, per response type.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_runs" / "data" / "lm"
TYPES = ("chosen", "rejected", "rephrase_chosen", "rephrase_rejected", "format_chosen", "format_rejected",
         "other_trained", "other_untrained", "irrelevant", "shuffled", "random")  # fmt: skip


@pytest.fixture(scope="module")
def recipes():
    import sys

    sys.path.insert(0, str(ROOT))
    from sample_runs import recipes

    return recipes


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --- the files, without training ----------------------------------------------------------------------------


def test_committed_lm_files_are_what_the_recipe_writes(recipes, tmp_path):
    from sample_runs.recipes import lm

    files = lm.write_data(tmp_path)
    for name in files.values():
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), f"{name}: rerun lm.write_data('sample_runs/data/lm')"


def test_lm_probe_file_has_every_response_type_split_and_group():
    from ckptforce.names import RESPONSE_TYPES
    from ckptforce.probes import load_probe_set

    probe_set = load_probe_set(DATA / "probes.jsonl")  # validates against schemas/probe_set.schema.json
    assert set(probe_set.response_types) == set(RESPONSE_TYPES) == set(TYPES)
    assert all(set(p.responses) == set(TYPES) for p in probe_set.probes)
    assert {p.split for p in probe_set.probes} == {"train", "test"}
    assert {p.group for p in probe_set.probes} == {"city", "job"}


def test_lm_training_files_are_what_the_probes_say():
    probes = _jsonl(DATA / "probes.jsonl")
    sft, dpo = _jsonl(DATA / "train_sft.jsonl"), _jsonl(DATA / "train_dpo.jsonl")
    assert all(set(r) == {"id", "prompt", "completion"} for r in sft)  # TRL prompt-completion
    assert all(set(r) == {"id", "prompt", "chosen", "rejected"} for r in dpo)  # TRL preference
    assert [r["prompt"] for r in sft] == [r["prompt"] for r in dpo]
    trained = {r["prompt"]: r for r in dpo}
    for p in probes:
        if p["split"] == "train":
            pair = trained[p["prompt"]]
            assert (p["responses"]["chosen"], p["responses"]["rejected"]) == (pair["chosen"], pair["rejected"])
            assert p["responses"]["other_trained"] in {r["chosen"] for r in dpo}
        else:
            assert p["prompt"] not in trained
        assert p["responses"]["other_untrained"] not in {r["chosen"] for r in dpo}
        assert len(p["responses"]["rejected"].split()) > len(p["responses"]["chosen"].split())  # longer (DESIGN §4)


def test_digits_arrays_load_as_class_probes(recipes, tmp_path):
    pytest.importorskip("sklearn", reason="the digits recipe reads scikit-learn's digits")
    from ckptforce.probes import load_class_probes
    from sample_runs.recipes import digits

    files = digits.write_data(tmp_path)
    noisy = load_class_probes(tmp_path / files["probes_noisy"])
    assert noisy.x.shape == (100, 64) and int(noisy.flipped.sum()) == 50
    train = load_class_probes(tmp_path / files["train_noisy"])
    assert abs(float(train.flipped.float().mean()) - 0.2) < 0.01
    assert set(noisy.ids) <= set(train.ids)
    d = digits.dataset()
    assert bool((d["y_noisy"][d["flipped"]] != d["y_train"][d["flipped"]]).all())  # a flip is always to another class
    assert bool((d["y_noisy"][~d["flipped"]] == d["y_train"][~d["flipped"]]).all())
    test = load_class_probes(tmp_path / files["probes_test"])
    assert not set(test.ids) & set(train.ids)


def test_a_build_refuses_a_folder_in_use(recipes, tmp_path):
    from sample_runs.recipes import lm

    (tmp_path / "old.txt").write_text("a previous build")
    with pytest.raises(FileExistsError, match="not empty"):
        lm.build(tmp_path)


def test_cache_key_follows_the_sources(recipes, tmp_path, monkeypatch):
    monkeypatch.setenv("CKPTFORCE_SAMPLE_RUNS", str(tmp_path))
    assert recipes.cache_root() == tmp_path
    path = recipes.cached_path("lm")
    assert path.parent == tmp_path and path.name == f"lm-{recipes.source_hash('lm')}"
    assert recipes.source_hash("lm") != recipes.source_hash("digits")
    with pytest.raises(ValueError, match="known: lm, digits, compose"):
        recipes.recipe("nope")


# --- the runs -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_run(recipes, tmp_path_factory) -> Path:
    pytest.importorskip("sklearn", reason="the digits recipe reads scikit-learn's digits")
    return recipes.ensure("digits", tmp_path_factory.mktemp("cache"))


def test_digits_runs_are_lightning_runs_ckptforce_reads(digits_run):
    from ckptforce.io import open_run

    for name, epochs in (("noisy", 40), ("hp", 10), ("ft", 10)):
        run = open_run(digits_run / name)
        assert run.layout == "lightning"
        steps = [c.step for c in run.checkpoints]
        assert steps[0] == 0 and len(steps) == epochs + 1 and steps == sorted(steps)


def test_digits_runs_tell_their_stories(digits_run):
    """Noisy labels: learnt as the true class first, memorised later. Head probing leaves the backbone alone."""
    import torch

    from sample_runs.recipes import digits

    d = digits.dataset()
    x, flipped = torch.from_numpy(d["x_train"]), d["flipped"]

    def load(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net = digits.model(ckpt["hyper_parameters"])
        net.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
        return net, ckpt["state_dict"]

    def memorised(path):  # share of flipped examples predicted as their (wrong) training label
        net, _ = load(path)
        with torch.no_grad():
            pred = net(x).argmax(1).numpy()
        return float((pred[flipped] == d["y_noisy"][flipped]).mean()), float((pred[flipped] == d["y_train"][flipped]).mean())

    ckpts = digits.checkpoints(digits_run / "noisy")
    early, late = memorised(ckpts[5]), memorised(ckpts[-1])
    assert early[1] > 0.8 and early[0] < 0.1  # the true class first
    assert late[0] > 0.3  # then the flipped label

    hp = [load(p)[1] for p in digits.checkpoints(digits_run / "hp")]
    ft = [load(p)[1] for p in digits.checkpoints(digits_run / "ft")]
    for k in hp[0]:
        moved = not torch.equal(hp[0][k], hp[-1][k])
        assert moved == k.startswith("model.head."), k
    assert all(torch.equal(hp[-1][k], ft[0][k]) for k in hp[-1])  # fine-tuning starts where probing ended
    assert not torch.equal(ft[0]["model.backbone.0.weight"], ft[-1]["model.backbone.0.weight"])


@pytest.fixture(scope="module")
def lm_run(recipes, tmp_path_factory) -> Path:
    return recipes.ensure("lm", tmp_path_factory.mktemp("cache"))


def _analyze(run: Path, init: Path, probes: Path, out: Path) -> dict[str, float]:
    """ckptforce analyze (the CLI, in process), then logp(last) − logp(first) averaged over the probes."""
    import xarray as xr
    from click.testing import CliRunner

    from ckptforce.cli import main

    args = ["analyze", str(run), "--init", str(init), "--probes", str(probes), "-o", str(out), "--no-by-tensor", "--nodes", "0", "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as cube:
        change = cube.logp.isel(checkpoint=-1) - cube.logp.isel(checkpoint=0)  # (probe, response)
        return {str(k): float(v) for k, v in change.mean("probe").to_series().items()}


def test_lm_runs_hold_checkpoints_with_optimizer_state_and_tokenizer(lm_run):
    from sample_runs.recipes import lm

    for stage in ("sft", "dpo"):
        ckpts = sorted((lm_run / stage).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        assert [int(p.name.split("-")[1]) for p in ckpts] == list(range(5, 45, 5))
        for c in ckpts:
            assert {"model.safetensors", "optimizer.pt", "trainer_state.json", "tokenizer.json"} <= {p.name for p in c.iterdir()}
    manifest = json.loads((lm_run / "MANIFEST.json").read_text())
    assert manifest["files"]["dpo_init"] == "sft/checkpoint-40" == str(lm.last_checkpoint(lm_run / "sft").relative_to(lm_run))
    assert (lm_run / "pretrain" / "tokenizer.json").is_file()


def test_sign_table_of_the_llm_paper(lm_run, tmp_path):
    """SFT: chosen ↑, other_trained ↑, shuffled and random ↓. DPO: rejected falls more than chosen, y* ↑,
    most other types ↓ (the squeezing effect)."""
    manifest = json.loads((lm_run / "MANIFEST.json").read_text())
    probes = lm_run / manifest["files"]["probes"]
    sft = _analyze(lm_run / "sft", lm_run / "pretrain", probes, tmp_path / "sft.h5")
    dpo = _analyze(lm_run / "dpo", lm_run / manifest["files"]["dpo_init"], probes, tmp_path / "dpo.h5")
    table = "\n".join(f"{t:18s} {sft[t]:+8.2f} {dpo[t]:+8.2f}" for t in (*TYPES, "argmax"))
    print(f"\nΔ logp, last − first checkpoint, mean over probes\n{'type':18s} {'SFT':>8s} {'DPO':>8s}\n{table}")

    assert sft["chosen"] > 0, table
    assert sft["other_trained"] > 0, table
    assert sft["shuffled"] < 0 and sft["random"] < 0, table

    assert dpo["rejected"] < min(dpo["chosen"], 0), table
    assert dpo["argmax"] > 0, table
    others = [t for t in TYPES if t not in ("chosen", "rejected")]
    falling = [t for t in others if dpo[t] < 0]
    assert len(falling) >= 2 * len(others) / 3, table
    assert np.isfinite(list(sft.values()) + list(dpo.values())).all()


@pytest.mark.slow
def test_grpo_run_with_a_checkpoint_per_step_is_explained_by_its_rollouts(lm_run, tmp_path):
    """TRL's GRPOTrainer, 3 steps from the SFT model with a checkpoint after each: the rollouts it recorded, read
    with its loss type, groups per step and the clipping it logged, explain the first-order change of every probe
    (unexplained ≤ 5 % of Δ_lin per interval, float64); the report's GRPO section reads its numbers from the cube."""
    import dataclasses

    import xarray as xr
    from click.testing import CliRunner

    from ckptforce.cli import main
    from ckptforce.report.diagnostics_rl import lazy_displacement
    from sample_runs.recipes import lm
    from sample_runs.recipes._common import one_thread, quiet

    with quiet(), one_thread():
        lm.grpo(tmp_path / "grpo", lm.last_checkpoint(lm_run / "sft"), dataclasses.replace(lm.CONFIG, grpo_steps=3, grpo_save=1))
    header = json.loads((tmp_path / "train_grpo.jsonl").read_text().splitlines()[0])
    assert header == {"objective": "grpo", "batch_size": 2, "loss_type": "dapo", "max_completion_length": 12}
    out = tmp_path / "grpo.h5"
    args = ["analyze", str(tmp_path / "grpo"), "--init", str(lm.last_checkpoint(lm_run / "sft")), "--probes", str(lm_run / "probes.jsonl"),
            "--train", str(tmp_path / "train_grpo.jsonl"), "-o", str(out), "--no-by-tensor", "--nodes", "0", "--dtype", "float64", "-q"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        ds = ds.load()
    assert ds.sizes["interval"] == 3
    lin = abs(ds["dlogp_lin"]).max(["probe", "response"])
    rest = abs(ds["dlogp_unexplained"]).max(["probe", "response"])
    assert float((rest / lin).max()) < 0.05, (rest / lin).values
    d = lazy_displacement(ds)
    assert not d.missing and d.numbers["groups"] == int(ds["lld"].sel(source=d.tables["groups"]["group"].tolist()).notnull().any("interval").sum())
    assert len(d.tables["tokens"]) and np.isfinite(d.numbers["spearman"])
    assert d.verdict.startswith(f"{int(d.numbers['lazy'])} of {int(d.numbers['groups'])} groups have lazy correct completions")
    worst = d.tables["tokens"].iloc[0]
    assert worst["harm"] > 0 and d.highlights and d.highlights[0].label == f"{worst['group']} / {worst['completion']}"
