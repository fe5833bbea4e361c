"""Probe files in, validated ``ProbeSet`` out: one ``LmProbe`` per line (or row of a data set).

Language-model probes (DESIGN §3) are JSONL, one object per line, checked against
``schemas/probe_set.schema.json`` (the authority on the format)::

    {"id": "q17", "prompt": "Q: where does Alice live?\\nA:", "split": "train",
     "responses": {"chosen": " Alice lives in Paris.", "rejected": " Alice lives in Rome."},
     "meta": {"name": "alice", "attr": "city"}}

or what ``datasets`` writes (``datafiles.py``). Fields of the user's own — ``meta`` and extra columns — become
per-probe labels (``labels.py``). Every error names file:line and the field, and says what to do.
Tokenising and batching are in ``probes.py``, which re-exports what is here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from . import datafiles, labels
from .errors import ProbeFileError, ProbeFileNotFoundError
from .labels import META
from .names import ARGMAX, RESPONSE_TYPES
from .sequences import is_messages

#: Top-level fields of one probe line, in the order errors are reported.
FIELDS = ("id", "prompt", "prompt_ids", "responses", "split", "group", META)
SCHEMA_NAME = "probe_set.schema.json"


@dataclass
class LmProbe:
    """One line of a probe file: a prompt (text or ids) and named responses (text or ids)."""

    id: str
    prompt: str | list[dict] | None  # text or chat messages; None when prompt_ids are given
    prompt_ids: list[int] | None
    responses: dict[str, str | list]  # response type -> text, token ids, or chat messages
    split: str | None = None  # e.g. "train" / "test"
    group: str | None = None  # e.g. a domain, for forgetting statistics
    line: int = 0  # 1-based line in the file (row of a table), for messages
    labels: dict[str, str] = field(default_factory=dict)  # the line's own fields: meta.*, extra columns (labels.py)


@dataclass
class ProbeSet:
    path: Path
    probes: list[LmProbe]
    columns: set[str] = field(default_factory=set)  # every field name the file holds, before --*-column renaming

    @property
    def response_types(self) -> list[str]:
        """Known types present (in ``RESPONSE_TYPES`` order), then unknown types in first-seen order."""
        seen = dict.fromkeys(t for p in self.probes for t in p.responses)
        return [t for t in RESPONSE_TYPES if t in seen] + [t for t in seen if t not in RESPONSE_TYPES]

    @property
    def labels(self) -> dict[str, list[str]]:
        """The probes' own labels as columns: {label: one text per probe, "" where a probe lacks it}."""
        return labels.table([p.labels for p in self.probes])

    def __len__(self) -> int:
        return len(self.probes)


# --- loading and validation -----------------------------------------------------------------------------


def schema_path() -> Path:
    """Where ``probe_set.schema.json`` lives: ``schemas/`` beside the package (source tree / editable install)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "schemas" / SCHEMA_NAME, here / "schemas" / SCHEMA_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SCHEMA_NAME} not found beside the package (looked in {here.parent / 'schemas'}, "
                            f"{here / 'schemas'}); reinstall ckptforce from its source tree")  # fmt: skip


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


@lru_cache(maxsize=1)
def _field_validators() -> dict:
    """One validator per known field: does a value fit it? (a typo'd field holding what the field holds)"""
    import jsonschema

    schema = json.loads(schema_path().read_text(encoding="utf-8"))
    return {k: jsonschema.Draft202012Validator({**v, "$defs": schema["$defs"]}) for k, v in schema["properties"].items()}


def _fits(name: str, value) -> bool:
    return _field_validators()[name].is_valid(value)


def load_probe_set(path, columns: dict[str, str] | None = None) -> ProbeSet:
    """Read and validate a probe file: path in, ``ProbeSet`` out (one ``LmProbe`` per non-blank line or row).

    JSONL, or what ``datasets`` writes (a JSON array, parquet, arrow, a ``save_to_disk`` folder: ``datafiles.py``);
    ``columns`` renames the file's columns to ours (``{"prompt": "question"}``). A line without ``responses`` takes
    its responses from columns named as response types (``chosen``, ``rejected``, …; ``completion`` is read as
    ``chosen``), as TRL's data sets hold them; a data set's row without an ``id`` is named by its row number. Fields of
    the user's own (``meta``, extra columns) become the probe's ``labels``.

    Raises ``ProbeFileError`` with ``"{path}:{line}: {field}: {what is wrong}; {what to do}"`` for the first
    problem found: bad JSON, a line the schema refuses (a misspelt field, empty response, prompt and prompt_ids
    both or neither, ``argmax`` given), a repeated id, an empty file; ``ProbeFileNotFoundError`` when missing.
    """
    path = Path(path)
    if not datafiles.exists(path):
        what = "is a directory, not a probe file" if path.is_dir() else "no such file"
        raise ProbeFileNotFoundError(f"{path}: {what}; give the JSONL file of probes (one JSON object per line)")
    probes: list[LmProbe] = []
    first_line: dict[str, int] = {}
    seen: set[str] = set()
    table = not datafiles.is_lines(path)
    for number, obj in _records(path):
        where = f"{path}:{number}"
        if isinstance(obj, dict):
            seen.update(obj)
            obj = _responses_from_columns(datafiles.rename(obj, columns or {}, where), where)
            if table and "id" not in obj:  # a data set's rows seldom have ids: the row number is one
                obj["id"] = str(number)
        probe = _probe(obj, where, number)
        if probe.id in first_line:
            raise ProbeFileError(f"{where}: id: '{probe.id}' is already used on line {first_line[probe.id]}; "
                                 "give every probe a unique id")  # fmt: skip
        first_line[probe.id] = number
        probes.append(probe)
    if not probes:
        raise ProbeFileError(f"{path}: no probes (the file is empty); write one JSON object per line, e.g. "
                             '{"id": "q1", "prompt": "Q: ...", "responses": {"chosen": " ..."}}')  # fmt: skip
    return ProbeSet(path, probes, seen)


def _records(path: Path):
    """(line or row number, parsed object) of every non-blank line of a JSONL file, or every row of a table."""
    if not datafiles.is_lines(path):
        yield from enumerate(datafiles.read_rows(path), start=1)
        return
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ProbeFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the file as UTF-8") from e
    for number, raw in enumerate(text.split("\n"), start=1):
        if not raw.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield number, json.loads(raw, object_pairs_hook=_no_repeated_keys)
        except json.JSONDecodeError as e:
            raise ProbeFileError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); "
                                 "write one complete JSON object per line") from e  # fmt: skip
        except _RepeatedKey as e:
            raise ProbeFileError(f"{where}: key '{e.args[0]}' is given twice in one object; keep one") from None
        except RecursionError:
            raise ProbeFileError(f"{where}: not valid JSON (nested too deeply); write one flat probe object per line") from None


def _responses_from_columns(obj: dict, where: str) -> dict:
    """A TRL-shaped row (prompt, chosen, rejected, …; or prompt, completion) as a probe with ``responses``."""
    if "responses" in obj or not any(k in obj for k in (*RESPONSE_TYPES, "completion")):
        return obj
    if "completion" in obj and "chosen" in obj:
        raise ProbeFileError(f"{where}: completion, chosen: both given; a probe's trained answer is one response: give "
                             "'chosen' (or 'completion', read as chosen)")  # fmt: skip
    obj = {("chosen" if k == "completion" else k): v for k, v in obj.items()}
    return {**{k: v for k, v in obj.items() if k not in RESPONSE_TYPES},
            "responses": {k: v for k, v in obj.items() if k in RESPONSE_TYPES}}  # fmt: skip


def _probe(obj, where: str, number: int) -> LmProbe:
    """One validated line as an ``LmProbe``; the first problem as a ``ProbeFileError`` naming ``where``."""
    own: dict[str, str] = {}
    if isinstance(obj, dict):
        if problem := labels.meta_problem(obj):
            raise ProbeFileError(f"{where}: {problem}")
        _, own, typos = labels.split_line(obj, FIELDS, _fits)
        if typos:
            raise ProbeFileError(f"{where}: {labels.typo_message(typos, FIELDS)}")
    errors = list(_validator().iter_errors(obj))
    if errors:
        raise ProbeFileError(f"{where}: {_describe(min(errors, key=_rank), obj)}")
    bad_text = _unstorable(obj) or labels.unstorable(own)
    if bad_text:
        raise ProbeFileError(f"{where}: {bad_text} that the cube (HDF5) cannot store; remove it")
    return LmProbe(
        id=obj["id"], prompt=obj.get("prompt"),
        prompt_ids=[int(i) for i in obj["prompt_ids"]] if "prompt_ids" in obj else None,
        responses={t: v if isinstance(v, str) or is_messages(v) else [int(i) for i in v] for t, v in obj["responses"].items()},
        split=obj.get("split"), group=obj.get("group"), line=number, labels=own,
    )  # fmt: skip


def _unstorable(obj: dict) -> str:
    """``"{field}: what"`` for the first text the cube (HDF5, UTF-8, NUL-terminated) cannot store, else ""."""
    texts = [(k, obj.get(k)) for k in ("id", "split", "group")] + _message_texts("prompt", obj.get("prompt"))
    texts += [(f"responses.{t}", t) for t in obj["responses"]]
    texts += [x for t, v in obj["responses"].items() for x in _message_texts(f"responses.{t}", v)]
    for field, text in texts:
        if not isinstance(text, str):
            continue
        if "\x00" in text:
            return f"{field}: contains a NUL character (\\u0000)"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return f"{field}: contains a lone surrogate (\\u{ord(text[e.start]):04x})"
    return ""


def _message_texts(field_name: str, value) -> list[tuple[str, object]]:
    """(field, text) of a text value, or of each message's content."""
    if is_messages(value):
        return [(f"{field_name}[{i}].content", m.get("content")) for i, m in enumerate(value)]
    return [(field_name, value)]


class _RepeatedKey(Exception):
    pass


def _no_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _RepeatedKey(k)
        out[k] = v
    return out


def _rank(error) -> tuple:
    """Most useful error first: not an object, a typo'd field, a missing field, prompt XOR prompt_ids, then
    by field order (``FIELDS``) and depth. (``best_match`` ranks by depth only and descends into ``oneOf``.)"""
    order = ("type", "additionalProperties", "required", "oneOf")
    top = error.validator in order and not error.path
    head = error.path[0] if error.path else ""
    return (order.index(error.validator) if top else len(order),
            FIELDS.index(head) if head in FIELDS else len(FIELDS), len(error.path))  # fmt: skip


def _field(path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _json_type(value) -> str:
    for py, name in ((bool, "boolean"), (dict, "object"), (list, "array"), (str, "string"), (int, "integer")):
        if isinstance(value, py):
            return name
    return "number" if isinstance(value, float) else "null"


def _short(value) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


_EXPECTED = {"string": "a string", "integer": "an integer token id", "array": "a list of token ids",
             "object": "an object (response type -> text or token ids)"}  # fmt: skip


def _describe(error, obj) -> str:
    """One jsonschema error rewritten as ``{field}: {what is wrong}; {what to do}``."""
    v, field, inst = error.validator, _field(error.path), error.instance
    if v == "type" and not error.path:
        return f"the line is a JSON {_json_type(inst)}, not an object; write one probe object per line"
    if v == "required" and error.path:  # inside a chat message
        missing = next(k for k in error.validator_value if k not in inst)
        return (f"{field}: '{missing}' missing; write each chat message as "
                '{"role": "user" | "assistant" | "system", "content": "..."}')  # fmt: skip
    if v == "required":
        missing = next(k for k in error.validator_value if k not in inst)
        what = ("give every probe a unique string id" if missing == "id"
                else 'give at least one response, e.g. "responses": {"chosen": " ..."}')  # fmt: skip
        return f"{missing}: missing; {what}"
    if v == "oneOf":
        if "prompt" in obj and "prompt_ids" in obj:
            return "prompt, prompt_ids: both given; give the prompt as text or as token ids, not both"
        return 'prompt: missing; give the prompt as text ("prompt") or as token ids ("prompt_ids")'
    if "propertyNames" in error.schema_path:
        if inst == ARGMAX:
            return (f"responses.{ARGMAX}: '{ARGMAX}' is computed along 'chosen', not given; "
                    "remove it or rename the response type")  # fmt: skip
        return "responses: a response type has an empty name; name every response type"
    if v == "minLength":
        what = {"id": "empty id; give every probe a unique string id",
                "prompt": "empty prompt; give the prompt text (something must predict the first response token)"}
        return f"{field}: " + what.get(field, "empty response; give the response text or remove the entry")
    if v == "minItems":
        what = "give at least one token id" + ("" if field == "prompt_ids" else " or remove the entry")
        return f"{field}: empty token list; {what}"
    if v == "minProperties":
        return 'responses: no responses; give at least one, e.g. {"chosen": " ..."}'
    if v == "minimum":
        return f"{field}: {_short(inst)} is not a token id; token ids are non-negative integers"
    if v == "type":
        want = error.validator_value
        want = "text or a list of token ids" if isinstance(want, list) else _EXPECTED.get(want, want)
        return f"{field}: expected {want}, found {_json_type(inst)} {_short(inst)}; see schemas/{SCHEMA_NAME}"
    return f"{field or 'line'}: {error.message}; see schemas/{SCHEMA_NAME}"

