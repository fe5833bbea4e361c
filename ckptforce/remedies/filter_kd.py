"""Filter-KD soft targets (Ren et al., ICLR 2022, "Better supervisory signals by observing learning paths"):
a classifier cube in, one ``.npz`` of EMA-filtered predictions keyed by example id out.

Each example's prediction q_t = softmax(log π(·|x) at checkpoint t) follows a path through the simplex; on a
noisy or hard label it zig-zags, first towards the class the rest of the data supports, later to the label it
memorises. The filtered path

    q̄_0 = q_0,      q̄_t = α·q̄_{t−1} + (1 − α)·q_t      over the checkpoints in step order

is a better supervisory signal than the label or the last prediction: distil a fresh student on q̄_T.

In: ``logp_class`` (checkpoint, probe, class) of a cube written by ``ckptforce analyze`` with the *training*
examples as probes (``--probes train.npz``: x, y, ids), so that every example's path is in the cube.
Out (``write_filter_kd``, atomic)::

    ids          (N,)    str       the probe ids: the example ids of the probe file
    targets      (N, V)  float32   q̄_T, rows summing to 1: the soft targets
    labels       (N,)    int64     the labels of the probe file (as trained: noisy ones stay noisy); -1 when absent
    steps        (C,)    int64     the steps of the checkpoints the EMA ran over
    provenance   ()      str       JSON: the cube (path, SHA-256, run, command) and the settings (alpha, rule)

Language models: per-token top-k targets need each checkpoint's next-token distribution along the response, which
the cube does not hold (``logp_tok`` is the log-probability of the response's own tokens only); the export says so.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import xarray as xr

from ..atomic import write_atomic
from ..cube import open_cube
from ..errors import ExportError
from .common import cube_provenance

#: α of DESIGN §4 item 10 (and of the report's learning-paths section)
DEFAULT_ALPHA = 0.95
RULE = "q̄_0 = q_0; q̄_t = α·q̄_{t−1} + (1 − α)·q_t over the checkpoints in step order; q_t = softmax(logp_class_t)"


def ema_targets(q: np.ndarray, alpha: float) -> np.ndarray:
    """q (C, N, V) predictions at the checkpoints in step order -> q̄ (N, V): q̄_0 = q_0, q̄_t = α q̄_{t−1} + (1−α) q_t."""
    if not 0.0 <= alpha < 1.0:
        raise ExportError(f"--alpha {alpha}: outside [0, 1); give the EMA weight of the past, e.g. 0.95 (0: the last prediction)")
    q_bar = q[0].copy()  # (N, V)
    for q_t in q[1:]:
        q_bar = alpha * q_bar + (1.0 - alpha) * q_t
    return q_bar


def softmax(logp: np.ndarray) -> np.ndarray:
    """Normalised probabilities from log-probabilities along the last axis (float64)."""
    z = np.asarray(logp, dtype=np.float64)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _check(ds: xr.Dataset, where: str) -> None:
    if "logp_class" in ds:
        return
    if "logp_tok" in ds:
        raise ExportError(f"{where}: a language-model cube: per-token top-k Filter-KD targets need each checkpoint's next-token "
                          "distribution, which ckptforce analyze does not record (logp_tok holds only the response's own tokens); "
                          "export filter-kd works on classifier cubes (logp_class) for now")  # fmt: skip
    raise ExportError(f"{where}: no per-class predictions (logp_class); analyze the run with --probes set to the training "
                      "examples' arrays (.npz with x, y, ids) to export their Filter-KD targets")  # fmt: skip


def filter_kd_targets(ds: xr.Dataset, alpha: float = DEFAULT_ALPHA, *, where: str = "cube") -> dict[str, np.ndarray]:
    """The arrays of the export (module docstring), without provenance."""
    _check(ds, where)
    logp = ds["logp_class"].transpose("checkpoint", "probe", "class").values  # (C, N, V)
    if np.isnan(logp).any():
        c, n, _ = np.argwhere(np.isnan(logp))[0]
        raise ExportError(f"{where}: logp_class is NaN for probe {ds['probe'].values[n]} at step {int(ds['step'].values[c])} "
                          "(a diverged checkpoint?); analyze the run without it (move it out of the run directory)")  # fmt: skip
    targets = ema_targets(softmax(logp), alpha)
    labels = ds["probe_label"].values.astype(np.int64) if "probe_label" in ds else np.full(len(targets), -1)
    return {"ids": ds["probe"].values.astype(str), "targets": targets.astype(np.float32), "labels": labels,
            "steps": ds["step"].values.astype(np.int64)}  # fmt: skip


def write_filter_kd(cube_path: str | Path, out: str | Path, alpha: float = DEFAULT_ALPHA) -> tuple[Path, dict]:
    """Open the cube, compute the targets, write ``out`` atomically; returns (path, the arrays)."""
    cube_path, out = Path(cube_path), Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: no such directory for the output; create it or choose another -o path")
    ds = open_cube(cube_path)
    arrays = filter_kd_targets(ds, alpha, where=str(cube_path))
    settings = {"alpha": alpha, "rule": RULE, "checkpoints": int(len(arrays["steps"])), "examples": int(len(arrays["ids"])),
                "classes": int(arrays["targets"].shape[1])}  # fmt: skip
    provenance = json.dumps(cube_provenance(cube_path, ds, "filter-kd", settings), ensure_ascii=False, sort_keys=True)

    def write(tmp: str) -> None:
        buf = io.BytesIO()  # np.savez on a path would append ".npz" to the temporary name
        np.savez_compressed(buf, provenance=np.array(provenance), **arrays)
        Path(tmp).write_bytes(buf.getvalue())

    return write_atomic(out, write, error=ExportError), arrays
