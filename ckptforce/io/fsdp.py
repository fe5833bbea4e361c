"""Hugging Face Trainer runs sharded with FSDP: ``checkpoint-N/pytorch_model_fsdp_0/`` and ``optimizer_0/``.

With ``fsdp_config={"state_dict_type": "SHARDED_STATE_DICT"}`` the Trainer saves each checkpoint through
accelerate's ``save_fsdp_model`` / ``save_fsdp_optimizer``: two torch.distributed.checkpoint folders,

* ``pytorch_model_fsdp_0/`` — ``dist_cp.save({"model": state_dict})``: keys ``model.<fqn>``, read lazily
  as the ``dcp`` layout reads them (one tensor per request, the metadata through a restricted unpickler);
* ``optimizer_0/`` — ``dist_cp.save({"optimizer": optim_state})`` with the state keyed by parameter name
  (``optimizer.state.<fqn>.exp_avg``) and the param groups as small pickled values
  (``optimizer.param_groups.<i>.lr``), which are read with ``torch.load(weights_only=True)``, never with
  DCP's own full unpickle;

beside ``trainer_state.json`` (the step) and no ``config.json`` (the model's config is looked for at the run
root). A tied output embedding is saved as a second copy; it is listed once (an alias) when the config ties
the embeddings and the bytes are equal. ``FULL_STATE_DICT`` runs save ``model.safetensors`` and
``optimizer.bin`` (by name) instead: those are the ``hf`` layout.
"""

from __future__ import annotations

import io
from functools import cached_property, partial
from pathlib import Path

import torch

from ..discover import Candidate, CheckpointRef
from ..errors import CheckpointReadError
from .base import Checkpoint, LazyState, Layout, OptimizerState, TensorInfo
from .dcp import METADATA, DcpCheckpoint, read_metadata
from .hf import config_beside, trainer_candidate, trainer_lr_log

MODEL_DIR = "pytorch_model_fsdp_0"
OPTIMIZER_DIR = "optimizer_0"
_STATE, _GROUPS = "optimizer.state.", "optimizer.param_groups."


class FsdpCheckpoint(Checkpoint):
    layout = "fsdp"

    def __init__(self, ref: CheckpointRef, *, trust_pickles: bool = False):
        super().__init__(ref)
        self.folder = ref.path
        self._model = DcpCheckpoint(CheckpointRef(ref.path / MODEL_DIR, "dcp", ref.step, ref.step_source), trust_pickles=trust_pickles)
        self._names = [n for n in self._model.names()]
        self.aliases = self._tied()
        self._names = [n for n in self._names if n not in self.aliases]

    def _tied(self) -> dict[str, str]:
        """{output embedding: input embedding} when the config ties them and the two saved copies are equal."""
        if not (self.config or {}).get("tie_word_embeddings", False):
            return {}
        out: dict[str, str] = {}
        matrices = [n for n in self._names if len(self._model.info(n).shape) == 2]
        for i, a in enumerate(matrices):
            for b in matrices[i + 1 :]:
                if b in out or self._model.info(a) != self._model.info(b):
                    continue
                if torch.equal(self._model.tensor(a), self._model.tensor(b)):
                    out[b] = a
        return out

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        return self._model.info(name)

    def tensor(self, name: str) -> torch.Tensor:
        return self._model.tensor(name)

    def files(self) -> list[Path]:
        return self._model.files()

    @cached_property
    def config(self) -> dict:
        return config_beside(self.folder)

    def model_args(self) -> dict | None:
        return self.config or None

    def lr_log(self) -> list[tuple[int, float]]:
        return trainer_lr_log(self.folder)

    def optimizer(self) -> OptimizerState | None:
        folder = self.folder / OPTIMIZER_DIR
        if not (folder / METADATA).is_file():
            return None
        return read_named_optimizer(folder, {n: self.info(n) for n in self._names}, self.aliases, self.warnings)


def read_named_optimizer(folder: Path, info: dict[str, TensorInfo], aliases: dict[str, str], warnings: list[str]) -> OptimizerState:
    """An optimizer state saved by DCP under parameter names, each tensor read when asked for."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, TensorStorageMetadata

    md = read_metadata(folder)
    stored: dict[str, dict[str, tuple]] = {}  # name -> {state key: (DCP key, shape, dtype)}
    group_values: dict[int, dict] = {}
    for key, meta in md.state_dict_metadata.items():
        if key.startswith(_STATE) and isinstance(meta, TensorStorageMetadata):
            fqn, what = key[len(_STATE) :].rsplit(".", 1)
            stored.setdefault(aliases.get(fqn, fqn), {})[what] = (key, tuple(meta.size), meta.properties.dtype)
        elif key.startswith(_GROUPS) and isinstance(meta, BytesStorageMetadata):
            index, what = key[len(_GROUPS) :].split(".", 1)
            group_values.setdefault(int(index), {})[what] = _read_bytes(folder, md, key)
    per_param = {n: LazyState(keys, partial(_load, folder, keys)) for n, keys in stored.items()}
    unknown = [n for n in per_param if n not in info]
    if unknown:
        warnings.append(f"{folder}: optimizer state for {len(unknown)} names the model does not have (e.g. {unknown[0]}); not used")
    groups = []
    for i in sorted(group_values):
        g = dict(group_values[i])
        g["names"] = [aliases.get(p, p) for p in g.pop("params", []) if aliases.get(p, p) in info]
        groups.append(g)
    state = {n: s for n, s in per_param.items() if n in info}
    return OptimizerState(folder, state, groups, "by name (torch.distributed.checkpoint)", len(unknown))  # type: ignore[arg-type]


def _load(folder: Path, keys: dict[str, tuple]) -> dict[str, torch.Tensor]:
    """{state key: tensor} for one parameter, in one DCP read."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from .dcp import _reader

    out = {key: torch.empty(shape, dtype=dtype) for key, shape, dtype in keys.values()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(out, storage_reader=_reader(folder), no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP wraps read errors in its own exception types
        raise CheckpointReadError(f"{folder}: cannot read {next(iter(keys.values()))[0]!r} ({type(e).__name__}); the .distcp files are damaged or missing") from e
    return {what: out[key] for what, (key, _, _) in keys.items()}


def _read_bytes(folder: Path, md, key: str):
    """A small non-tensor value DCP saved with torch.save, read with weights_only=True."""
    entry = next(((idx, s) for idx, s in md.storage_data.items() if idx.fqn == key), None)
    if entry is None:
        raise CheckpointReadError(f"{folder}: {key!r} is listed in .metadata but not stored; the checkpoint is damaged")
    _, where = entry
    if getattr(where, "transform_descriptors", None):
        raise CheckpointReadError(f"{folder}: {key!r} is stored with transforms {where.transform_descriptors}, which ckptforce does not read")
    try:
        with open(folder / where.relative_path, "rb") as f:
            f.seek(where.offset)
            data = f.read(where.length)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged value can raise anything
        raise CheckpointReadError(f"{folder}: cannot read {key!r} ({type(e).__name__}: {e}); the .distcp files are damaged") from e


class FsdpLayout(Layout):
    name = "fsdp"
    summary = "Hugging Face Trainer with FSDP sharded state: checkpoint-N/ with pytorch_model_fsdp_0/ (+ optimizer_0/)"

    def probe(self, path: Path) -> Candidate | None:
        if path.is_dir() and (path / MODEL_DIR / METADATA).is_file():
            return trainer_candidate(path, self.name)
        return None

    def open(self, ref: CheckpointRef, *, trust_pickles: bool = False) -> Checkpoint:
        return FsdpCheckpoint(ref, trust_pickles=trust_pickles)
