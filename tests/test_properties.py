"""Properties, with hypothesis: probe-file parsing, step parsing and natural order, and the cube round trip.

* any valid probe file (unicode ids and text, token ids, blank lines, either JSON escaping) loads back exactly;
  any one invalid line among valid ones raises ``ProbeFileError`` naming ``file:line`` — never another
  exception, and arbitrary bytes raise nothing else either;
* ``step_from_name`` reads the step from every naming idiom and never raises; ``natural_key`` orders numbers
  as numbers and is total on any text; ``order_candidates`` sorts by step, refuses duplicates and checkpoints
  without a step among stepped ones;
* ``cube.build`` → ``save`` → ``open_cube`` gives the same dataset for any shape and labels (unicode ids).
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from ckptforce import cube
from ckptforce.discover import Candidate, natural_key, order_candidates, step_from_name
from ckptforce.errors import ProbeFileError, StepError
from ckptforce.probes import load_probe_set

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text a probe file and a cube can hold: any Unicode scalar value but NUL (HDF5 strings end at a NUL).
CHARS = st.characters(exclude_characters="\x00", exclude_categories=("Cs",))
TEXT = st.text(CHARS, min_size=1, max_size=12)
IDS = st.lists(st.integers(0, 10**6), min_size=1, max_size=5)
RESPONSE_TYPE = TEXT.filter(lambda t: t != "argmax")


@st.composite
def probe_lines(draw, min_size=1, max_size=6) -> list[dict]:
    ids = draw(st.lists(TEXT, min_size=min_size, max_size=max_size, unique=True))
    out = []
    for i in ids:
        obj: dict = {"id": i}
        if draw(st.booleans()):
            obj["prompt"] = draw(TEXT)
        else:
            obj["prompt_ids"] = draw(IDS)
        obj["responses"] = draw(st.dictionaries(RESPONSE_TYPE, st.one_of(TEXT, IDS), min_size=1, max_size=4))
        for key in ("split", "group"):
            if draw(st.booleans()):
                obj[key] = draw(st.text(CHARS, max_size=6))
        out.append(obj)
    return out


def _write(lines: list[str]) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="probes-"))
    path = folder / "probes.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@FAST
@given(probe_lines(), st.booleans(), st.lists(st.booleans(), max_size=6))
def test_valid_probe_files_round_trip(probes, ascii_only, blanks):
    lines, numbers = [], []
    for k, obj in enumerate(probes):
        if k < len(blanks) and blanks[k]:
            lines.append("   ")  # blank lines are skipped, and line numbers still count them
        lines.append(json.dumps(obj, ensure_ascii=ascii_only))
        numbers.append(len(lines))
    loaded = load_probe_set(_write(lines))
    assert [p.id for p in loaded.probes] == [o["id"] for o in probes]
    assert [p.line for p in loaded.probes] == numbers
    for p, o in zip(loaded.probes, probes):
        assert (p.prompt, p.prompt_ids) == (o.get("prompt"), o.get("prompt_ids"))
        assert p.responses == o["responses"]
        assert (p.split, p.group) == (o.get("split"), o.get("group"))


def _mutations(valid: dict, earlier_id: str | None) -> list[dict | str]:
    """Ways one line can be wrong: each is refused by the schema, the parser or the id check."""
    bad: list[dict | str] = []
    without = lambda k: {x: v for x, v in valid.items() if x != k}
    bad += [without("id"), without("responses"), {**valid, "colour": "red"}, {**valid, "id": 7}, {**valid, "id": ""}]
    bad += [{**valid, "responses": {}}, {**valid, "responses": {"chosen": ""}}, {**valid, "responses": {"chosen": []}}]
    bad += [{**valid, "responses": {"chosen": [1, -2]}}, {**valid, "responses": {"argmax": [1]}}]
    bad += [{**valid, "responses": ["a", "b"]}, {**valid, "prompt": "x", "prompt_ids": [1]}]
    bad += [{k: v for k, v in valid.items() if k not in ("prompt", "prompt_ids")}, {**valid, "prompt_ids": [0.5]}]
    bad += [{**valid, "id": "a\x00b"}, {**valid, "responses": {"chosen": "x\ud800"}}]
    if earlier_id is not None:
        bad.append({**valid, "id": earlier_id})
    return bad


NOT_OBJECTS = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(max_size=8), st.none(), st.booleans(),
                        st.lists(st.integers(), max_size=3)).map(json.dumps)  # fmt: skip
GARBAGE = st.text(max_size=30).filter(lambda s: s.strip() and "\n" not in s and "\r" not in s)


@FAST
@given(probe_lines(min_size=2), st.data())
def test_one_invalid_line_is_named_by_file_and_line(probes, data):
    k = data.draw(st.integers(0, len(probes) - 1), label="bad line")
    earlier = probes[0]["id"] if k > 0 else None
    choice = data.draw(st.one_of(st.sampled_from(_mutations(probes[k], earlier)), NOT_OBJECTS, GARBAGE), label="bad")
    lines = [json.dumps(o) for o in probes]
    lines[k] = choice if isinstance(choice, str) else json.dumps(choice)
    assume(not _is_valid_probe(lines[k], probes[:k]))  # garbage text may, rarely, be a valid line
    path = _write(lines)
    with pytest.raises(ProbeFileError) as info:
        load_probe_set(path)
    assert str(info.value).startswith(f"{path}:{k + 1}: "), str(info.value)


def _is_valid_probe(line: str, before: list[dict]) -> bool:
    try:
        load_probe_set(_write([*map(json.dumps, before), line]))
        return True
    except ProbeFileError:
        return False


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_load_or_raise_a_probe_file_error(raw):
    path = Path(tempfile.mkdtemp(prefix="probes-")) / "probes.jsonl"
    path.write_bytes(raw)
    try:
        load_probe_set(path)
    except ProbeFileError as e:
        assert str(e).startswith(str(path))


# --- steps and natural order ------------------------------------------------------------------------------

LETTERS = st.text(alphabet="abdfghjlmnoquvwxyz", min_size=1, max_size=6)  # cannot spell step/ckpt/iter/checkpoint
EXT = st.sampled_from(["", ".pt", ".pth", ".bin", ".ckpt", ".safetensors"])
MARKERS = st.sampled_from(["step", "steps", "global_step", "global-step", "checkpoint", "iter", "iteration", "ckpt", "STEP", "Step"])


@FAST
@given(st.integers(0, 10**12), MARKERS, st.sampled_from(["", "_", "-", "="]), st.one_of(st.none(), LETTERS), EXT,
       st.one_of(st.none(), st.integers(0, 99)), st.integers(0, 8))  # fmt: skip
def test_step_from_every_naming_idiom(step, marker, sep, prefix, ext, epoch, zeros):
    name = f"{marker}{sep}{str(step).zfill(zeros)}{ext}"
    if epoch is not None:
        name = f"epoch={epoch}-{name}"
    if prefix is not None:
        name = f"{prefix}_{name}"
    # accelerate's save_state folders, checkpoint_N alone, count saves, not steps (discover._SAVE_COUNTER): no step
    counter = (marker, sep, prefix, epoch) == ("checkpoint", "_", None, None)
    assert step_from_name(name) == (None if counter else step), name


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_step_parsing_and_natural_key_never_raise(name):
    step = step_from_name(name)
    assert step is None or (isinstance(step, int) and step >= 0)
    natural_key(name)


@FAST
@given(st.lists(st.text(max_size=12), max_size=20))
def test_natural_order_is_total(names):
    keys = [natural_key(n) for n in sorted(names, key=natural_key)]  # any two names compare
    assert all(a <= b for a, b in itertools.pairwise(keys))


@FAST
@given(st.lists(st.integers(0, 10**9), min_size=1, max_size=15, unique=True), LETTERS, EXT, st.integers(0, 9))
def test_natural_order_is_numeric(steps, prefix, ext, zeros):
    names = [f"{prefix}_{str(s).zfill(zeros)}{ext}" for s in steps]
    assert [int(n[len(prefix) + 1 : len(n) - len(ext)]) for n in sorted(names, key=natural_key)] == sorted(steps)


def _c(name: str, record: int | None = None) -> Candidate:
    return Candidate(Path("/run") / name, "torch", record, "rec" if record is not None else "")


@FAST
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=12, unique=True), st.randoms(use_true_random=False), st.booleans())
def test_order_follows_the_steps(steps, rnd, recorded):
    # recorded: the names say nothing (or lie) and the record decides; otherwise the names decide
    cands = [_c(f"ckpt_{(s * 7919) % 1000:03d}_v{i}.pt" if recorded else f"step_{s}.pt", s if recorded else None) for i, s in enumerate(steps)]
    rnd.shuffle(cands)
    refs, _ = order_candidates(cands)
    assert [r.step for r in refs] == sorted(steps)
    assert {r.step_source for r in refs} == {"record" if recorded else "name"}


@FAST
@given(st.lists(st.integers(0, 10**6), min_size=2, max_size=10, unique=True), st.data())
def test_duplicates_are_refused_and_stepless_checkpoints_left_out(steps, data):
    dup = data.draw(st.sampled_from(steps))
    with pytest.raises(StepError, match=f"both claim step {dup}"):
        order_candidates([*(_c(f"step_{s}.pt") for s in steps), _c(f"other_step{dup}.pt")])
    refs, notes = order_candidates([*(_c(f"step_{s}.pt") for s in steps), _c("latest.pt")])
    assert [r.step for r in refs] == sorted(steps)
    assert [n for n in notes if "left out" in n][0].split(":")[0].endswith("latest.pt")


# --- the cube round trip ----------------------------------------------------------------------------------

LABELS = st.text(CHARS, min_size=1, max_size=10)


@st.composite
def cubes(draw) -> xr.Dataset:
    n_ckpt, n_tok = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    probes = draw(st.lists(LABELS, min_size=1, max_size=4, unique=True))
    responses = draw(st.lists(LABELS, min_size=1, max_size=3, unique=True))
    steps = sorted(draw(st.lists(st.integers(0, 10**9), min_size=n_ckpt, max_size=n_ckpt, unique=True)))
    floats = st.floats(width=64, allow_nan=True, allow_infinity=True)

    def arr(*shape):
        return draw(hnp.arrays(np.float64, shape, elements=floats))

    P, R, n_iv = len(probes), len(responses), max(n_ckpt - 1, 0)
    data = {"logp": arr(n_ckpt, P, R), "logp_tok": arr(n_ckpt, P, R, n_tok)}
    index = {"checkpoint": list(range(n_ckpt)), "probe": probes, "response": responses, "token": list(range(n_tok))}
    coords = {"step": steps, "probe_split": draw(st.lists(st.text(CHARS, max_size=5), min_size=P, max_size=P)),
              "response_text": [[draw(st.text(CHARS, max_size=8)) for _ in responses] for _ in probes]}  # fmt: skip
    if n_iv:
        index["interval"] = list(range(n_iv))
        data["dlogp_obs"] = arr(n_iv, P, R)
        coords.update(step_from=steps[:-1], step_to=steps[1:])
    attrs = cube.provenance(tool_version="0.1.0", history=draw(st.text(CHARS, max_size=20)), warnings=draw(st.lists(LABELS, max_size=3)))
    return cube.build(index=index, data=data, coords=coords, attrs=attrs)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cubes(), st.booleans())
def test_cube_round_trip(ds, compress):
    with tempfile.TemporaryDirectory() as folder:
        path = cube.save(ds, Path(folder) / "cube.h5", compress=compress)
        back = cube.open_cube(path)
    assert cube.validate(back) == []
    xr.testing.assert_identical(back, ds)
    for name in ds.variables:
        assert back[name].dtype.kind == ds[name].dtype.kind or {back[name].dtype.kind, ds[name].dtype.kind} <= {"U", "O"}, name
