"""Plain ``torch.save`` files: bare state dicts and training-loop dicts (nanoGPT and the like).

Files are opened with ``torch.load(weights_only=True, mmap=True)``: nothing is unpickled beyond tensors and
plain containers, and tensor data stays on disk until it is touched. A file that needs a full unpickle
(arbitrary classes inside) is refused unless ``trust_pickles`` is set.

A loaded object is understood as either a bare ``{name: tensor}`` state dict or a dict holding one under a
usual key (``model``, ``state_dict``, ``model_state_dict``, …), with the optimizer state and step beside it
(nanoGPT: ``{"model", "optimizer", "iter_num", "model_args"}``). Prefixes ``module.`` / ``_orig_mod.`` are
stripped and tied tensors (same storage) are listed once.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from ..discover import Candidate, CheckpointRef
from ..errors import CheckpointReadError, PickleRefusedError
from .base import Checkpoint, Layout, OptimizerState, StateDictSource, TensorInfo
from .optim import map_optimizer_state

MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module", "network", "net")
OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "optimizer_states")
STEP_KEYS = ("iter_num", "global_step", "global_steps", "step", "iteration", "num_updates")
#: Files a trainer writes beside the model that are not checkpoints of it.
NOT_MODELS = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state", "scaler")
SUFFIXES = (".pt", ".pth", ".bin", ".tar")


def load_torch_file(path: Path, *, trust_pickles: bool = False):
    """``torch.load`` that never unpickles arbitrary objects unless asked; errors name the file."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e) and "zip" not in str(e).lower():
                raise
            # Legacy (pre-zip) format cannot be memory-mapped: read it plainly.
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # An opcode the restricted unpickler does not know ("Unsupported operand 110") means bytes that are no
        # torch.save pickle (damaged or foreign), not a file to trust; the rest (a GLOBAL to import) needs a full one.
        if "weights only" not in str(e).lower() or "unsupported operand" in str(e).lower():
            raise CheckpointReadError(_unreadable(path, e)) from e
        if not trust_pickles:
            lines = str(e).strip().splitlines()
            hint = next((ln.strip() for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), "")
            raise PickleRefusedError(
                f"{path}: reading this file needs a full unpickle, which can run code from the file"
                f"{' (' + hint + ')' if hint else ''}; if you trust where it came from, rerun with --trust-pickles"
            ) from e
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:  # noqa: BLE001 - anything the pickle raises is a read error here
            raise CheckpointReadError(f"{path}: cannot unpickle ({type(e2).__name__}: {e2})") from e2
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointReadError(_unreadable(path, e)) from e


def _unreadable(path: Path, e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    # torch's weights-only refusal opens with a long preamble; the line after "WeightsUnpickler error:" says what
    marker = next((i for i, ln in enumerate(lines) if "WeightsUnpickler error" in ln), None)
    first = ((lines[marker + 1 : marker + 2] if marker is not None else lines[:1]) or [""])[0][:160]
    return (
        f"{path}: not a readable torch.save file ({type(e).__name__}: {first}); "
        "it may be truncated or still being written — re-save it or move it out of the run directory"
    )


def split_training_dict(obj) -> tuple[dict, object, int | None, str]:
    """(state dict, optimizer state or None, recorded step or None, the key the step came from)."""
    if not isinstance(obj, dict):
        raise TypeError(type(obj).__name__)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, None, ""
    model = next((obj[k] for k in MODEL_KEYS if isinstance(obj.get(k), dict)), None)
    if model is None:
        raise TypeError("no state dict under " + "/".join(MODEL_KEYS))
    optimizer = next((obj[k] for k in OPTIMIZER_KEYS if k in obj), None)
    if isinstance(optimizer, list):  # Lightning keeps one state per optimizer
        optimizer = optimizer[0] if len(optimizer) == 1 else None
    for k in STEP_KEYS:
        v = obj.get(k)
        if isinstance(v, (int, torch.Tensor)) and not isinstance(v, bool) and (not isinstance(v, torch.Tensor) or v.numel() == 1):
            return model, optimizer, int(v), k
    return model, optimizer, None, ""


class TorchCheckpoint(Checkpoint):
    """A checkpoint stored as one ``torch.save`` file."""

    layout = "torch"
    strip_common: tuple[str, ...] = ()

    def __init__(self, ref: CheckpointRef, *, trust_pickles: bool = False):
        super().__init__(ref)
        self._trust = trust_pickles
        self._obj = None
        self._src: StateDictSource | None = None
        self._opt_raw = None
        self.recorded_step: int | None = None
        self._read_bytes = 0
        self._load()

    def _load(self) -> None:
        obj = load_torch_file(self.ref.path, trust_pickles=self._trust)
        try:
            sd, self._opt_raw, self.recorded_step, _ = split_training_dict(obj)
        except TypeError as e:
            keys = list(obj)[:8] if isinstance(obj, dict) else []
            raise CheckpointReadError(
                f"{self.ref.path}: holds no state dict ({e}; top-level keys: {keys}); "
                "save model.state_dict(), or a dict with it under 'model' or 'state_dict'"
            ) from None
        self._src = StateDictSource.from_state_dict(sd, strip_common=self.strip_common)
        self.aliases = self._src.aliases
        self._obj = obj

    def names(self) -> list[str]:
        return list(self._source.tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._source.tensors[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        t = self._source.tensors[name]
        # Pages of the memory-mapped file stay resident while the loaded dict lives: drop it after every
        # ``resident_budget`` bytes read (the tensor handed out keeps its own pages).
        self._read_bytes += t.numel() * t.element_size()
        if self._read_bytes >= self.resident_budget:
            self.release()
        return t

    def files(self) -> list[Path]:
        return [self.ref.path]

    def optimizer(self) -> OptimizerState | None:
        names = self.names()  # (re)loads the file if it was released
        if self._opt_raw is None:
            return None
        state, problem = map_optimizer_state(self._opt_raw, names, {n: self.info(n) for n in names}, source=self.ref.path)
        if problem:
            self.warnings.append(problem)
        return state

    def model_args(self) -> dict | None:
        self.names()  # (re)loads the file if it was released
        obj = self._obj if isinstance(self._obj, dict) else {}
        for key in ("model_args", "hyper_parameters", "config", "args"):
            if isinstance(obj.get(key), dict):
                return dict(obj[key])
        return None

    def release(self) -> None:
        # Dropping the loaded dict unmaps its pages; the next access maps the file again.
        self._obj = self._src = self._opt_raw = None
        self._read_bytes = 0

    @property
    def _source(self) -> StateDictSource:
        if self._src is None:
            self._load()
        return self._src


class TorchFileLayout(Layout):
    name = "torch"
    summary = "torch.save files (.pt/.pth/.bin): bare state dicts or {'model': …, 'optimizer': …, 'iter_num': N}"
    suffixes = SUFFIXES
    checkpoint_class = TorchCheckpoint

    def probe(self, path: Path) -> Candidate | None:
        if not (path.is_file() and path.suffix in self.suffixes):
            return None
        if any(path.name.startswith(p) for p in NOT_MODELS):
            return None
        return self._with_record(Candidate(path, self.name))

    def _with_record(self, c: Candidate) -> Candidate:
        """Read the recorded step (a cheap memory-mapped load); unreadable files fail here, by name."""
        try:
            obj = load_torch_file(c.path)
        except PickleRefusedError:
            return c  # refused again, with the fix, when the checkpoint is opened
        try:
            _, _, step, key = split_training_dict(obj)
        except TypeError:
            return c
        return Candidate(c.path, c.layout, step, f"{c.path.name}:{key}" if step is not None else "")

    def open(self, ref: CheckpointRef, *, trust_pickles: bool = False) -> Checkpoint:
        return self.checkpoint_class(ref, trust_pickles=trust_pickles)

