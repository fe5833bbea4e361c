"""Probe and training files as rows: JSON Lines, and what Hugging Face ``datasets`` writes and reads.

* ``.jsonl`` (and a ``.json`` of one object per line) — read line by line by the caller, with its own messages;
* ``.json`` holding one array of objects (``Dataset.to_json(lines=False)``);
* ``.parquet`` (``Dataset.to_parquet``), read with pyarrow;
* ``.arrow`` — an Arrow stream or file (the shards ``datasets`` writes);
* a folder written by ``Dataset.save_to_disk`` (``state.json`` + ``data-*.arrow``); a ``DatasetDict`` folder
  (``dataset_dict.json``) holds several splits, and the error names them: give one split's folder.

``read_rows(path)`` returns one dict per row, numbered from 1, with null cells dropped (in a table a null is a
field the row does not have). ``rename(row, columns, where)`` applies the column mapping (``--prompt-column
question`` …), the way TRL users name their columns. ``sha256(path)`` hashes a file, or every file of a folder
(relative paths and bytes, in sorted order), so a re-run on changed data is refused. Files are only read:
nothing is cached or written beside them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ProbeFileError

#: Columns a mapping may rename, as TRL names them (its defaults): --prompt-column, --completion-column, …
COLUMNS = ("prompt", "completion", "chosen", "rejected", "text", "messages")
TABLE_SUFFIXES = (".parquet", ".arrow")
STATE = "state.json"
SPLITS = "dataset_dict.json"


def is_lines(path: Path) -> bool:
    """A JSON Lines file (read line by line, every message naming its line), rather than a table or a folder."""
    if path.is_dir() or path.suffix in TABLE_SUFFIXES:
        return False
    if path.suffix != ".json":
        return True
    with path.open("rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return not head.startswith(b"[")


def exists(path: Path) -> bool:
    return path.is_file() or (path.is_dir() and ((path / STATE).is_file() or (path / SPLITS).is_file()))


def read_rows(path: Path) -> list[dict]:
    """The rows of a ``.json`` array, ``.parquet`` / ``.arrow`` file or ``save_to_disk`` folder, nulls dropped."""
    if path.suffix == ".json" and path.is_file():
        try:
            rows = json.loads(path.read_text(encoding="utf-8-sig"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ProbeFileError(f"{path}: not a JSON array of objects ({e}); write one JSON array, or one object per line") from e
        if not isinstance(rows, list):
            raise ProbeFileError(f"{path}: the file is not a JSON array; write one array of objects, or one object per line")
        return [_drop_nulls(r) if isinstance(r, dict) else r for r in rows]
    return [_drop_nulls(r) for r in _table(path).to_pylist()]


def _table(path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if path.is_dir():
            return pa.concat_tables([_arrow(path / f["filename"]) for f in _state(path).get("_data_files", [])])
        if path.suffix == ".parquet":
            return pq.read_table(path)
        return _arrow(path)
    except (OSError, pa.ArrowException, KeyError, TypeError) as e:
        raise ProbeFileError(f"{path}: not a readable {path.suffix.lstrip('.') or 'save_to_disk'} data set ({type(e).__name__}: "
                             f"{str(e)[:120]}); write it again with datasets (to_parquet, save_to_disk)") from e  # fmt: skip


def _arrow(path: Path):
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        try:
            return pa.ipc.open_stream(source).read_all()  # datasets writes Arrow streams
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_file(source).read_all()


def _state(folder: Path) -> dict:
    if (folder / SPLITS).is_file():
        splits = json.loads((folder / SPLITS).read_text()).get("splits", [])
        shown = ", ".join(splits) or "none listed"
        raise ProbeFileError(f"{folder}: a DatasetDict with splits {shown}; give one split's folder, e.g. "
                             f"{folder / (splits[0] if splits else 'train')}")  # fmt: skip
    if not (folder / STATE).is_file():
        raise ProbeFileError(f"{folder}: is a directory, not a data set saved with save_to_disk (no {STATE}); give the file "
                             "(JSONL, JSON, parquet, arrow) or the folder save_to_disk wrote")  # fmt: skip
    return json.loads((folder / STATE).read_text())


def _drop_nulls(row: dict) -> dict:
    return {k: v for k, v in row.items() if v is not None}


def rename(row: dict, columns: dict[str, str], where: str) -> dict:
    """``row`` with each mapped column (ours -> theirs: ``{"prompt": "question"}``) under our name."""
    if not columns or not isinstance(row, dict):
        return row
    row = dict(row)
    for ours, theirs in columns.items():
        if theirs not in row or theirs == ours:
            continue
        if ours in row:
            raise ProbeFileError(f"{where}: has both '{theirs}' (--{ours}-column) and '{ours}'; drop --{ours}-column or "
                                 f"the '{ours}' column")  # fmt: skip
        row[ours] = row.pop(theirs)
    return row


def check_mapped(columns: dict[str, str], seen: set[str], files: list[str]) -> None:
    """Every mapped column must be a column of one of the files (a misspelt --prompt-column is not ignored)."""
    for ours, theirs in columns.items():
        if theirs not in seen:
            raise ProbeFileError(f"--{ours}-column {theirs}: no column '{theirs}' in {' or '.join(files)} (columns: "
                                 f"{', '.join(sorted(seen))}); give one of them")  # fmt: skip


def sha256(path: Path) -> str:
    """The hash of a file's bytes, or of every file of a folder (its relative path, then its bytes)."""
    path = Path(path)
    if path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()
