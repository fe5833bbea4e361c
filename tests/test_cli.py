"""``ckptforce scan`` through click's CliRunner: every layout, --json against the schema, and user errors.

A user error exits 2 with one line on stderr that names the file and says what to do, no traceback (unless
--debug), and leaves the run directory byte-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptforce.cli import main
from conftest import EXPECTED_LAYOUT, tree_digest

SCHEMA = json.loads((Path(__file__).parents[1] / "schemas" / "scan.schema.json").read_text())


def scan(*args: str):
    return CliRunner().invoke(main, ["scan", *map(str, args)])


@pytest.mark.parametrize("name", list(EXPECTED_LAYOUT))
def test_scan_every_layout(name, runs):
    info = runs[name]
    before = tree_digest(info.root)
    table = scan(info.root)
    assert table.exit_code == 0, table.output
    assert f"layout {EXPECTED_LAYOUT[name]}" in table.output
    out = scan(info.root, "--json")
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    jsonschema.validate(summary, SCHEMA)
    steps = [0] * (name == "peft") + info.steps  # an adapter run starts at its base model, step 0
    assert [c["step"] for c in summary["checkpoints"]] == steps
    assert len(summary["intervals"]) == len(steps) - 1
    assert all(iv["update_norm"] > 0 for iv in summary["intervals"])
    assert tree_digest(info.root) == before, "scan wrote into the run directory"


def test_scan_with_init_outside_run(runs):
    info = runs["nanogpt"]
    out = scan(info.root, "--init", info.extra["init"], "--json")
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert [c["step_source"] for c in summary["checkpoints"]] == ["init", "record", "record", "record"]


def test_help_explains():
    out = CliRunner().invoke(main, ["scan", "--help"])
    assert out.exit_code == 0 and "--trust-pickles" in out.output and "Examples" in out.output


# --- bad input ---------------------------------------------------------------------------------------


def _copy(runs, name: str, tmp_path: Path) -> Path:
    dest = tmp_path / name
    shutil.copytree(runs[name].root, dest)
    return dest


def _tiny(path: Path, **shapes) -> None:
    save_file({k: torch.ones(v) for k, v in (shapes or {"w": (2, 2)}).items()}, path)


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _bad_inputs(runs, tmp_path: Path):
    """(case, run directory, expected fragments of the message) for each bad input."""
    cases = []
    empty = tmp_path / "empty"
    empty.mkdir()
    cases.append(("empty dir", empty, ["the directory is empty"]))
    cases.append(("missing dir", tmp_path / "nope", ["no such directory"]))
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("hi")
    (unknown / "data.csv").write_text("a,b")
    cases.append(("unknown layout", unknown, ["no checkpoints of a known layout", "notes.txt", "Known layouts", "safetensors"]))

    truncated = _copy(runs, "safetensors", tmp_path)
    victim = sorted(truncated.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[:-20])
    cases.append(("truncated safetensors", truncated, [victim.name, "truncated", "re-save it"]))

    corrupt = _copy(runs, "safetensors", tmp_path / "c")
    victim2 = sorted(corrupt.glob("*.safetensors"))[0]
    data = bytearray(victim2.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    victim2.write_bytes(bytes(data))
    cases.append(("corrupted header", corrupt, [victim2.name, "not a readable safetensors file"]))

    shapes = tmp_path / "shapes"
    shapes.mkdir()
    _tiny(shapes / "step_1.safetensors", w=(2, 2))
    _tiny(shapes / "step_2.safetensors", w=(3, 2))
    cases.append(("mismatched shapes", shapes, ["'w'", "[2, 2]", "[3, 2]", "step_1.safetensors", "step_2.safetensors"]))

    keys = tmp_path / "keys"
    keys.mkdir()
    _tiny(keys / "step_1.safetensors", w=(2, 2))
    _tiny(keys / "step_2.safetensors", v=(2, 2))
    cases.append(("different tensors", keys, ["hold different tensors", "step_1.safetensors", "step_2.safetensors"]))

    dup = tmp_path / "dup"
    dup.mkdir()
    torch.save({"w": torch.ones(2)}, dup / "a_step10.pt")
    torch.save({"w": torch.ones(2)}, dup / "b_step10.pt")
    torch.save({"w": torch.ones(2)}, dup / "c_step20.pt")
    cases.append(("duplicate steps", dup, ["a_step10.pt", "b_step10.pt", "both claim step 10"]))

    bad_state = _copy(runs, "hf", tmp_path)
    (bad_state / "checkpoint-4" / "trainer_state.json").write_text("{not json")
    cases.append(("broken trainer_state.json", bad_state, ["checkpoint-4/trainer_state.json", "not valid JSON"]))

    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "step_1.pt").write_bytes(b"this is not a torch file")
    torch.save({"w": torch.ones(2)}, garbage / "step_2.pt")
    cases.append(("not a torch file", garbage, ["step_1.pt", "not a readable torch.save file"]))
    return cases


def test_bad_inputs_give_one_clear_line(runs, tmp_path):
    for case, run_dir, fragments in _bad_inputs(runs, tmp_path):
        before = tree_digest(run_dir) if run_dir.exists() else None
        result = scan(run_dir)
        assert result.exit_code == 2, (case, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ckptforce: error: "), (case, result.stderr)
        assert "Traceback" not in result.output
        for fragment in fragments:
            assert fragment in lines[0], (case, fragment, lines[0])
        if before is not None:
            assert tree_digest(run_dir) == before, case


def test_pickle_with_code_is_refused_and_not_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Payload(marker)}, run / "step_1.pt")
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Payload(marker)}, run / "step_2.pt")
    result = scan(run)
    assert result.exit_code == 2
    assert "step_1.pt" in result.stderr and "--trust-pickles" in result.stderr and "run code" in result.stderr
    assert not marker.exists(), "the pickle payload ran"


def test_trust_pickles_opts_in(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "ran"
    for step in (1, 2):
        torch.save({"model": {"w": torch.full((2,), float(step))}, "extra": _Payload(marker)}, run / f"step_{step}.pt")
    result = scan(run, "--trust-pickles", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["intervals"][0]["update_norm"] == pytest.approx(2**0.5)
    assert marker.exists()  # the user opted in, and the file's code did run: that is what the flag means


def test_debug_shows_traceback(tmp_path):
    result = CliRunner().invoke(main, ["--debug", "scan", str(tmp_path / "nope")])
    assert result.exit_code != 0
    assert result.exception is not None and "no such directory" in str(result.exception)


def test_dcp_metadata_with_code_is_refused(runs, tmp_path):
    import pickle

    run = _copy(runs, "dcp", tmp_path)
    marker = tmp_path / "dcp-pwned"
    (run / "step_4" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    result = scan(run)
    assert result.exit_code == 2 and "step_4/.metadata" in result.stderr and "not allowed" in result.stderr
    assert not marker.exists()


def test_layout_choices_are_the_known_layouts():
    from ckptforce.cli import LAYOUT_NAMES
    from ckptforce.io import LAYOUTS

    assert LAYOUT_NAMES == list(LAYOUTS)


def test_split_by_with_no_by_tensor_is_refused(runs, tmp_path):
    probes = tmp_path / "p.jsonl"
    probes.write_text(json.dumps({"id": "a", "prompt_ids": [1, 2], "responses": {"chosen": [3]}}) + "\n")
    result = CliRunner().invoke(main, ["analyze", str(runs["hf"].root), "--probes", str(probes), "--no-by-tensor", "--split-by", "block",
                                       "-q", "-o", str(tmp_path / "c.h5")])  # fmt: skip
    assert result.exit_code != 0 and "--split-by block and --no-by-tensor" in result.output and not (tmp_path / "c.h5").exists()
