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

Language models (a cube analysed with ``--topk K`` and the training examples as probes): the same filter per response
token of the chosen answer (the trained completion), on the sparse top-K next-token distributions q_t of each
checkpoint — an id outside a checkpoint's top K counts as 0 there, so q̄ is exact on the ids every checkpoint kept
and a lower bound elsewhere. q̄_T = α^T q_0 + Σ_{t≥1} (1 − α) α^{T−t} q_t (the recursion above, summed). Out::

    ids           (N,)        str       the probe ids
    token_ids     (N, W, K)   int64     the K most likely ids of q̄ at each response token, largest first; −1 past the end
    token_probs   (N, W, K)   float32   their probabilities under q̄
    rest          (N, W)      float32   1 − Σ token_probs: the mass of every other id; NaN past the end
    lengths       (N,)        int64     response tokens of each example (position i: its i-th completion token as tokenized)
    steps, provenance                    as above
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
RULE_TOKENS = ("per response token of the chosen answer, q_t = the top-K next-token distribution of checkpoint t (topk_logp; 0 "
               "outside its top K); the K largest of q̄_T are kept")  # fmt: skip


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
    if "logp_class" in ds or "topk_logp" in ds:
        return
    if "logp_tok" in ds:
        raise ExportError(f"{where}: a language-model cube without the next-token distributions: analyze the run with --topk K "
                          "(e.g. 20) and the training examples as --probes to export their per-token Filter-KD targets")  # fmt: skip
    raise ExportError(f"{where}: no per-class predictions (logp_class); analyze the run with --probes set to the training "
                      "examples' arrays (.npz with x, y, ids) to export their Filter-KD targets")  # fmt: skip


def ema_weights(n_checkpoints: int, alpha: float) -> np.ndarray:
    """(C,) the weight of each checkpoint in q̄_T: α^{C−1} for the first, (1 − α) α^{C−1−t} for t ≥ 1 (they sum to 1)."""
    t = np.arange(n_checkpoints)
    w = (1.0 - alpha) * alpha ** (n_checkpoints - 1 - t)
    w[0] = alpha ** (n_checkpoints - 1)
    return w


def sparse_ema(ids: np.ndarray, probs: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of sparse distributions over checkpoints -> the top k of their weighted sum.

    ids (C, P, K) int (−1: none), probs (C, P, K), weights (C,) -> ids (P, k) int64 (−1 where fewer), probs (P, k):
    per row p, q̄(v) = Σ_t weights_t Σ_j [ids_{t,p,j} = v] probs_{t,p,j}, its k largest values, largest first."""
    c, p, kk = ids.shape
    flat_ids = np.moveaxis(ids, 0, 1).reshape(p, c * kk).astype(np.int64)
    flat_w = np.moveaxis(np.nan_to_num(probs) * weights[:, None, None], 0, 1).reshape(p, c * kk)
    flat_w[flat_ids < 0] = 0.0
    flat_ids[flat_ids < 0] = np.iinfo(np.int64).max  # sorts last, weight 0
    order = np.argsort(flat_ids, axis=1, kind="stable")
    sid, sw = np.take_along_axis(flat_ids, order, 1), np.take_along_axis(flat_w, order, 1)
    first = np.ones_like(sid, dtype=bool)
    first[:, 1:] = sid[:, 1:] != sid[:, :-1]
    group = np.cumsum(first, axis=1) - 1  # (P, M): each sorted entry's id group within its row
    sums = np.zeros_like(sw)
    np.add.at(sums, (np.arange(p)[:, None].repeat(sid.shape[1], 1), group), sw)
    gid = np.full_like(sid, -1)
    gid[np.arange(p)[:, None].repeat(sid.shape[1], 1)[first], group[first]] = sid[first]
    gid[gid == np.iinfo(np.int64).max] = -1
    top = np.argsort(-sums, axis=1, kind="stable")[:, :k]
    out_ids, out_p = np.take_along_axis(gid, top, 1), np.take_along_axis(sums, top, 1)
    out_ids[out_p <= 0] = -1
    return out_ids, np.where(out_ids >= 0, out_p, 0.0)


def token_targets(ds: xr.Dataset, alpha: float, *, where: str = "cube") -> dict[str, np.ndarray]:
    """The language-model arrays of the export (module docstring): per-token top-K q̄ along the chosen answer."""
    if not 0.0 <= alpha < 1.0:
        ema_targets(np.zeros((1, 1, 1)), alpha)  # the one message for a bad α
    if "chosen" not in ds["response"].values:
        raise ExportError(f"{where}: the probes have no chosen answer; give the training examples (prompt + completion) as --probes")
    logp = ds["topk_logp"].sel(response="chosen").transpose("checkpoint", "probe", "token", "topk").values  # (C, N, W, K)
    ids = ds["topk_token"].sel(response="chosen").transpose("checkpoint", "probe", "token", "topk").values
    c, n, w, k = logp.shape
    scored = np.isfinite(logp[..., 0]).all(0)  # (N, W) positions with a distribution at every checkpoint
    out_ids, out_p = sparse_ema(np.nan_to_num(ids, nan=-1).reshape(c, n * w, k), np.exp(logp).reshape(c, n * w, k), ema_weights(c, alpha), k)
    out_ids, out_p = out_ids.reshape(n, w, k), out_p.reshape(n, w, k)
    out_ids[~scored], out_p[~scored] = -1, 0.0
    rest = np.where(scored, 1.0 - out_p.sum(-1), np.nan)
    return {"ids": ds["probe"].values.astype(str), "token_ids": out_ids, "token_probs": out_p.astype(np.float32), "rest": rest.astype(np.float32),
            "lengths": scored.sum(1).astype(np.int64), "steps": ds["step"].values.astype(np.int64)}  # fmt: skip


def filter_kd_targets(ds: xr.Dataset, alpha: float = DEFAULT_ALPHA, *, where: str = "cube") -> dict[str, np.ndarray]:
    """The arrays of the export (module docstring), without provenance."""
    _check(ds, where)
    if "logp_class" not in ds:
        return token_targets(ds, alpha, where=where)
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
    settings = {"alpha": alpha, "rule": RULE, "checkpoints": int(len(arrays["steps"])), "examples": int(len(arrays["ids"]))}
    if "targets" in arrays:
        settings["classes"] = int(arrays["targets"].shape[1])
    else:
        settings.update(top_k=int(arrays["token_ids"].shape[-1]), response="chosen", rule_tokens=RULE_TOKENS)
    provenance = json.dumps(cube_provenance(cube_path, ds, "filter-kd", settings), ensure_ascii=False, sort_keys=True)

    def write(tmp: str) -> None:
        buf = io.BytesIO()  # np.savez on a path would append ".npz" to the temporary name
        np.savez_compressed(buf, provenance=np.array(provenance), **arrays)
        Path(tmp).write_bytes(buf.getvalue())

    return write_atomic(out, write, error=ExportError), arrays
