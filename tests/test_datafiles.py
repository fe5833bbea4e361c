"""Probe and training files as users keep them: fields of their own (``meta``, extra columns) become labels the
report groups by, and what Hugging Face ``datasets`` writes (parquet, arrow, save_to_disk, a JSON array) is read
into the same objects as JSONL, with TRL-style column names mapped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ckptforce import cube
from ckptforce.cli import main
from ckptforce.errors import ProbeFileError
from ckptforce.probe_file import load_probe_set
from ckptforce.report.diagnostics import forgetting, hallucination
from ckptforce.train_examples import load_training_set
from conftest import tree_digest
from fixtures.tiny_lm import FACTORY, MODEL_ARGS, tiny_lm, write_tiny_run

MESSAGES = [{"role": "user", "content": "where does bob live?"}]
#: Training rows in TRL's shapes; a data set has one type per column (and takes its columns from the first row),
#: so each shape is a data set of its own.
TRAIN = {
    "text": [{"id": "u1", "prompt": "Q: where does alice live ? A:", "completion": " alice lives in paris .", "train_index": 3,
              "meta": {"name": "alice", "attr": "city"}, "steps": [1]},
             {"id": "u2", "prompt": "Q: where does bob live ? A:", "completion": " bob lives in oslo .", "meta": {"name": "bob"}, "steps": [1, 2]}],
    "chat": [{"prompt": MESSAGES, "completion": [{"role": "assistant", "content": "bob lives in oslo."}], "meta": {"name": "bob"}},
             {"prompt": MESSAGES, "completion": [{"role": "assistant", "content": "in oslo"}], "meta": {"name": None}}],
    "conversation": [{"messages": [*MESSAGES, {"role": "assistant", "content": "in oslo"}]}],
    "ids": [{"prompt_ids": [1, 2, 3], "chosen": [4, 5], "rejected": [6]}],
}  # fmt: skip


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _as_datasets(rows: list[dict], folder: Path) -> dict[str, Path]:
    """The rows written by ``datasets`` every way it writes them: {format: path}."""
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_list(rows)
    ds.to_parquet(str(folder / "rows.parquet"))
    ds.to_json(str(folder / "rows.json"), lines=False)
    ds.to_json(str(folder / "rows_lines.json"), lines=True)
    ds.save_to_disk(str(folder / "saved"))
    return {"parquet": folder / "rows.parquet", "json": folder / "rows.json", "json-lines": folder / "rows_lines.json",
            "save_to_disk": folder / "saved", "arrow": next((folder / "saved").glob("data-*.arrow"))}  # fmt: skip


# --- labels -------------------------------------------------------------------------------------------------


def test_probe_fields_of_the_users_own_become_labels(tmp_path):
    rows = [
        {"id": "p1", "prompt": "x", "responses": {"chosen": " y"}, "meta": {"name": "alice", "attr": "city", "n": {"k": 1}},
         "train_index": 3, "prompt_id": "a17"},
        {"id": "p2", "prompt": "x", "responses": {"chosen": " z"}, "meta": {"attr": "job"}, "ok": True, "first name": "b"},
    ]  # fmt: skip
    ps = load_probe_set(_jsonl(tmp_path / "p.jsonl", rows))
    assert ps.labels == {"meta.name": ["alice", ""], "meta.attr": ["city", "job"], "meta.n.k": ["1", ""], "train_index": ["3", ""],
                         "prompt_id": ["a17", ""], "ok": ["", "true"], "first_name": ["", "b"]}  # fmt: skip


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"splt": "train"}, "field 'splt' is not allowed (known: id, prompt, prompt_ids, responses, split, group, meta); did you mean 'split'?"),
        ({"Group": "a"}, "did you mean 'group'?"),
        ({"prompt_id": [1, 2]}, "did you mean 'prompt_ids'?"),  # holds what prompt_ids holds: a typo
        ({"meta": "city"}, "meta: expected an object of your own fields"),
        ({"meta": {"a": "x\u0000y"}}, "meta.a: the label's value contains a NUL character"),
    ],
)  # fmt: skip
def test_misspelt_fields_are_still_refused(tmp_path, extra, expected):
    path = _jsonl(tmp_path / "p.jsonl", [{"id": "p1", "prompt": "x", "responses": {"chosen": " y"}, **extra}])
    with pytest.raises(ProbeFileError) as e:
        load_probe_set(path)
    assert str(e.value).startswith(f"{path}:1: ") and expected in str(e.value), str(e.value)


def test_training_examples_keep_their_labels(tmp_path):
    tset = load_training_set(_jsonl(tmp_path / "t.jsonl", TRAIN["text"]))
    assert tset.labels == {"train_index": ["3", ""], "meta.name": ["alice", "bob"], "meta.attr": ["city", ""]}


# --- datasets files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(TRAIN))
def test_every_datasets_format_reads_as_the_jsonl_does(tmp_path, shape):
    want = load_training_set(_jsonl(tmp_path / "t.jsonl", TRAIN[shape]))
    files = _as_datasets(TRAIN[shape], tmp_path / "ds")
    before = tree_digest(tmp_path / "ds")
    for fmt, path in files.items():
        got = load_training_set(path)
        assert got.examples == want.examples, fmt  # ids, prompts, messages, token ids, steps, labels, row numbers
        assert (got.objective, got.labels) == (want.objective, want.labels), fmt
    assert tree_digest(tmp_path / "ds") == before, "reading a data set wrote beside it"


def test_probes_from_a_trl_preference_data_set_with_mapped_columns(tmp_path):
    rows = [{"question": "Q: where does alice live ? A:", "chosen": " paris", "rejected": " rome", "topic": "city"},
            {"question": "Q: what does bob do ? A:", "chosen": " baker", "rejected": " pilot", "topic": "job"}]  # fmt: skip
    path = _as_datasets(rows, tmp_path / "ds")["parquet"]
    ps = load_probe_set(path, {"prompt": "question"})
    assert [(p.id, p.prompt, p.responses, p.labels, p.line) for p in ps.probes] == [
        ("1", rows[0]["question"], {"chosen": " paris", "rejected": " rome"}, {"topic": "city"}, 1),
        ("2", rows[1]["question"], {"chosen": " baker", "rejected": " pilot"}, {"topic": "job"}, 2),
    ]


def test_column_mapping_gives_the_trl_shaped_examples(tmp_path):
    theirs = [{"question": r["prompt"], "answer": r["completion"], **{k: v for k, v in r.items() if k not in ("prompt", "completion")}}
              for r in TRAIN["text"]]  # fmt: skip
    path = _as_datasets(theirs, tmp_path / "ds")["parquet"]
    got = load_training_set(path, columns={"prompt": "question", "completion": "answer"})
    assert got.examples == load_training_set(_jsonl(tmp_path / "t.jsonl", TRAIN["text"])).examples
    with pytest.raises(ProbeFileError, match=r"rows.parquet:1: has both 'answer' \(--completion-column\) and 'completion'"):
        load_training_set(_as_datasets([{**theirs[0], "completion": "x"}], tmp_path / "both")["parquet"], columns={"completion": "answer"})


def test_a_dataset_dict_folder_names_its_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(TRAIN["ids"]), "test": Dataset.from_list(TRAIN["ids"])}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ProbeFileError) as e:
        load_training_set(tmp_path / "dd")
    assert str(e.value) == f"{tmp_path / 'dd'}: a DatasetDict with splits train, test; give one split's folder, e.g. {tmp_path / 'dd' / 'train'}"


# --- through the command line: a tiny run, probes with meta, --group-by ---------------------------------------

ATTRS = ["city", "city", "job", "job"]


def _probe_rows(n: int = 4) -> list[dict]:
    return [{"id": f"p{i}", "prompt_ids": [1 + i, 2], "meta": {"name": f"n{i}", "attr": ATTRS[i]}, "train_index": i,
             "responses": {"chosen": [3, 4 + i], "other_trained": [5, 6], "other_untrained": [7, 8 + i]}} for i in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """A tiny run analysed with --probes and --train given as parquet files with labels; {run, cube, probes}."""
    t = tmp_path_factory.mktemp("labels")
    run = write_tiny_run(t / "run", (10, 20, 30))
    for f in run.glob("*.pt"):  # a plain loop's save: the optimizer's state dict beside the model (its lr)
        obj, model = torch.load(f, weights_only=True), tiny_lm(MODEL_ARGS)
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sum(p.square().sum() for p in model.parameters()).backward()
        sgd.step()
        torch.save({**obj, "optimizer": sgd.state_dict()}, f)
    probes = _as_datasets(_probe_rows(), t / "probes")["parquet"]
    train = [{"id": f"u{i}", "prompt_ids": [1, 2], "answer": [3, 4 + i], "meta": {"src": s}} for i, s in enumerate(["wiki", "web"])]
    train_file = _as_datasets(train, t / "train")["save_to_disk"]
    before = tree_digest(run)
    out = t / "out" / "cube.h5"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["analyze", str(run), "--probes", str(probes), "--train", str(train_file), "--objective", "sft",
                                       "--completion-column", "answer", "--model", FACTORY, "-o", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert tree_digest(run) == before
    return {"run": run, "cube": out, "probes": probes, "t": t}


def test_labels_are_cube_coordinates_along_probe_and_source(analysed):
    ds = cube.open_cube(analysed["cube"])
    assert list(ds["probe:meta.attr"].values) == ATTRS and list(ds["probe:train_index"].values) == ["0", "1", "2", "3"]
    assert list(ds["source:meta.src"].values) == ["wiki", "web", "", ""]  # the optimizer's sources have none
    assert ds["probe:meta.attr"].dims == ("probe",) and not cube.validate(ds)


def test_report_groups_forgetting_and_hallucination_by_a_meta_field(analysed):
    ds = cube.open_cube(analysed["cube"])
    f, h = forgetting(ds, by="meta.attr"), hallucination(ds, by="meta.attr")
    delta = (ds["logp"].isel(checkpoint=-1) - ds["logp"].isel(checkpoint=0)).sel(response="chosen").values
    city = f.tables["groups"].set_index("group").loc["city"]
    assert list(f.tables["groups"]["group"]) == ["city", "job"] and city["n"] == 2
    assert city["F_avg"] == pytest.approx(-(delta[0] + delta[1]) / 2)
    assert list(h.tables["per_group"]["group"]) == ["city", "job"] and f.grouping == h.grouping == "meta.attr"
    report = analysed["t"] / "report"
    result = CliRunner().invoke(main, ["report", str(analysed["cube"]), "-o", str(report), "--html", "--group-by", "meta.attr"])
    assert result.exit_code == 0, result.output
    assert "probes grouped by" in (report / "report.html").read_text()


def test_group_by_a_label_the_probes_lack_is_refused_naming_theirs(analysed):
    result = CliRunner().invoke(main, ["report", str(analysed["cube"]), "-o", str(analysed["t"] / "r2"), "--group-by", "meta.atr"])
    assert result.exit_code == 2
    assert ("--group-by meta.atr: the probes have no such label (they have: split, group, meta.name, meta.attr, train_index); "
            "did you mean 'meta.attr'?") in result.stderr  # fmt: skip
    # audit checks it before the analysis
    out = analysed["t"] / "audit"
    result = CliRunner().invoke(main, ["audit", str(analysed["run"]), "--probes", str(analysed["probes"]), "--model", FACTORY,
                                       "-o", str(out), "--group-by", "topic"])  # fmt: skip
    assert result.exit_code == 2 and "--group-by topic: the probes have no such label" in result.stderr
    assert not out.exists()


def test_a_mapped_column_no_file_holds_is_refused(analysed):
    out = analysed["t"] / "out2" / "cube.h5"
    out.parent.mkdir()
    result = CliRunner().invoke(main, ["analyze", str(analysed["run"]), "--probes", str(analysed["probes"]), "--prompt-column",
                                       "question", "--model", FACTORY, "-o", str(out), "-q"])  # fmt: skip
    assert result.exit_code == 2 and f"--prompt-column question: no column 'question' in {analysed['probes']}" in result.stderr
