"""The reader contract: one saved checkpoint as lazily read tensors under canonical names.

A layout (one module of ``ckptforce.io``) answers four questions, as in ``xarray.backends``:

* ``probe(path)`` — can I open this file or directory?  (a ``Candidate``, or None)
* ``open(ref)``  — give me a ``Checkpoint`` for it;
* ``Checkpoint.names()`` / ``info(name)`` — which tensors, of which shape and dtype?
* ``Checkpoint.tensor(name)`` — give me one, read from disk only now.

Names are canonical: wrapper prefixes (``module.``, ``_orig_mod.``, PEFT's ``base_model.model.``) are stripped
and a tied weight is listed once (its other names are in ``aliases``). Tensors come back in their stored dtype;
the arithmetic stages cast to float32.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, Iterable

import torch

from ..discover import Candidate, CheckpointRef

#: Prefixes added by wrappers rather than by the model: DDP / DataParallel, torch.compile, PEFT.
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class LowRank:
    """A matrix kept factored: ``scale · left @ right``; left (rows, r), right (r, cols)."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float = 1.0

    def dense(self) -> torch.Tensor:
        return self.scale * (self.left.float() @ self.right.float())


@dataclass
class OptimizerState:
    """Per-parameter optimizer state mapped back to canonical tensor names.

    ``per_param[name]`` holds the saved tensors (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, …) and
    ``step``; ``groups`` are the param groups without their ``params`` lists (lr, betas, eps, weight_decay),
    each with the ``names`` it holds; ``mapping`` says how positions were matched to names and ``unmapped``
    counts positions that could not be.
    """

    source: Path
    per_param: dict[str, dict[str, torch.Tensor | float]]
    groups: list[dict]
    mapping: str
    unmapped: int = 0

    @property
    def kind(self) -> str:
        keys = {k for state in self.per_param.values() for k in state}
        if "exp_avg_sq" in keys:
            return "adam"
        if "square_avg" in keys:
            return "rmsprop"
        if "momentum_buffer" in keys:
            return "sgd-momentum"
        return "unknown" if keys else "stateless"


class LazyState(Mapping):
    """One parameter's optimizer state whose tensors are read on first access, all at once (``load()`` returns
    {key: tensor}); 0-d tensors come back as floats, as ``map_optimizer_state`` gives them."""

    def __init__(self, keys: Iterable[str], load: Callable[[], dict]):
        self._keys, self._load, self._cache = list(keys), load, None

    def __getitem__(self, key: str):
        if key not in self._keys:
            raise KeyError(key)
        if self._cache is None:
            self._cache = {k: (v if not isinstance(v, torch.Tensor) or v.ndim > 0 else float(v)) for k, v in self._load().items()}
        return self._cache[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class Checkpoint(abc.ABC):
    """One checkpoint: lazily read tensors, canonical names, and what the trainer saved beside them."""

    layout: str = ""
    #: Bytes a reader may keep memory-mapped and resident before it lets go of them (readers whose pages
    #: outlive a read, like torch's mmap loads, honour it); a caller holding many checkpoints open lowers it.
    resident_budget: int = 64 * 2**20

    def __init__(self, ref: CheckpointRef):
        self.ref = ref
        self.aliases: dict[str, str] = {}  # other name of a tied tensor -> the name it is listed under
        self.warnings: list[str] = []  # what the reader found wrong but could read past (an unmatched optimizer state)

    # --- the contract -------------------------------------------------------------------------------
    @abc.abstractmethod
    def names(self) -> list[str]:
        """Canonical tensor names, in file order, each tied tensor once."""

    @abc.abstractmethod
    def info(self, name: str) -> TensorInfo:
        """Shape and stored dtype, without reading the data."""

    @abc.abstractmethod
    def tensor(self, name: str) -> torch.Tensor:
        """The tensor in its stored dtype, read now."""

    @abc.abstractmethod
    def files(self) -> list[Path]:
        """The files this checkpoint's tensors live in (for sizes and hashes)."""

    # --- optional extras ----------------------------------------------------------------------------
    def factors(self, name: str) -> LowRank | None:
        """The tensor as low-rank factors when it is stored that way (LoRA), else None."""
        return None

    def optimizer(self) -> OptimizerState | None:
        """The saved optimizer state mapped to tensor names, or None when none was saved."""
        return None

    def model_args(self) -> dict | None:
        """The model's construction arguments saved with the weights (HF config.json, nanoGPT model_args,
        Lightning hyper_parameters), or None."""
        return None

    def lr_log(self) -> list[tuple[int, float]]:
        """(step, learning rate) pairs the trainer logged, when it keeps such a log."""
        return []

    def release(self) -> None:
        """Drop cached file handles and mapped pages; the next read reopens. Safe to call any time."""

    def close(self) -> None:
        self.release()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- shared helpers -----------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.ref.path

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files())

    def param_count(self) -> int:
        return sum(self.info(n).numel for n in self.names() if self.info(n).dtype.is_floating_point)

    def dtypes(self) -> list[torch.dtype]:
        seen: dict[torch.dtype, None] = {}
        for n in self.names():
            seen[self.info(n).dtype] = None
        return list(seen)


class Layout(abc.ABC):
    """One checkpoint layout: how to recognise it, and how to open it."""

    name: str = ""
    summary: str = ""  # one line for "known layouts" in error messages

    @abc.abstractmethod
    def probe(self, path: Path) -> Candidate | None:
        """A Candidate when ``path`` (a file or directory) is one checkpoint of this layout."""

    @abc.abstractmethod
    def open(self, ref: CheckpointRef, *, trust_pickles: bool = False) -> Checkpoint:
        """Open one checkpoint of this layout, lazily."""

    def find(self, root: Path) -> list[Candidate]:
        """The checkpoints of this layout in ``root``: its entries, and ``root`` itself as a final model."""
        found = [c for p in sorted(root.iterdir()) if (c := self.probe(p)) is not None]
        own = self.probe(root)
        return found + ([own] if own is not None else [])


def strip_prefixes(name: str, prefixes: Iterable[str] = WRAPPER_PREFIXES) -> str:
    """``module._orig_mod.transformer.wte.weight`` -> ``transformer.wte.weight``."""
    changed = True
    while changed:
        changed = False
        for p in prefixes:
            if name.startswith(p):
                name, changed = name[len(p) :], True
    return name


def canonical_names(raw: list[str], *, strip_common: tuple[str, ...] = ()) -> dict[str, str]:
    """Map on-disk names to canonical names (raw -> canonical), refusing collisions.

    ``strip_common`` are prefixes removed only when *every* name has them (Lightning's ``model.`` when the
    LightningModule wraps a module named ``model``).
    """
    names = {r: strip_prefixes(r) for r in raw}
    for prefix in strip_common:
        if names and all(n.startswith(prefix) for n in names.values()):
            names = {r: n[len(prefix) :] for r, n in names.items()}
    if len(set(names.values())) != len(names):
        return {r: r for r in raw}  # stripping would merge two tensors: keep the names as stored
    return names


def tied_groups(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensors share storage with an earlier one: {alias: first name}.

    Two names are tied when they view the same bytes: same storage pointer, offset, shape and stride.
    """
    first: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def describe_keys(keys: Iterable[str], limit: int = 4) -> str:
    """A short list of keys for error messages."""
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


@dataclass
class StateDictSource:
    """A plain {name: tensor} dict already loaded (memory-mapped) from a file, with canonical names."""

    tensors: dict[str, torch.Tensor]  # canonical name -> tensor
    raw_names: dict[str, str] = field(default_factory=dict)  # canonical -> on-disk name
    aliases: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_state_dict(cls, sd: dict, *, strip_common: tuple[str, ...] = ()) -> "StateDictSource":
        sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
        raw_aliases = tied_groups(sd)
        mapping = canonical_names(list(sd), strip_common=strip_common)
        tensors = {mapping[r]: t for r, t in sd.items() if r not in raw_aliases}
        aliases = {mapping[a]: mapping[f] for a, f in raw_aliases.items()}
        return cls(tensors, {mapping[r]: r for r in sd if r not in raw_aliases}, aliases)
