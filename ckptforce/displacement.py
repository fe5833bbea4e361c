"""Likelihood displacement of preference pairs (``--train`` with dpo / ipo / simpo): each pair's own force on its
own chosen and rejected answers beside CHES, the last-layer proxy of Razin et al. (arXiv 2410.08847).

In: the prepared training rows (chosen, rejected per pair), θ at the interval's ends, and the exact per-example
forces of ``attribution.example_forces(own=True)``. Out: plain arrays of interval k keyed by cube names:

    ches, ches_ln            (checkpoint, source)             CHES and its length-normalised form at θ_k (and at
                                                              θ_{k+1} on the last interval); forces/ches.py
    self_force[_pos|_neg]    (interval, source, own_response) Δ_u(y±_u) = ⟨∇θ log π(y±_u|x_u), δθ_u⟩, the pair's
                                                              own first-order change of its chosen / rejected
    displaces_chosen         (interval, source)               1 where Δ_u(y⁺_u) < 0: its own update lowers chosen
    ches_spearman, ches_ln_spearman, ches_topk_overlap, ches_topk   (interval,)
        how CHES at θ_k ranks the displacement −Δ_u(y⁺_u) (ranks.py); top-k with k = the number of pairs that
        displace chosen (DISPLACE_TOPK when none does)

Momentum and weight decay have no pair: NaN along ``source`` there.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ModelBindError
from .forces.ches import pair_ches
from .names import DISPLACE_TOPK, OWN_RESPONSES
from .ranks import spearman, topk_overlap


def ches_at(p, pt, params: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """(CHES (U,), LN-CHES (U,), note): NaN and a note when the model gives no hidden states."""
    try:
        c = pair_ches(p.model.last_hidden, params, pt.batch, chunk_size=p.chunk_size)
    except ModelBindError as e:
        nan = np.full(len(pt.tset), math.nan)
        return nan, nan, f"CHES not computed: {e}"
    return c.ches.numpy(), c.ches_ln.numpy(), ""


def displacement_part(p, pt, k: int, before: dict, after: dict, own_pos: torch.Tensor, own_neg: torch.Tensor,
                      coeff: torch.Tensor) -> tuple[dict, list[str]]:  # fmt: skip
    """The arrays of interval k (see the module docstring) and notes; ``own_pos`` / ``own_neg`` (U, 2); a pair the
    interval did not use (``coeff`` 0: its 'steps' fall outside) has no own force there (NaN)."""
    n_ex = len(pt.tset)
    assert tuple(pt.tset.examples[0].responses) == OWN_RESPONSES, "preference rows are (chosen, rejected) per pair"
    last = k + 2 == len(p.run.checkpoints)
    ches, ches_ln = np.full((2, n_ex + 2), math.nan), np.full((2, n_ex + 2), math.nan)
    notes = []
    for i, theta in enumerate([before] + ([after] if last else [])):
        ches[i, :n_ex], ches_ln[i, :n_ex], note = ches_at(p, pt, theta)
        notes += [note] if note else []
    unused = (coeff == 0).numpy()
    pos, neg = own_pos.double().numpy().copy(), own_neg.double().numpy().copy()
    pos[unused], neg[unused] = math.nan, math.nan
    pad = lambda v: np.concatenate([v, np.full((2, *v.shape[1:]), math.nan)])[None]  # noqa: E731 - no pair for momentum / decay
    total = pos + neg  # (U, 2)
    displaced = np.where(unused, math.nan, (total[:, 0] < 0).astype(np.float64))
    drop = -total[:, 0]  # how far the pair's own update lowers its chosen answer
    n_disp = int(np.nansum(displaced))
    topk = n_disp if n_disp else min(DISPLACE_TOPK, n_ex)
    data = {
        "ches": ches, "ches_ln": ches_ln,
        "self_force": pad(total), "self_force_pos": pad(pos), "self_force_neg": pad(neg),
        "displaces_chosen": pad(displaced),
        "ches_spearman": np.array([spearman(ches[0, :n_ex], drop)]),
        "ches_ln_spearman": np.array([spearman(ches_ln[0, :n_ex], drop)]),
        "ches_topk_overlap": np.array([topk_overlap(ches[0, :n_ex], drop, topk)]),
        "ches_topk": np.array([topk]),
    }  # fmt: skip
    return data, notes
