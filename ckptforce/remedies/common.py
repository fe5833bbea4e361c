"""What every export records about the cube it came from."""

from __future__ import annotations

import hashlib
from pathlib import Path

import xarray as xr

from .. import __version__


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
