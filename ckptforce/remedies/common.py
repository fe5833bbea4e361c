"""What every export records about the cube it came from."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable

import xarray as xr

from .. import __version__
from ..atomic import write_atomic
from ..cube import open_cube
from ..errors import ExportError


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cube_provenance(cube_path: str | Path, ds: xr.Dataset, export: str, settings: dict) -> dict:
    """``{"export", "tool_version", "cube", "cube_sha256", "run_dir", "cube_history", "settings"}``: enough to tell
    which cube (and which run and command behind it) an exported file came from, and how it was made."""
    path = Path(cube_path).resolve()
    return {"export": export, "tool_version": __version__, "cube": str(path), "cube_sha256": file_sha256(path),
            "run_dir": str(ds.attrs.get("run_dir", "")), "cube_history": str(ds.attrs.get("history", "")),
            "settings": settings}  # fmt: skip


def write_training_export(cube_path: str | Path, train: str | Path, out: str | Path, sidecar: str | Path | None, export: str, config,
                          make: Callable[[xr.Dataset, Path], tuple[bytes, list[dict], dict]]) -> tuple[Path, Path, list[dict]]:  # fmt: skip
    """The write path of every export built from a training file: ``make(cube, train)`` returns (the output's bytes,
    one record per line of evidence, settings of its own); the output and the sidecar (default ``OUT.reasons.jsonl``:
    the provenance — cube, ``config``, the training file and its SHA-256 — then the records) are written atomically.
    The training file is never the output."""
    cube_path, train, out = Path(cube_path), Path(train), Path(out)
    sidecar = Path(sidecar) if sidecar else out.with_name(out.name + ".reasons.jsonl")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such directory for the output; create it or choose another -o path")
    if out.resolve() == train.resolve():
        raise ExportError(f"{out}: the same file as --train; write the {export} output elsewhere (the original is kept as it is)")
    ds = open_cube(cube_path)
    body, records, own = make(ds, train)
    train_sha = file_sha256(train)
    analysed = json.loads(ds.attrs.get("config", "{}") or "{}").get("train_sha256")
    settings = {**dataclasses.asdict(config), **own, "train": str(train.resolve()), "train_sha256": train_sha,
                "train_matches_cube": None if analysed is None else analysed == train_sha}  # fmt: skip
    head = {"provenance": cube_provenance(cube_path, ds, export, settings)}
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [head, *records]).encode()
    write_atomic(out, lambda tmp: Path(tmp).write_bytes(body), error=ExportError)
    write_atomic(sidecar, lambda tmp: Path(tmp).write_bytes(text), error=ExportError)
    return out, sidecar, records
