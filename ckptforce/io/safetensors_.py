"""Safetensors: a store over one or more ``.safetensors`` files, and the "directory of bare files" layout.

``SafetensorsStore`` reads headers once (names, shapes, dtypes) and tensors one at a time through
``safetensors.safe_open``. A ``safe_open`` handle memory-maps its file and every page it has touched stays
resident while the handle is open, so the store opens the file for each read and closes it at once: the
returned tensor keeps only its own pages mapped, and resident memory follows the tensors the caller holds,
not the size or number of checkpoints (``bench/updates.py`` measures both).

Layout ``safetensors``: a directory of ``*.safetensors`` files whose names carry the step
(``model_step500.safetensors``, ``step_0001000.safetensors``), one checkpoint per file.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..discover import Candidate, CheckpointRef, step_from_name
from ..errors import CheckpointReadError
from .base import Checkpoint, Layout, TensorInfo, canonical_names

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

class SafetensorsStore:
    """Tensors spread over safetensors files (one file, or the shards of an index), read lazily."""

    def __init__(self, files: list[Path]):
        self.files = list(files)
        self.where: dict[str, Path] = {}  # on-disk name -> file
        self.info: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        for f in self.files:
            with _open(f) as h:
                self.metadata.update(h.metadata() or {})
                for key in h.keys():
                    sl = h.get_slice(key)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointReadError(f"{f}: tensor {key!r} has dtype {sl.get_dtype()} that torch cannot hold")
                    self.where[key] = f
                    self.info[key] = TensorInfo(tuple(sl.get_shape()), dtype)

    def get(self, key: str) -> torch.Tensor:
        f = self.where[key]
        with _open(f) as handle:
            try:
                return handle.get_tensor(key)
            except SafetensorError as e:
                raise CheckpointReadError(f"{f}: cannot read tensor {key!r} ({e}); the file is damaged, re-save it") from e


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointReadError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated or still being written — "
            "re-save it or move it out of the run directory"
        ) from e


class SafetensorsCheckpoint(Checkpoint):
    """A checkpoint whose tensors live in safetensors files."""

    layout = "safetensors"

    def __init__(self, ref: CheckpointRef, files: list[Path]):
        super().__init__(ref)
        self.store = SafetensorsStore(files)
        self._raw = canonical_names(list(self.store.where))  # raw -> canonical
        self._by_name = {c: r for r, c in self._raw.items()}

    def names(self) -> list[str]:
        return list(self._by_name)

    def info(self, name: str) -> TensorInfo:
        return self.store.info[self._by_name[name]]

    def tensor(self, name: str) -> torch.Tensor:
        return self.store.get(self._by_name[name])

    def files(self) -> list[Path]:
        return self.store.files


class SafetensorsDirLayout(Layout):
    name = "safetensors"
    summary = "a directory of *.safetensors files with the step in each name (model_step500.safetensors)"

    def probe(self, path: Path) -> Candidate | None:
        if path.is_file() and path.suffix == ".safetensors" and step_from_name(path.name) is not None:
            return Candidate(path, self.name)
        return None

    def find(self, root: Path) -> list[Candidate]:
        return [c for p in sorted(root.iterdir()) if (c := self.probe(p)) is not None]

    def open(self, ref: CheckpointRef, *, trust_pickles: bool = False) -> Checkpoint:
        return SafetensorsCheckpoint(ref, [ref.path])
