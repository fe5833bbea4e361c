"""Rank agreement between a cheap score and an exact answer (numpy only: the tensor stages and the report use it).

    spearman(x, y)          Pearson correlation of the average ranks of x and y (ties share their mean rank),
                            over the entries where both are finite; NaN with fewer than 3 such entries or a
                            constant side
    topk_overlap(s, t, k)   |top-k of s ∩ top-k of t| / k over the finite entries: the share of the k largest
                            by the exact answer t that the score s also puts in its k largest
"""

from __future__ import annotations

import numpy as np


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1 … n of ``x`` (1-D), ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    values, inverse = np.unique(x, return_inverse=True)
    if len(values) < len(x):  # ties: the mean rank of each value
        ranks = np.bincount(inverse, weights=ranks) / np.bincount(inverse)
        ranks = ranks[inverse]
    return ranks


def _finite(x, y) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


def spearman(x, y) -> float:
    """Spearman's rank correlation of ``x`` and ``y`` over the entries where both are finite."""
    x, y = _finite(x, y)
    if len(x) < 3:
        return float("nan")
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / den) if den > 0 else float("nan")


def topk_overlap(score, truth, k: int) -> float:
    """Share of the ``k`` largest entries of ``truth`` that are also among the ``k`` largest of ``score``."""
    score, truth = _finite(score, truth)
    k = min(int(k), len(score))
    if k < 1:
        return float("nan")
    top = lambda v: set(np.argsort(-v, kind="mergesort")[:k].tolist())  # noqa: E731
    return len(top(score) & top(truth)) / k
