"""Probe files: validation with pinned messages, tokenizer discovery, exact boundaries, batch layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ckptforce.errors import CkptforceError, ProbeFileError, TokenizerError
from ckptforce.probes import (
    ARGMAX,
    FIELDS,
    RESPONSE_TYPES,
    LmProbe,
    ProbeSet,
    TokenizedProbes,
    load_class_probes,
    load_probe_set,
    load_tokenizer,
    make_batch,
    schema_path,
    tokenize,
)

WORDS = ["<pad>", "<unk>", "Q", ":", "where", "does", "Alice", "Bob", "live", "lives", "works", "in", "Paris",
         "Rome", "as", "a", "baker", "?", "A", ".", "blue", "seven", "under"]  # fmt: skip
VOCAB = {w: i for i, w in enumerate(WORDS)}


def write_lines(path: Path, lines: list) -> Path:
    """Each item: a dict (dumped as JSON) or a raw string, one per line."""
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    return path


def probe(id="q1", **kw) -> dict:
    out = {"id": id, "prompt": "Q : where does Alice live ? A :", "responses": {"chosen": " Alice lives in Paris ."}}
    out.update(kw)
    return out


def save_tokenizer(d: Path) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>").save_pretrained(str(d))
    return d


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(save_tokenizer(tmp_path_factory.mktemp("tok")), [])


# --- loading -------------------------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12():
    import jsonschema

    schema = json.loads(schema_path().read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"].endswith("2020-12/schema")
    assert set(schema["properties"]) == set(FIELDS)


def test_round_trip(tmp_path):
    f = write_lines(tmp_path / "probes.jsonl", [
        probe("q1", split="train", group="geo",
              responses={"my_type": " Bob .", "rejected": " Alice lives in Rome .", "chosen": " Alice lives"}),
        "",
        "   ",
        {"id": "q2", "prompt_ids": [2, 3], "split": "test",
         "responses": {"random": [20, 21, 22], "other_type": " blue", "chosen": [6, 9]}},
    ])  # fmt: skip
    ps = load_probe_set(f)
    assert isinstance(ps, ProbeSet) and ps.path == f
    assert [p.id for p in ps.probes] == ["q1", "q2"]
    assert [p.line for p in ps.probes] == [1, 4]
    q1, q2 = ps.probes
    assert (q1.prompt, q1.prompt_ids, q1.split, q1.group) == ("Q : where does Alice live ? A :", None, "train", "geo")
    assert (q2.prompt, q2.prompt_ids, q2.split, q2.group) == (None, [2, 3], "test", None)
    assert q2.responses == {"random": [20, 21, 22], "other_type": " blue", "chosen": [6, 9]}
    # known types in DESIGN order, then unknown types in first-seen order
    assert ps.response_types == ["chosen", "rejected", "random", "my_type", "other_type"]


def test_response_types_constant_order():
    assert RESPONSE_TYPES[:2] == ("chosen", "rejected") and RESPONSE_TYPES[-1] == "random"
    assert len(RESPONSE_TYPES) == 11 and ARGMAX not in RESPONSE_TYPES


def load_error(tmp_path, lines, name="probes.jsonl") -> str:
    f = write_lines(tmp_path / name, lines)
    with pytest.raises(ProbeFileError) as info:
        load_probe_set(f)
    msg = str(info.value)
    assert "\n" not in msg
    assert isinstance(info.value, (CkptforceError, ValueError))
    return msg


@pytest.mark.parametrize(
    "bad, expected",
    [
        (probe(responses={"chosen": ""}),
         ":2: responses.chosen: empty response; give the response text or remove the entry"),
        (probe(responses={"chosen": []}), ":2: responses.chosen: empty token list; give at least one token id"),
        (probe(responses={"chosen": [3, -1]}), ":2: responses.chosen[1]: -1 is not a token id"),
        (probe(responses={"chosen": [3, 1.5]}),
         ":2: responses.chosen[1]: expected an integer token id, found number 1.5"),
        (probe(responses={"chosen": 7}), ":2: responses.chosen: expected text or a list of token ids, found integer 7"),
        (probe(responses={}), ":2: responses: no responses; give at least one"),
        (probe(responses={"argmax": " x"}), ":2: responses.argmax: 'argmax' is computed along 'chosen', not given"),
        ({"id": "q9", "prompt": "x", "respones": {"chosen": " y"}},
         ":2: field 'respones' is not allowed (known: id, prompt, prompt_ids, responses, split, group, meta); "
         "did you mean 'responses'? (to keep it as a label of your own, put it under \"meta\")"),
        (probe(grup="a"), ":2: field 'grup' is not allowed (known: id, prompt, prompt_ids, responses, split, group, meta); "
         "did you mean 'group'?"),
        (probe(meta="city"), ':2: meta: expected an object of your own fields (e.g. {"source": "wiki", "attr": "city"}), '
         "found text"),
        ({"id": "q9", "prompt": "x"}, ":2: responses: missing; give at least one response"),
        ({"prompt": "x", "responses": {"chosen": " y"}}, ":2: id: missing; give every probe a unique string id"),
        (probe(id=17), ":2: id: expected a string, found integer 17"),
        (probe(prompt_ids=[1, 2]), ":2: prompt, prompt_ids: both given; give the prompt as text or as token ids"),
        ({"id": "q9", "responses": {"chosen": " y"}}, ":2: prompt: missing; give the prompt as text"),
        (probe(prompt=""), ":2: prompt: empty prompt; give the prompt text"),
        (probe(prompt=None), ":2: prompt: expected a string, found null null"),
        ([1, 2], ":2: the line is a JSON array, not an object; write one probe object per line"),
        ('{"id": "q9" "prompt": "x"}', ":2: not valid JSON (Expecting ',' delimiter at column 13); "),
        ('{"id": "q9", "prompt": "x", "responses": {"chosen": " a", "chosen": " b"}}',
         ":2: key 'chosen' is given twice in one object; keep one"),
    ],
)  # fmt: skip
def test_line_errors_are_pinned(tmp_path, bad, expected):
    msg = load_error(tmp_path, [probe("q0"), bad])
    assert msg.startswith(str(tmp_path / "probes.jsonl") + expected), msg


def test_typo_wins_over_the_missing_field_it_causes(tmp_path):
    msg = load_error(tmp_path, [{"id": "q1", "prompt": "x", "respones": {"chosen": " y"}, "grup": "a"}])
    assert ":1: field 'respones', 'grup' is not allowed" in msg


def test_duplicate_ids_name_both_lines(tmp_path):
    msg = load_error(tmp_path, [probe("q1"), probe("q2"), "", probe("q1")])
    assert msg == f"{tmp_path / 'probes.jsonl'}:4: id: 'q1' is already used on line 1; give every probe a unique id"


def test_empty_and_missing_files(tmp_path):
    msg = load_error(tmp_path, ["", "  "], name="empty.jsonl")
    assert msg.startswith(f"{tmp_path / 'empty.jsonl'}: no probes (the file is empty); write one JSON object per line")
    with pytest.raises(ProbeFileError, match="nope.jsonl: no such file") as info:
        load_probe_set(tmp_path / "nope.jsonl")
    assert isinstance(info.value, FileNotFoundError)


# --- tokenizer -----------------------------------------------------------------------------------------


def test_load_tokenizer_from_first_candidate_holding_one(tmp_path):
    empty, ckpt, root = tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4", tmp_path / "run"
    empty.mkdir(parents=True)
    save_tokenizer(ckpt)
    tok = load_tokenizer(None, [empty, tmp_path / "missing", ckpt, root])
    assert tok("Alice lives in Paris", add_special_tokens=False)["input_ids"] == [6, 9, 11, 12]
    explicit = load_tokenizer(ckpt / "tokenizer.json", [empty])  # --tokenizer may name the file itself
    assert explicit("Bob works", add_special_tokens=False)["input_ids"] == [7, 10]


def test_no_tokenizer_lists_places_looked(tmp_path):
    a, b = tmp_path / "checkpoint-2", tmp_path / "run"
    a.mkdir()
    with pytest.raises(TokenizerError) as info:
        load_tokenizer(None, [a, b])
    assert str(info.value) == (f"no tokenizer found (looked in: {a}, {b}); pass --tokenizer DIR, or give token ids "
                               "in the probe file (prompt_ids, responses as lists of ids)")  # fmt: skip
    with pytest.raises(TokenizerError, match=r"--tokenizer .*checkpoint-2: no tokenizer.json or tokenizer_config"):
        load_tokenizer(a, [])
    (a / "tokenizer.json").write_text("{ broken")
    with pytest.raises(TokenizerError, match=r"checkpoint-2: the tokenizer there cannot be loaded \("):
        load_tokenizer(None, [a])


def test_tokenize_keeps_the_boundary_exact(tmp_path, tokenizer):
    f = write_lines(tmp_path / "p.jsonl", [
        probe("q1", responses={"chosen": " Alice lives in Paris .", "rejected": " Alice lives in Rome .",
                               "random": [20, 21, 22]}),
        {"id": "q2", "prompt_ids": [2, 3, 4], "responses": {"chosen": [7, 10, 14, 15, 16]}},
    ])  # fmt: skip
    tp = tokenize(load_probe_set(f), tokenizer)
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert tp.prompt_ids[0] == enc("Q : where does Alice live ? A :") == [2, 3, 4, 5, 6, 8, 17, 18, 3]
    assert tp.response_ids[0] == {"chosen": enc(" Alice lives in Paris ."), "rejected": [6, 9, 11, 13, 19],
                                  "random": [20, 21, 22]}  # fmt: skip
    assert tp.prompt_ids[1] == [2, 3, 4] and tp.response_ids[1] == {"chosen": [7, 10, 14, 15, 16]}


def test_ids_only_file_needs_no_tokenizer(tmp_path):
    f = write_lines(tmp_path / "ids.jsonl", [{"id": "a", "prompt_ids": [5], "responses": {"chosen": [1, 2]}}])
    tp = tokenize(load_probe_set(f))
    assert (tp.prompt_ids, tp.response_ids) == ([[5]], [{"chosen": [1, 2]}])


def test_text_without_tokenizer_names_probe_and_line(tmp_path):
    f = write_lines(tmp_path / "p.jsonl", [
        {"id": "a", "prompt_ids": [5], "responses": {"chosen": [1, 2]}},
        {"id": "b", "prompt_ids": [5], "responses": {"chosen": [1], "rejected": " Rome"}},
    ])  # fmt: skip
    with pytest.raises(TokenizerError) as info:
        tokenize(load_probe_set(f))
    assert str(info.value).startswith(f"{f}:2: responses.rejected: probe 'b' is text and no tokenizer is known; "
                                      "pass --tokenizer DIR")  # fmt: skip


def test_max_length_is_never_truncated(tmp_path, tokenizer):
    f = write_lines(tmp_path / "p.jsonl", [probe("q1"), probe("q2", responses={"chosen": [1] * 30, "rejected": [1]})])
    ps = load_probe_set(f)
    assert len(tokenize(ps, tokenizer, max_length=39).response_ids[1]["chosen"]) == 30  # 9 + 30 fits
    with pytest.raises(ProbeFileError) as info:
        tokenize(ps, tokenizer, max_length=32)
    assert str(info.value) == (f"{f}:2: responses.chosen: probe 'q2' prompt + response is 39 tokens (9 + 30), "
                               "the model's context is 32; shorten it — responses are never truncated silently")


def test_text_that_tokenizes_to_nothing(tmp_path, tokenizer):
    f = write_lines(tmp_path / "p.jsonl", [probe("q1", prompt="   ")])
    with pytest.raises(ProbeFileError, match=r"p.jsonl:1: prompt: tokenizes to no tokens \(probe 'q1'\)"):
        tokenize(load_probe_set(f), tokenizer)


# --- batches -------------------------------------------------------------------------------------------


def tokenized(prompts: list[list[int]], responses: list[dict[str, list[int]]]) -> TokenizedProbes:
    probes = [LmProbe(f"p{i}", None, p, dict(r), line=i + 1) for i, (p, r) in enumerate(zip(prompts, responses))]
    return TokenizedProbes(ProbeSet(Path("mem.jsonl"), probes), prompts, responses)


def test_make_batch_layout_by_hand():
    tp = tokenized([[5, 6], [7]], [{"rejected": [9], "chosen": [8, 8, 3]}, {"chosen": [4, 2]}])
    b = make_batch(tp, pad_id=1)
    assert b.rows == [(0, "chosen"), (0, "rejected"), (1, "chosen")] and len(b) == 3
    P = 1
    assert b.input_ids.tolist() == [[5, 6, 8, 8, 3], [5, 6, 9, P, P], [7, 4, 2, P, P]]
    assert b.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert b.target_mask.tolist() == [[0, 1, 1, 1, 0], [0, 1, 0, 0, 0], [1, 1, 0, 0, 0]]
    assert b.targets.tolist() == [[0, 8, 8, 3, 0], [0, 9, 0, 0, 0], [4, 2, 0, 0, 0]]
    assert b.input_ids.dtype == b.attention_mask.dtype == b.targets.dtype == torch.long
    assert b.target_mask.dtype == torch.bool

    one = make_batch(tp, [(1, "chosen"), (0, "rejected")])
    assert one.rows == [(1, "chosen"), (0, "rejected")]
    assert one.input_ids.tolist() == [[7, 4, 2], [5, 6, 9]]


def test_select_round_trip():
    tp = tokenized([[5, 6], [7]], [{"rejected": [9], "chosen": [8, 8, 3]}, {"chosen": [4, 2]}])
    b = make_batch(tp)
    tail = b.select([2, 1])  # the two short rows: padding trimmed to width 3
    assert tail.rows == [(1, "chosen"), (0, "rejected")] and tail.input_ids.shape == (2, 3)
    assert torch.equal(tail.input_ids, make_batch(tp, tail.rows).input_ids)
    assert torch.equal(tail.targets, make_batch(tp, tail.rows).targets)
    whole = b.select(slice(None))
    for name in ("input_ids", "attention_mask", "targets", "target_mask"):
        assert torch.equal(getattr(whole, name), getattr(b, name)), name
    assert b.select(slice(0, 1)).input_ids.shape == (1, 5)
    assert len(b.select([])) == 0
    assert b.select([-1]).rows == [(1, "chosen")]
    with pytest.raises(IndexError):
        b.select([3])
    moved = b.to("cpu")
    assert moved.rows == b.rows and torch.equal(moved.targets, b.targets)


def test_make_batch_refuses_bad_rows():
    tp = tokenized([[5], []], [{"chosen": [1]}, {"chosen": [2]}])
    with pytest.raises(KeyError, match="probe 0 has no response 'rejected'"):
        make_batch(tp, [(0, "rejected")])
    with pytest.raises(ProbeFileError, match=r"mem.jsonl:2: prompt: probe 'p1' has no prompt tokens"):
        make_batch(tp)


def test_argmax_added_later_is_batched_last():
    tp = tokenized([[5]], [{"chosen": [1, 2]}])
    tp.response_ids[0][ARGMAX] = [3, 4]
    assert make_batch(tp).rows == [(0, "chosen"), (0, ARGMAX)]


ids = st.lists(st.integers(min_value=0, max_value=50_000), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(ids, st.lists(ids, min_size=1, max_size=3)), min_size=1, max_size=5), st.integers(0, 9))
def test_targets_read_back_the_responses(probes, pad_id):
    types = ["chosen", "rejected", "weird"]
    tp = tokenized([p for p, _ in probes], [dict(zip(types, rs)) for _, rs in probes])
    b = make_batch(tp, pad_id=pad_id)
    assert len(b) == sum(len(rs) for _, rs in probes)
    for row, (i, t) in enumerate(b.rows):
        mask = b.target_mask[row]
        assert b.targets[row][mask].tolist() == tp.response_ids[i][t]
        assert b.input_ids[row, 1:][mask[:-1]].tolist() == b.targets[row, :-1][mask[:-1]].tolist()
        assert not bool(mask[-1])  # the last column predicts nothing: no token follows it
        n = len(tp.prompt_ids[i]) + len(tp.response_ids[i][t])
        assert b.input_ids[row, :n].tolist() == tp.prompt_ids[i] + tp.response_ids[i][t]
        assert int(b.attention_mask[row].sum()) == n and bool((b.input_ids[row, n:] == pad_id).all())
        assert bool((b.targets[row][~mask] == 0).all())


# --- classification probes -----------------------------------------------------------------------------


def class_arrays(n=4, v=3):
    g = np.random.default_rng(0)
    soft = g.random((n, v))
    soft = (soft / soft.sum(1, keepdims=True)).astype(np.float32)
    return {"x": g.standard_normal((n, 2, 2)).astype(np.float32), "y": np.array([0, 2, 1, 2], dtype=np.int64),
            "soft": soft, "flipped": np.array([False, True, False, False])}  # fmt: skip


def test_class_probes_equal_across_formats(tmp_path):
    from safetensors.torch import save_file

    arr = class_arrays()
    np.savez(tmp_path / "p.npz", **arr, ids=np.array(["a", "b", "c", "d"]))
    tensors = {k: torch.from_numpy(v) for k, v in arr.items()}
    torch.save({**tensors, "ids": ["a", "b", "c", "d"]}, tmp_path / "p.pt")
    renamed = {("labels" if k == "y" else k): v for k, v in tensors.items()}  # "labels" works too
    save_file(renamed, str(tmp_path / "p.safetensors"))
    loaded = [load_class_probes(tmp_path / f"p.{s}") for s in ("npz", "pt", "safetensors")]
    for c in loaded:
        assert c.x.dtype == torch.float32 and c.x.shape == (4, 2, 2)
        assert c.labels.dtype == torch.long and c.labels.tolist() == [0, 2, 1, 2]
        assert c.flipped.dtype == torch.bool and c.flipped.tolist() == [False, True, False, False]
        assert torch.equal(c.x, loaded[0].x) and torch.equal(c.soft, loaded[0].soft)
    assert loaded[0].ids == loaded[1].ids == ["a", "b", "c", "d"] and loaded[2].ids == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda a: a.pop("x"), "p.npz: x: missing (found: y, soft, flipped); store the inputs under 'x'"),
        (lambda a: a.pop("y"), "p.npz: y: missing (found: x, soft, flipped); store the labels under 'y'"),
        (lambda a: a.update(y=np.array([0, 1, 2])), "p.npz: y: shape (3,), expected (N,) with N = 4"),
        (lambda a: a.update(y=np.array([0, 1.5, 2, 0])), "p.npz: y: labels are not integers"),
        (lambda a: a.update(y=np.array([0, 1, -2, 0])), "p.npz: y[2]: negative label -2"),
        (lambda a: a.update(y=np.array([0, 1, 3, 0])), "p.npz: y: label 3 but soft has 3 classes"),
        (lambda a: a["soft"].__setitem__((1, 0), 0.9), "p.npz: soft[1]: not a distribution (sum"),
        (lambda a: a.update(soft=a["soft"][:, 0]), "p.npz: soft: shape (4,), expected (N, V) with N = 4"),
        (lambda a: a.update(flipped=np.array([0, 2, 0, 0])), "p.npz: flipped: values other than true/false"),
        (lambda a: a.update(lables=a["y"]), "p.npz: key 'lables' is not known (known: x, y, labels, soft"),
        (lambda a: a.update(labels=a["y"]), "p.npz: y, labels: both given"),
        (lambda a: a.update(ids=np.array(["a", "b", "a", "c"])), "p.npz: ids: 'a' is used more than once"),
        (lambda a: a.update(ids=np.array(["a", "b"])), "p.npz: ids: 2 ids for 4 probes (x)"),
        (lambda a: a.update(ids=np.array([1, 2, 3, 4])), "p.npz: ids: expected a 1-D string array"),
        (lambda a: a.update(x=np.array(["a", "b", "c", "d"])), "p.npz: x: not a numeric array"),
    ],
)  # fmt: skip
def test_class_probe_errors(tmp_path, change, expected):
    arr = class_arrays()
    change(arr)
    np.savez(tmp_path / "p.npz", **arr)
    with pytest.raises(ProbeFileError) as info:
        load_class_probes(tmp_path / "p.npz")
    assert str(info.value).startswith(str(tmp_path / expected)), str(info.value)


def test_class_probe_files_that_cannot_be_read(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.zeros((2, 1)), y=np.array([0, 1]), ids=np.array(["a", None], dtype=object))
    with pytest.raises(ProbeFileError, match="o.npz: ids: holds Python objects"):
        load_class_probes(tmp_path / "o.npz")
    torch.save({"x": torch.zeros(2), "y": torch.zeros(2, dtype=torch.long), "cfg": object()}, tmp_path / "pk.pt")
    with pytest.raises(ProbeFileError, match=r"pk.pt: cannot be read as .pt \("):
        load_class_probes(tmp_path / "pk.pt")
    (tmp_path / "p.csv").write_text("x,y\n")
    with pytest.raises(ProbeFileError, match=r"p.csv: unknown format '.csv'"):
        load_class_probes(tmp_path / "p.csv")
    with pytest.raises(FileNotFoundError, match="none.npz: no such file"):
        load_class_probes(tmp_path / "none.npz")
