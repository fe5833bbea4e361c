"""The top k of the next-token distribution along each response (``analyze --topk K``): what per-token
Filter-KD targets of a language model are made of (``remedies/filter_kd.py``).

    response_topk(fn, θ, batch, k)   ids (B, T, k) int64 and log π (B, T, k) of the k most likely next tokens at
                                     every position, in descending order; −1 / NaN off the response positions

The log-softmax is taken over the whole vocabulary (float64 where the model is half precision, as ``observe``),
``chunk_size`` rows at a time, without gradients: (chunk, T, V) is the largest tensor, as for ``observe``.
"""

from __future__ import annotations

import torch

from .observe import Fn, _wide, chunks


def topk_logits(logits: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, V) logits, (B, T) response mask -> ids (B, T, k), log π (B, T, k): the k largest of log_softmax
    at each position, largest first; −1 and NaN where ``mask`` is False."""
    logp = torch.log_softmax(_wide(logits), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)  # (B, T, k)
    keep = mask.bool().unsqueeze(-1)
    return torch.where(keep, ids, -1), torch.where(keep, values, torch.full_like(values, float("nan")))


def response_topk(fn: Fn, params: dict, batch, k: int, *, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``topk_logits`` of ``fn(params, batch)``, ``chunk_size`` rows at a time; rows padded to the batch's width."""
    ids, logp = [], []
    width = batch.targets.shape[1]
    with torch.no_grad():
        for sub in chunks(batch, chunk_size):
            i, v = topk_logits(fn(params, sub), sub.target_mask, k)
            pad = width - i.shape[1]
            ids.append(torch.nn.functional.pad(i, (0, 0, 0, pad), value=-1))
            logp.append(torch.nn.functional.pad(v, (0, 0, 0, pad), value=float("nan")))
    return torch.cat(ids), torch.cat(logp)
