"""Fields a user keeps with their data, kept as labels: one probe or training line in, its labels out.

A line may carry a free-form ``meta`` object and extra columns beside the fields ckptforce knows
(``{"id": "q1", …, "meta": {"name": "alice", "attr": "city"}, "train_index": 3}``). Both become text labels of
the probe (training example): ``meta.name``, ``meta.attr``, ``train_index``. The cube stores them as coordinates
along ``probe`` / ``source`` (``cube.label_coord``) and the report groups by them (``--group-by meta.attr``).

* nested objects are flattened with dots (``meta.a.b``); numbers and booleans are written as JSON writes them
  (``3``, ``0.5``, ``true``), a list is its JSON text; null is no label (an empty one where others have it);
* in a label's name whitespace and ``/`` become ``_`` (HDF5 names may hold neither);
* a field that looks like a misspelt known field — a small edit distance, or another case — and holds what that
  field holds (``"respones": {…}``, ``"grup": "a"``) is refused with "did you mean": a typo never turns
  silently into a label. The same name with a value the known field could not hold (``"prompt_id": "x17"``
  beside ``prompt_ids``) is a label.

Standard library only.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Iterable

#: The free-form object of a line's own fields.
META = "meta"
_UNSAFE = re.compile(r"[\s/]")


def split_line(obj: dict, known: Iterable[str], fits: Callable[[str, object], bool]) -> tuple[dict, dict[str, str], list[tuple[str, str]]]:
    """(the known fields, the labels, the typos as (field, known field it resembles)) of one line.

    ``fits(name, value)`` says whether ``value`` is something the known field ``name`` could hold.
    """
    known = [k for k in known if k != META]
    fields = {k: v for k, v in obj.items() if k in known}
    labels: dict[str, str] = {}
    typos: list[tuple[str, str]] = []
    for key, value in obj.items():
        if key in known:
            continue
        if key == META:
            _flatten(META, value, labels)
            continue
        close = resembles(key, known)
        if close is not None and fits(close, value):
            typos.append((key, close))
        else:
            _flatten(key, value, labels)
    return fields, labels, typos


def meta_problem(obj: dict) -> str:
    """"meta: …" when the line's ``meta`` is not an object, else ""."""
    if META not in obj or isinstance(obj[META], dict):
        return ""
    kind = "a list" if isinstance(obj[META], list) else type(obj[META]).__name__.replace("str", "text")
    return f'{META}: expected an object of your own fields (e.g. {{"source": "wiki", "attr": "city"}}), found {kind}'


def typo_message(typos: list[tuple[str, str]], known: Iterable[str]) -> str:
    """One line for the first typo'd fields: what was found, the known fields, the likely one, the way out."""
    names = ", ".join(f"'{k}'" for k, _ in typos)
    return (f"field {names} is not allowed (known: {', '.join(known)}); did you mean '{typos[0][1]}'? "
            f"(to keep it as a label of your own, put it under \"{META}\")")  # fmt: skip


def resembles(name: str, known: Iterable[str]) -> str | None:
    """The known field ``name`` looks like a misspelling of: another case, or one edit away (two for names of 8+
    letters); names under 4 letters only by case (``idx`` is not ``id``)."""
    low = name.lower()
    for k in known:
        if low == k.lower():
            return k
    best = None
    for k in known:
        if len(k) < 4:
            continue
        d = edit_distance(low, k.lower())
        if d <= (2 if len(k) >= 8 else 1) and (best is None or d < best[0]):
            best = (d, k)
    return best[1] if best else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance with adjacent transpositions (optimal string alignment)."""
    prev2, prev = None, list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        row = [i] + [0] * len(b)
        for j, cb in enumerate(b, start=1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
            if prev2 is not None and i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                row[j] = min(row[j], prev2[j - 2] + 1)
        prev2, prev = prev, row
    return prev[-1]


def label_name(name: str) -> str:
    """A label's name as the cube stores it: whitespace and '/' replaced by '_'."""
    return _UNSAFE.sub("_", name)


def _flatten(name: str, value, out: dict[str, str]) -> None:
    if value is None:  # not given (a data set's null cell, or a struct field another row has)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{name}.{k}", v, out)
        return
    out[label_name(name)] = as_label(value)


def as_label(value) -> str:
    """A value as label text: text as it is, null as "", anything else as its JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def unstorable(labels: dict[str, str]) -> str:
    """"{label}: what" for the first label the cube (HDF5, UTF-8, NUL-terminated) cannot store, else ""."""
    for name, text in labels.items():
        for what, s in (("name", name), ("value", text)):
            if "\x00" in s:
                return f"{name}: the label's {what} contains a NUL character (\\u0000)"
            try:
                s.encode("utf-8")
            except UnicodeEncodeError as e:
                return f"{name}: the label's {what} contains a lone surrogate (\\u{ord(s[e.start]):04x})"
    return ""


def table(rows: list[dict[str, str]]) -> dict[str, list[str]]:
    """Per-row labels as columns: {label: one text per row, "" where a row lacks it}, labels in first-seen order."""
    names = list(dict.fromkeys(n for r in rows for n in r))
    return {n: [r.get(n, "") for r in rows] for n in names}
