"""Classification probes: arrays in (``.npz`` / ``.pt`` / ``.safetensors``), a validated set and batches out.

Keys: ``x`` (N, ...) inputs, ``y`` (or ``labels``) (N,) class indices, optional ``soft`` (N, V) soft labels,
``flipped`` (N,) bool (a label flipped on purpose, as in the zig-zag experiments), ``ids`` (N strings).
Nothing is unpickled. ``make_class_batch`` gives the force code the same view as a language-model batch:
one "position" per probe whose target is the label, so ``logits`` are (B, 1, V).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ProbeFileError, ProbeFileNotFoundError

CLASS_KEYS = ("x", "y", "labels", "soft", "flipped", "ids")
CLASS_SUFFIXES = (".npz", ".pt", ".pth", ".safetensors")


@dataclass
class ClassProbeSet:
    path: Path
    x: torch.Tensor  # (N, ...) float32 inputs
    labels: torch.Tensor  # (N,) long
    soft: torch.Tensor | None  # (N, V) float32, rows sum to 1
    flipped: torch.Tensor | None  # (N,) bool
    ids: list[str]  # given ("ids") or "0".."N-1"

    def __len__(self) -> int:
        return len(self.labels)


def load_class_probes(path) -> ClassProbeSet:
    """Classification probes from ``.npz`` / ``.pt`` / ``.safetensors``: keys ``x`` (N, ...), ``y`` or ``labels``
    (N,) integers ≥ 0, optional ``soft`` (N, V) rows summing to 1, ``flipped`` (N,) bool, ``ids`` (N strings;
    ``.npz`` and ``.pt`` only). Raises ``ProbeFileError`` naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ProbeFileNotFoundError(f"{path}: no such file; give the array file of classification probes")
    if path.suffix not in CLASS_SUFFIXES:
        raise ProbeFileError(f"{path}: unknown format '{path.suffix}'; save the probes as {', '.join(CLASS_SUFFIXES)}")
    raw = _read_arrays(path)
    bad = [k for k in raw if k not in CLASS_KEYS]
    if bad:
        raise ProbeFileError(f"{path}: key '{bad[0]}' is not known (known: {', '.join(CLASS_KEYS)}); rename or drop it")
    if "x" not in raw:
        raise ProbeFileError(f"{path}: x: missing (found: {', '.join(raw) or 'nothing'}); store the inputs under 'x'")
    if "y" in raw and "labels" in raw:
        raise ProbeFileError(f"{path}: y, labels: both given; store the labels once, under 'y'")
    label_key = "y" if "y" in raw else "labels"
    if label_key not in raw:
        raise ProbeFileError(f"{path}: y: missing (found: {', '.join(raw)}); store the labels under 'y'")
    x = _numeric(path, "x", raw["x"])
    if x.dim() == 0 or len(x) == 0:
        raise ProbeFileError(f"{path}: x: no probes (shape {tuple(x.shape)}); store inputs as (N, ...) with N ≥ 1")
    n = len(x)
    labels = _numeric(path, label_key, raw[label_key])
    _check_len(path, label_key, labels, n, 1)
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise ProbeFileError(f"{path}: {label_key}: labels are not integers ({labels.dtype}); store class indices")
    labels = labels.long()
    if bool((labels < 0).any()):
        i = int((labels < 0).nonzero()[0])
        raise ProbeFileError(f"{path}: {label_key}[{i}]: negative label {int(labels[i])}; "
                             "labels are class indices ≥ 0")  # fmt: skip
    soft = flipped = None
    if "soft" in raw:
        soft = _numeric(path, "soft", raw["soft"]).float()
        _check_len(path, "soft", soft, n, 2)
        sums = soft.double().sum(1)  # (N,)
        bad = ~((sums - 1).abs() <= 1e-4) | (soft < 0).any(1) | soft.isnan().any(1)  # (N,); NaN sums are bad
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            raise ProbeFileError(f"{path}: soft[{i}]: not a distribution (sum {float(sums[i]):.6g}, min "
                                 f"{float(soft[i].min()):.6g}); soft labels are rows ≥ 0 summing to 1")  # fmt: skip
        if int(labels.max()) >= soft.shape[1]:
            raise ProbeFileError(f"{path}: {label_key}: label {int(labels.max())} but soft has {soft.shape[1]} "
                                 "classes; make the labels and soft labels agree")  # fmt: skip
    if "flipped" in raw:
        flipped = _numeric(path, "flipped", raw["flipped"])
        _check_len(path, "flipped", flipped, n, 1)
        if not bool(((flipped == 0) | (flipped == 1)).all()):
            raise ProbeFileError(f"{path}: flipped: values other than true/false (0/1); store a boolean array")
        flipped = flipped.bool()
    ids = [str(i) for i in range(n)]
    if "ids" in raw:
        ids = raw["ids"]
        if len(ids) != n:
            raise ProbeFileError(f"{path}: ids: {len(ids)} ids for {n} probes (x); give one id per probe")
        if len(set(ids)) != n:
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ProbeFileError(f"{path}: ids: '{dup}' is used more than once; give every probe a unique id")
    return ClassProbeSet(path, x.float(), labels, soft, flipped, ids)


def _read_arrays(path: Path) -> dict:
    """{key: tensor or numpy array}, ``ids`` as a list of str; nothing is unpickled."""
    try:
        if path.suffix == ".npz":
            import numpy as np

            out: dict = {}
            with np.load(path, allow_pickle=False) as z:
                for k in z.files:
                    try:
                        out[k] = z[k]
                    except ValueError as e:  # object arrays need pickle
                        raise ProbeFileError(f"{path}: {k}: holds Python objects, which would need unpickling; "
                                             "store numbers, or strings as np.array(ids, dtype=str)") from e
            if "ids" in out:
                if out["ids"].dtype.kind not in "US" or out["ids"].ndim != 1:
                    raise ProbeFileError(f"{path}: ids: expected a 1-D string array, found {out['ids'].dtype}; "
                                         "store np.array(ids, dtype=str)")  # fmt: skip
                out["ids"] = [str(s) for s in out["ids"].tolist()]
            return out
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except ProbeFileError:
        raise
    except Exception as e:  # noqa: BLE001 -- unreadable file: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ProbeFileError(f"{path}: cannot be read as {path.suffix} ({first}); save a dict of tensors "
                             "(torch.save / safetensors.torch.save_file / numpy.savez)") from e  # fmt: skip
    if not isinstance(obj, dict):
        raise ProbeFileError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors; "
                             "save {'x': ..., 'y': ...}")  # fmt: skip
    if "ids" in obj and not (isinstance(obj["ids"], (list, tuple)) and all(isinstance(s, str) for s in obj["ids"])):
        raise ProbeFileError(f"{path}: ids: expected a list of strings, found {type(obj['ids']).__name__}")
    return {k: (list(v) if k == "ids" else v) for k, v in obj.items()}


def _numeric(path: Path, key: str, value) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:
        kind = getattr(getattr(value, "dtype", None), "name", type(value).__name__)
        raise ProbeFileError(f"{path}: {key}: not a numeric array ({kind}); store numbers") from e


def _check_len(path: Path, key: str, t: torch.Tensor, n: int, dims: int) -> None:
    if t.dim() != dims or len(t) != n:
        want = "(N,)" if dims == 1 else "(N, V)"
        raise ProbeFileError(f"{path}: {key}: shape {tuple(t.shape)}, expected {want} with N = {n} (the length "
                             "of x); give one row per probe")  # fmt: skip


@dataclass
class ClassBatch:
    """Rows of classification probes; ``targets`` / ``target_mask`` are (B, 1) like a one-token response."""

    x: torch.Tensor  # (B, ...) inputs
    targets: torch.Tensor  # (B, 1) labels
    target_mask: torch.Tensor  # (B, 1) True
    rows: list[int]  # probe index of each row

    def __len__(self) -> int:
        return len(self.rows)

    def to(self, device) -> "ClassBatch":
        return ClassBatch(self.x.to(device), self.targets.to(device), self.target_mask.to(device), self.rows)

    def select(self, index) -> "ClassBatch":
        picked = list(range(len(self.rows)))[index] if isinstance(index, slice) else list(index)
        idx = torch.tensor(picked, dtype=torch.long)
        return ClassBatch(self.x[idx], self.targets[idx], self.target_mask[idx], [self.rows[i] for i in picked])


def make_class_batch(probes: ClassProbeSet, rows: list[int] | None = None, *, dtype: torch.dtype = torch.float32) -> ClassBatch:
    """A batch of the given probe indices (all when None), inputs cast to ``dtype``."""
    rows = list(range(len(probes))) if rows is None else list(rows)
    idx = torch.tensor(rows, dtype=torch.long)
    labels = probes.labels[idx].unsqueeze(1)  # (B, 1)
    return ClassBatch(probes.x[idx].to(dtype), labels, torch.ones_like(labels, dtype=torch.bool), rows)
