"""Bad input, one table: every row runs the real command line and must fail the same careful way.

For each row: exit code 2, exactly one line on stderr (``ckptforce: error: …``) that names the offending file
(or option) and says what to do, no traceback (``--debug`` shows one), nothing written into the run directory
(``tree_digest`` before = after), no output under its final name, and no code from a pickle run.

The runs are written directly with ``torch.save`` / safetensors (``fixtures/tiny_lm.py``): a few kB each, so
the whole table takes seconds. A few rows also run as a real process, where Python's warnings are not
filtered, to show that nothing else reaches stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from ckptforce import cube
from ckptforce.cli import main
from conftest import tree_digest
from fixtures.tiny_lm import FACTORY, MODEL_ARGS, tiny_state, write_id_probes, write_tiny_run

REPO = Path(__file__).parents[1]
SAMPLE = REPO / "sample_runs" / "tiny-gpt2-trainer"


@dataclass
class Case:
    args: list[str]  # after "ckptforce"
    watched: Path  # must be byte-identical afterwards (the run directory, or the cube's folder)
    names: list[str]  # fragments naming the offending file or option
    fix: str  # a fragment saying what to do
    outputs: list[Path] = field(default_factory=list)  # must not exist afterwards under their final names
    marker: Path | None = None  # a pickle payload would create it


class _Payload:
    """Unpickling this runs ``os.system("touch MARKER")``: code execution, made visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- builders ---------------------------------------------------------------------------------------------


def _analyze(t: Path, run: Path, *, probes: Path | None = None, out: Path | None = None, extra=()) -> list[str]:
    probes = probes or write_id_probes(t / "probes.jsonl")
    if out is None:
        out = t / "out" / "cube.h5"
        out.parent.mkdir(exist_ok=True)
    return ["analyze", str(run), "--probes", str(probes), "--model", FACTORY, "-o", str(out), "-q", *extra]


def _run(t: Path, steps=(10, 20, 30), **model_args) -> Path:
    return write_tiny_run(t / "run", steps, **model_args)


def _edit(path: Path, change: Callable[[dict], None]) -> None:
    obj = torch.load(path, weights_only=True)
    change(obj)
    torch.save(obj, path)


def _an(t: Path, run: Path, names, fix, **kw) -> Case:
    args = _analyze(t, run, **kw)
    return Case(args, run, names, fix, outputs=[Path(args[args.index("-o") + 1])])


def _probes(t: Path, *lines) -> Path:
    path = t / "probes.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _probe(i="p0", **kw) -> dict:
    return {"id": i, "prompt_ids": [1, 2], "responses": {"chosen": [3, 4]}, **kw}


def _st_run(t: Path, names=("model_step1", "model_step2", "model_step3")) -> Path:
    run = t / "run"
    run.mkdir()
    for i, name in enumerate(names):
        save_file(tiny_state(i), str(run / f"{name}.safetensors"))
    return run


def _hf_run(t: Path) -> Path:
    """The Trainer's folder layout by hand: checkpoint-N/ with model.safetensors and trainer_state.json."""
    run = t / "run"
    for step in (2, 4, 6):
        ck = run / f"checkpoint-{step}"
        ck.mkdir(parents=True)
        save_file(tiny_state(step), str(ck / "model.safetensors"))
        (ck / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    return run


def _trainer_run(t: Path) -> Path:
    """A copy of the bundled run a real Hugging Face Trainer wrote: config.json, optimizer.pt, trainer_state.json,
    the pickled training_args.bin / rng_state.pth, and no tokenizer."""
    if not SAMPLE.is_dir():
        pytest.skip(f"{SAMPLE} is not there")
    return Path(shutil.copytree(SAMPLE, t / "run"))


def _tiny_cube(path: Path, **attrs) -> Path:
    ds = cube.build(
        index={"checkpoint": [0, 1], "probe": ["a"], "response": ["chosen"]},
        data={"logp": np.zeros((2, 1, 1))}, coords={"step": [1, 2]}, attrs=attrs,
    )  # fmt: skip
    ds.to_netcdf(path, engine="h5netcdf")
    return path


def _report(t: Path, cube_path: Path, names, fix, out: Path | None = None) -> Case:
    out = out or t / "report"
    return Case(["report", str(cube_path), "-o", str(out)], cube_path.parent, names, fix, outputs=[out / "report.html", out / "report.pdf"])


# --- the rows ---------------------------------------------------------------------------------------------


def row_empty_dir(t):
    (t / "run").mkdir()
    return _an(t, t / "run", ["run"], "point at the folder")


def row_one_checkpoint(t):
    return _an(t, _run(t, steps=(10,)), ["run"], "add --init")


def row_unknown_layout(t):
    run = t / "run"
    run.mkdir()
    (run / "notes.txt").write_text("hello")
    (run / "weights.npz").write_bytes(b"PK")
    return _an(t, run, ["notes.txt", "weights.npz"], "point at the folder that holds the checkpoints")


def row_truncated_safetensors(t):
    run = _st_run(t)
    victim = run / "model_step2.safetensors"
    victim.write_bytes(victim.read_bytes()[:-40])
    return _an(t, run, ["model_step2.safetensors", "truncated"], "re-save it")


def row_corrupted_safetensors_header(t):
    run = _st_run(t)
    victim = run / "model_step1.safetensors"
    data = bytearray(victim.read_bytes())
    data[8:24] = b"\x00not json here!!"
    victim.write_bytes(bytes(data))
    return _an(t, run, ["model_step1.safetensors", "not a readable safetensors file"], "re-save it")


def row_pickle_with_code(t):
    run, marker = _run(t), t / "PWNED"
    _edit(run / "ckpt_000020.pt", lambda o: o.update(extra=_Payload(marker)))  # loading it would run the payload
    case = _an(t, run, ["ckpt_000020.pt", "run code"], "--trust-pickles")
    case.marker = marker
    return case


def row_pickle_in_trainer_optimizer_state(t):
    run, marker = _trainer_run(t), t / "PWNED"
    _edit(run / "checkpoint-4" / "optimizer.pt", lambda o: o.update(x=_Payload(marker)))
    return Case(["scan", str(run)], run, ["checkpoint-4/optimizer.pt", "run code"], "--trust-pickles", marker=marker)


def row_shapes_differ(t):
    run = _run(t, steps=(10, 20))
    write_tiny_run(run, steps=(30,), n_embd=4)
    return _an(t, run, ["ckpt_000010.pt", "[16, 8]", "[16, 4]"], "move the others out of the run directory")


def row_shapes_differ_scan(t):
    run = _st_run(t, ("model_step1", "model_step2"))
    save_file({**tiny_state(3), "head.bias": torch.zeros(3)}, str(run / "model_step3.safetensors"))
    return Case(["scan", str(run)], run, ["'head.bias'", "model_step1.safetensors", "model_step3.safetensors"], "move the odd one out")


def row_tensors_differ(t):
    run = _st_run(t, ("model_step1", "model_step2"))
    state = tiny_state(3)
    state["lm_head.weight"] = state.pop("head.weight")
    save_file(state, str(run / "model_step3.safetensors"))
    return Case(["scan", str(run)], run, ["hold different tensors", "model_step3.safetensors"], "move the odd one out")


def row_nan_weights(t):
    run = _run(t)
    _edit(run / "ckpt_000020.pt", lambda o: o["model"]["head.weight"].view(-1).__setitem__(5, float("nan")))
    return _an(t, run, ["ckpt_000020.pt", "'head.weight'", "NaN/Inf"], "analyze the checkpoints before it")


def row_inf_weights(t):
    run = _run(t)
    _edit(run / "ckpt_000030.pt", lambda o: o["model"]["wte.weight"].view(-1).__setitem__(0, float("-inf")))
    return _an(t, run, ["ckpt_000030.pt", "'wte.weight'", "NaN/Inf"], "ckptforce scan")


def row_duplicate_steps(t):
    run = _run(t)
    _edit(run / "ckpt_000030.pt", lambda o: o.update(iter_num=20))
    return _an(t, run, ["ckpt_000020.pt", "ckpt_000030.pt", "both claim step 20"], "move one of them out")


def row_several_runs_below(t):
    parent = t / "runs"  # no checkpoints of its own, two runs below: which one is meant would be a guess
    write_tiny_run(parent / "a", (10, 20))
    write_tiny_run(parent / "b" / "out", (10, 20))
    return _an(t, parent, ["runs: no checkpoints of its own, and 2 runs below it", "a (torch, 2 checkpoints)",
                           "b/out (torch, 2 checkpoints)"], "give the one to audit as RUN_DIR")  # fmt: skip


def row_non_numeric_safetensors_names(t):
    run = _st_run(t, ("model_best", "model_final", "model_last"))
    return _an(t, run, ["model_best.safetensors", "with the step in each name"], "point at the folder")


def row_garbage_torch_file(t):
    run = _run(t)
    (run / "ckpt_000020.pt").write_bytes(b"not a torch file at all")
    return _an(t, run, ["ckpt_000020.pt", "not a readable torch.save file"], "re-save it")


def row_broken_trainer_state(t):
    run = _hf_run(t)
    (run / "checkpoint-4" / "trainer_state.json").write_text('{"global_step": 4,')
    return Case(["scan", str(run)], run, ["checkpoint-4/trainer_state.json", "not valid JSON"], "restore the file")


def row_missing_shards(t):
    run = _hf_run(t)
    index = {"weight_map": {"wte.weight": "model-00001-of-00002.safetensors", "head.weight": "model-00002-of-00002.safetensors"}}
    (run / "checkpoint-4" / "model.safetensors").unlink()
    (run / "checkpoint-4" / "model.safetensors.index.json").write_text(json.dumps(index))
    return Case(["scan", str(run)], run, ["checkpoint-4/model.safetensors.index.json", "model-00001-of-00002"], "copy the missing shards")


def row_probe_bad_json(t):
    probes = _probes(t, _probe("a"), '{"id": "b", "prompt_ids": [1], "responses": ')
    return _an(t, _run(t), ["probes.jsonl:2", "not valid JSON"], "write one complete JSON object per line", probes=probes)


def row_probe_unknown_field(t):
    probes = _probes(t, {"id": "a", "prompt_ids": [1], "respones": {"chosen": [2]}})
    return _an(t, _run(t), ["probes.jsonl:1", "'respones'"], "did you mean 'responses'", probes=probes)


def row_probe_empty_response(t):
    probes = _probes(t, _probe("a"), _probe("b", responses={"chosen": [1], "rejected": ""}))
    return _an(t, _run(t), ["probes.jsonl:2", "responses.rejected"], "give the response text", probes=probes)


def row_probe_over_context(t):
    too_long = list(range(MODEL_ARGS["block_size"]))
    probes = _probes(t, _probe("a"), _probe("long", responses={"chosen": too_long}))
    return _an(t, _run(t), ["probes.jsonl:2", "context is 12"], "shorten it", probes=probes)


def row_probe_duplicate_ids(t):
    probes = _probes(t, _probe("q1"), _probe("q2"), _probe("q1"))
    return _an(t, _run(t), ["probes.jsonl:3", "'q1' is already used on line 1"], "unique id", probes=probes)


def row_probe_empty_file(t):
    probes = _probes(t)
    return _an(t, _run(t), ["probes.jsonl", "no probes"], "write one JSON object per line", probes=probes)


def row_probe_token_outside_vocabulary(t):
    probes = _probes(t, _probe("a"), _probe("b", responses={"chosen": [3, MODEL_ARGS["vocab_size"]]}))
    return _an(t, _run(t), ["probes.jsonl:2", "token id 16", "outside the model's vocabulary"], "--tokenizer", probes=probes)


def row_probe_text_hdf5_cannot_store(t):
    probes = _probes(t, _probe("a"), '{"id": "b\\u0000c", "prompt_ids": [1], "responses": {"chosen": [2]}}')
    return _an(t, _run(t), ["probes.jsonl:2", "NUL character"], "remove it", probes=probes)


def row_probe_nested_too_deeply(t):
    probes = _probes(t, "[" * 100_000)
    return _an(t, _run(t), ["probes.jsonl:1", "nested too deeply"], "one flat probe object per line", probes=probes)


def row_probe_file_is_a_directory(t):
    (t / "probes").mkdir()
    return _an(t, _run(t), ["probes", "is a directory"], "give the JSONL file of probes", probes=t / "probes")


def row_probe_file_missing(t):
    return _an(t, _run(t), ["nope.jsonl", "no such probe file"], "give the JSONL file", probes=t / "nope.jsonl")


def row_probe_not_utf8(t):
    path = t / "probes.jsonl"
    path.write_bytes(b'{"id": "caf\xe9", "prompt_ids": [1], "responses": {"chosen": [2]}}\n')
    return _an(t, _run(t), ["probes.jsonl", "not UTF-8"], "save the file as UTF-8", probes=path)


def row_missing_tokenizer(t):
    probes = _probes(t, {"id": "a", "prompt": "Q: where?", "responses": {"chosen": " Paris."}})
    run = _run(t)
    return _an(t, run, ["no tokenizer found", str(run)], "--tokenizer", probes=probes)


def row_missing_tokenizer_trainer_run(t):
    """Probe text for a real Trainer run that saved no tokenizer (the model comes from its config.json)."""
    run = _trainer_run(t)
    probes = _probes(t, {"id": "a", "prompt": "Q: where?", "responses": {"chosen": " Paris."}})
    args = ["analyze", str(run), "--probes", str(probes), "-o", str(t / "cube.h5"), "-q"]
    return Case(args, run, ["no tokenizer found", str(run / "checkpoint-6")], "--tokenizer", outputs=[t / "cube.h5"])


def row_factory_fails_to_import(t, monkeypatch):
    pkg = t / "mods"
    pkg.mkdir()
    (pkg / "broken_factory.py").write_text("import torch\nraise RuntimeError('this module is broken')\n\ndef make(a):\n    pass\n")
    monkeypatch.syspath_prepend(str(pkg))
    case = _an(t, _run(t), ["broken_factory", "this module is broken"], "PYTHONPATH")
    case.args[case.args.index("--model") + 1] = "broken_factory:make"
    return case


def row_factory_not_found(t):
    case = _an(t, _run(t), ["no_such_module", "cannot import"], "check the name")
    case.args[case.args.index("--model") + 1] = "no_such_module:make"
    return case


def row_output_dir_missing(t):
    return _an(t, _run(t), [str(t / "nowhere"), "no such directory"], "create it", out=t / "nowhere" / "cube.h5")


def row_output_dir_read_only(t):
    if os.geteuid() != 0:
        ro = t / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return _an(t, _run(t), [str(ro / "cube.h5.parts")], "choose an -o in a writable directory", out=ro / "cube.h5")
    # root writes through chmod: a read-only place root cannot write either (/proc takes no new files)
    if not Path("/proc/self").is_dir():
        pytest.skip("running as root without /proc: no read-only directory to write into")
    out = Path(f"/proc/ckptforce-test-{os.getpid()}.h5")
    return _an(t, _run(t), [str(out) + ".parts"], "choose an -o in a writable directory", out=out)


def row_output_under_a_file(t):
    (t / "afile").write_text("a file where a directory is expected")
    return _an(t, _run(t), [str(t / "afile"), "is a file, not a directory"], "choose another -o", out=t / "afile" / "cube.h5")


def row_output_is_a_directory(t):
    (t / "outdir").mkdir()
    case = _an(t, _run(t), [str(t / "outdir"), "is a directory"], "give the cube's file name", out=t / "outdir")
    case.outputs = [t / "outdir.parts"]
    return case


def row_output_is_the_probe_file(t):
    probes = write_id_probes(t / "probes.jsonl")
    case = _an(t, _run(t), ["probes.jsonl", "would be overwritten"], "choose another -o", probes=probes, out=probes)
    case.outputs = []
    case.watched = t  # the probe file must survive too
    return case


def row_output_inside_the_run(t):
    run = _run(t)
    case = _an(t, run, [str(run), "would be written into the run directory"], "choose an -o outside it", out=run / "cube.h5")
    return case


def row_parts_of_other_checkpoints(t):
    """An interrupted analysis, then the run changed (a checkpoint removed): its parts no longer fit."""
    from ckptforce import pipeline

    run = _run(t, steps=(10, 20, 30, 40))
    case = _an(t, run, ["interval-000000.h5", "ckpt_000010.pt", "checkpoints changed"], "to start over")
    out, probes = Path(case.args[case.args.index("-o") + 1]), Path(case.args[case.args.index("--probes") + 1])
    config = pipeline.AnalysisConfig.for_run(run, probes, model=FACTORY)
    pipeline.check_or_write_config(out.resolve(), config)
    cube.save(pipeline.compute_part(config.to_json(), 0), pipeline.part_path(out.resolve(), 0))
    pipeline._PREPARED.clear()
    (run / "ckpt_000020.pt").rename(t / "moved-away.pt")
    return case


def row_init_missing(t):
    return _an(t, _run(t), ["nope_init.pt", "does not exist"], "give the file or folder", extra=("--init", str(t / "nope_init.pt")))


def row_workers_and_scheduler(t):
    return _an(t, _run(t), ["--workers 2", "--scheduler tcp://127.0.0.1:9"], "not both", extra=("--workers", "2", "--scheduler", "tcp://127.0.0.1:9"))


def row_forced_layout_absent(t):
    run = _run(t)
    return Case(["scan", str(run), "--layout", "dcp"], run, ["no checkpoints of layout 'dcp'", "ckpt_000010.pt"], "drop --layout")


def row_cube_newer_schema(t):
    c = _tiny_cube(t / "cube.h5", ckptforce_schema=cube.SCHEMA_VERSION + 1)
    return _report(t, c, ["cube.h5", f"cube schema {cube.SCHEMA_VERSION + 1}"], "upgrade ckptforce")


def row_cube_random_hdf5(t):
    import h5py

    with h5py.File(t / "other.h5", "w") as f:
        f["data"] = np.arange(10.0)
        f.attrs["creator"] = "another tool"
    return _report(t, t / "other.h5", ["other.h5", "not a ckptforce cube"], "give a cube written by ckptforce analyze")


def row_cube_not_hdf5(t):
    (t / "cube.h5").write_text("this is text, not HDF5")
    return _report(t, t / "cube.h5", ["cube.h5", "not a readable HDF5 cube"], "rerun ckptforce analyze")


def row_cube_truncated(t):
    c = _tiny_cube(t / "cube.h5", ckptforce_schema=cube.SCHEMA_VERSION)
    c.write_bytes(c.read_bytes()[: c.stat().st_size // 2])
    return _report(t, c, ["cube.h5", "truncated"], "rerun ckptforce analyze")


def row_cube_is_a_directory(t):
    (t / "cubes").mkdir()
    return _report(t, t / "cubes", ["cubes", "is a directory"], "give a cube written by ckptforce analyze")


def row_report_output_is_a_file(t):
    c = _tiny_cube(t / "cube.h5", ckptforce_schema=cube.SCHEMA_VERSION)
    (t / "afile").write_text("x")
    case = _report(t, c, ["afile", "cannot create the report folder"], "choose another -o", out=t / "afile")
    case.outputs = []
    return case


ROWS: dict[str, Callable] = {name[4:]: fn for name, fn in sorted(globals().items()) if name.startswith("row_")}


def build(name: str, tmp_path: Path, monkeypatch) -> Case:
    fn = ROWS[name]
    return fn(tmp_path, monkeypatch) if fn.__code__.co_argcount == 2 else fn(tmp_path)


def test_the_table_is_long_enough():
    assert len(ROWS) >= 20


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input(name, tmp_path, monkeypatch):
    case = build(name, tmp_path, monkeypatch)
    before = tree_digest(case.watched)
    result = CliRunner().invoke(main, case.args)
    assert result.exit_code == 2, (name, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # a handled error, not a crash
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptforce: error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in [*case.names, case.fix]:
        assert fragment in lines[0], (fragment, lines[0])
    assert tree_digest(case.watched) == before, "the run directory changed"
    for out in case.outputs:
        assert not out.exists(), f"{out} was written"
    if case.marker is not None:
        assert not case.marker.exists(), "the pickle's payload ran"


# --- the same, as a real process: no warning or traceback reaches stderr, and --debug shows one --------------

PROCESS_ROWS = ["pickle_with_code", "cube_random_hdf5", "nan_weights"]


def _process(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "ckptforce.cli", *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)


@pytest.mark.parametrize("name", PROCESS_ROWS)
def test_bad_input_in_a_real_process(name, tmp_path, monkeypatch):
    case = build(name, tmp_path, monkeypatch)
    before = tree_digest(case.watched)
    proc = _process(*case.args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptforce: error: "), proc.stderr
    assert all(fragment in lines[0] for fragment in [*case.names, case.fix]), lines[0]
    assert tree_digest(case.watched) == before
    if case.marker is not None:
        assert not case.marker.exists(), "the pickle's payload ran"


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    case = build("nan_weights", tmp_path, monkeypatch)
    proc = _process("--debug", *case.args)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr and "NonFiniteWeightsError" in proc.stderr
    in_process = CliRunner().invoke(main, ["--debug", *case.args])
    assert in_process.exit_code != 0 and type(in_process.exception).__name__ == "NonFiniteWeightsError"


def test_trainer_pickles_are_never_read(tmp_path):
    """training_args.bin and rng_state.pth of a real Trainer run are full pickles: put code in every one of
    them; scan and analyze still work and never run it (they never open those files)."""
    run, marker = _trainer_run(tmp_path), tmp_path / "PWNED"
    for f in [*run.rglob("training_args.bin"), *run.rglob("rng_state.pth")]:
        torch.save({"payload": _Payload(marker)}, f)
    before = tree_digest(run)
    scanned = CliRunner().invoke(main, ["scan", str(run), "--json"])
    assert scanned.exit_code == 0, scanned.output
    probes = _probes(tmp_path, {"id": "a", "prompt_ids": [1, 2, 3], "responses": {"chosen": [4, 5], "rejected": [6]}})
    analysed = CliRunner().invoke(main, ["analyze", str(run), "--probes", str(probes), "-o", str(tmp_path / "c.h5"), "-q", "--nodes", "0"])
    assert analysed.exit_code == 0, analysed.output
    assert not marker.exists(), "a pickle's payload ran"
    assert tree_digest(run) == before


def test_trust_pickles_is_the_only_way_in(tmp_path, monkeypatch):
    """The same payload row with --trust-pickles: the user opted in, so the file's code runs (the marker
    appears) — that is what the flag means, and why it is never the default."""
    case = build("pickle_with_code", tmp_path, monkeypatch)
    result = CliRunner().invoke(main, ["scan", str(case.watched), "--trust-pickles", "--json"])
    assert result.exit_code == 0, result.output
    assert case.marker.exists()
    shutil.rmtree(case.watched)
