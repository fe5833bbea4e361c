"""torch.distributed.checkpoint (DCP) directories: ``.metadata`` + ``*.distcp``.

The ``.metadata`` file is a pickle. It is read with an unpickler that admits only DCP's own metadata classes,
torch dtypes / ``Size`` and paths, so a crafted file cannot run code; the tensor data itself is read by DCP
with ``weights_only`` loads, one tensor per request (no process group needed). Keys are the flattened state
dict FQNs (``model.0.weight``); the common ``model.`` prefix of a ``{"model": state_dict}`` save is dropped,
and optimizer entries (``optimizer.…`` / ``optim.…``) are set apart from the model's tensors.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch

from ..discover import Candidate, CheckpointRef
from ..errors import CheckpointReadError, PickleRefusedError
from .base import Checkpoint, Layout, TensorInfo, canonical_names

METADATA = ".metadata"
_OPTIMIZER_ROOTS = ("optimizer.", "optim.", "optimizers.")
_SAFE_MODULE_PREFIX = "torch.distributed.checkpoint."
_SAFE_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
    ("pathlib._local", "PosixPath"), ("pathlib._local", "WindowsPath"), ("builtins", "set"), ("builtins", "frozenset"),
}  # fmt: skip


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP metadata classes, torch dtypes and a few plain types; refuses anything else."""

    def find_class(self, module: str, name: str):
        obj = None
        if (module, name) in _SAFE_GLOBALS or (module.startswith(_SAFE_MODULE_PREFIX) and not name.startswith("__")):
            obj = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if obj is None or (module.startswith(_SAFE_MODULE_PREFIX) and not isinstance(obj, type)):
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")
        return obj


def read_metadata(folder: Path):
    path = folder / METADATA
    try:
        return _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except pickle.UnpicklingError as e:
        raise PickleRefusedError(f"{path}: {e}; this is not metadata written by torch.distributed.checkpoint") from e
    except Exception as e:  # noqa: BLE001 - a damaged pickle can raise anything
        raise CheckpointReadError(f"{path}: cannot read DCP metadata ({type(e).__name__}: {e}); the checkpoint is damaged") from e


def _reader(folder: Path):
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            md = read_metadata(folder)
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeReader(str(folder))


class DcpCheckpoint(Checkpoint):
    layout = "dcp"

    def __init__(self, ref: CheckpointRef, *, trust_pickles: bool = False):
        super().__init__(ref)
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        md = read_metadata(ref.path)
        tensors = {k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
        model = [k for k in tensors if not k.startswith(_OPTIMIZER_ROOTS)]
        self.optimizer_keys = [k for k in tensors if k.startswith(_OPTIMIZER_ROOTS)]
        canon = canonical_names(model, strip_common=("model.",))
        self._raw = {c: r for r, c in canon.items()}
        self._info = {c: TensorInfo(tuple(tensors[r].size), tensors[r].properties.dtype) for c, r in self._raw.items()}

    def names(self) -> list[str]:
        return list(self._raw)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def tensor(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        info = self._info[name]
        out = {self._raw[name]: torch.empty(info.shape, dtype=info.dtype)}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.load(out, storage_reader=_reader(self.ref.path), no_dist=True)
        except Exception as e:  # noqa: BLE001 - DCP wraps read errors in its own exception types
            raise CheckpointReadError(f"{self.ref.path}: cannot read tensor {name!r} ({type(e).__name__}); the .distcp files are damaged or missing") from e
        return out[self._raw[name]]

    def files(self) -> list[Path]:
        return sorted(self.ref.path.glob("*.distcp")) + [self.ref.path / METADATA]


class DcpLayout(Layout):
    name = "dcp"
    summary = "torch.distributed.checkpoint folders (step_N/ with .metadata and *.distcp)"

    def probe(self, path: Path) -> Candidate | None:
        if path.is_dir() and (path / METADATA).is_file():
            return Candidate(path, self.name)
        return None

    def open(self, ref: CheckpointRef, *, trust_pickles: bool = False) -> Checkpoint:
        return DcpCheckpoint(ref, trust_pickles=trust_pickles)
