"""Run folders as users have them, through the command line: a base model beside TRL's checkpoints, Lightning's
folders, several runs below one folder. Every command leaves the folder byte-identical (``tree_digest``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckptforce.cli import main
from conftest import tree_digest
from fixtures import layouts


@pytest.fixture(scope="module")
def trl(tmp_path_factory):
    return layouts.write_trl_run_with_base(tmp_path_factory.mktemp("trl") / "sft_out")


@pytest.fixture(scope="module")
def lightning(tmp_path_factory):
    """{"folder": checkpoints/ beside lightning_logs/, "default": lightning_logs/version_{0,1}/checkpoints}."""
    base = tmp_path_factory.mktemp("lightning")
    return {"folder": layouts.write_lightning_folder(base / "folder"), "default": layouts.write_lightning_default(base / "default", 2)}


def scan_json(*args) -> tuple[dict, str]:
    result = CliRunner().invoke(main, ["scan", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    return summary, " | ".join(summary["notes"])


def refused(*args) -> str:
    result = CliRunner().invoke(main, ["scan", *map(str, args)])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("ckptforce: error: "), result.output
    return lines[0]


def test_base_model_beside_trl_checkpoints_is_left_out_with_a_note(trl):
    before = tree_digest(trl.root)
    summary, notes = scan_json(trl.root)
    assert [c["step"] for c in summary["checkpoints"]] == trl.steps == [2, 4]
    assert f"{trl.extra['base']}: left out — no step recorded" in notes and f"pass --init {trl.extra['base']}" in notes
    assert tree_digest(trl.root) == before


def test_base_model_named_by_init_starts_the_run(trl):
    before = tree_digest(trl.root)
    summary, notes = scan_json(trl.root, "--init", trl.extra["base"])
    rows = [(Path(c["path"]).name, c["step"], c["step_source"]) for c in summary["checkpoints"]]
    assert rows == [("base", 0, "init"), ("checkpoint-2", 2, "record"), ("checkpoint-4", 4, "record")]
    assert "left out" not in notes
    assert tree_digest(trl.root) == before


def test_lightning_checkpoints_folder_beside_lightning_logs_is_found(lightning):
    info = lightning["folder"]
    root = info.root.parent  # the training folder: checkpoints/ and lightning_logs/version_0/
    before = tree_digest(root)
    summary, notes = scan_json(root)
    assert summary["layout"] == "lightning" and Path(summary["run"]) == info.root
    assert [c["step"] for c in summary["checkpoints"]] == info.steps == [2, 4, 6]
    assert f"{root} holds no checkpoints of its own; using the lightning run found in checkpoints (3 checkpoints)" in notes
    assert tree_digest(root) == before


def test_lightning_default_layout_is_found_three_levels_down(lightning, tmp_path):
    one = tmp_path / "project"
    shutil.copytree(lightning["default"][0].root.parent, one / "lightning_logs" / "version_0")
    summary, notes = scan_json(one)
    assert [c["step"] for c in summary["checkpoints"]] == [2, 4, 6]
    assert "using the lightning run found in lightning_logs/version_0/checkpoints" in notes


def test_two_lightning_versions_are_listed_not_chosen(lightning):
    root = lightning["default"][0].root.parents[2]
    before = tree_digest(root)
    line = refused(root)
    assert (f"{root}: no checkpoints of its own, and 2 runs below it: lightning_logs/version_0/checkpoints (lightning, 3 "
            "checkpoints); lightning_logs/version_1/checkpoints (lightning, 3 checkpoints); give the one to audit as "
            f"RUN_DIR, e.g. {root}/lightning_logs/version_0/checkpoints") in line  # fmt: skip
    assert tree_digest(root) == before


def test_two_trainers_outputs_are_listed_not_chosen(trl, lightning, tmp_path):
    shutil.copytree(trl.root, tmp_path / "work" / "sft_out")
    shutil.copytree(lightning["folder"].root, tmp_path / "work" / "classifier" / "checkpoints")
    line = refused(tmp_path / "work")
    assert "2 runs below it: sft_out (hf, 3 checkpoints); classifier/checkpoints (lightning, 3 checkpoints)" in line
    assert "give the one to audit as RUN_DIR" in line


def test_analyze_starts_from_the_base_model_inside_the_run(trl, tmp_path):
    probes = tmp_path / "probes.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"Q: where does {p} live ? A:", "responses": {"chosen": f" {p} lives in {c} ."},
             "meta": {"name": p}} for i, (p, c) in enumerate([("alice", "paris"), ("bob", "rome")])]  # fmt: skip
    probes.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = tree_digest(trl.root)
    out = tmp_path / "cube.h5"
    result = CliRunner().invoke(main, ["analyze", str(trl.root), "--init", str(trl.extra["base"]), "--probes", str(probes),
                                       "--nodes", "0", "--no-by-tensor", "-o", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    from ckptforce.cube import open_cube

    ds = open_cube(out)
    assert list(ds["step"].values) == [0, 2, 4] and list(ds["step_source"].values) == ["init", "record", "record"]
    assert list(ds["probe:meta.name"].values) == ["alice", "bob"]
    assert tree_digest(trl.root) == before
