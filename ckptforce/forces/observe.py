"""Observed quantities of a model on teacher-forced rows: log π per token and summed, the argmax response,
entropy, top-1 mass and peakiness.

In: ``logits`` (B, T, V) of B rows and the batch's ``targets`` / ``target_mask`` (B, T) — position t holds
the logits that predict token t+1. Out: an ``Observed`` of (B, T) per-token and (B,) summed tensors, zero
off the response positions. Softmax and reductions run in float32 at least (float64 stays float64).

    log π(y|x)      = Σ_m log π_m(y_m)                      (teacher forcing, DESIGN §1)
    y*_m            = argmax_v π_m(v)                        the teacher-forced argmax along the row
    H_m             = −Σ_v π_m(v) log π_m(v)
    ‖A_m‖_F²        = V‖π_m‖² + V − 2                        peakiness of A = I − 1πᵀ
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable

import torch

from ..numerics import wide as _wide
from .head import SplitLM, at_responses, to_rows

Fn = Callable[[dict, object], torch.Tensor]  # (params, batch) -> logits (B, T, V)


@dataclass
class Observed:
    logp_tok: torch.Tensor  # (B, T) log π_t(target) at response positions, 0 elsewhere
    logp: torch.Tensor  # (B,)   summed over response positions
    argmax_ids: torch.Tensor  # (B, T) teacher-forced argmax token y*_t
    argmax_logp_tok: torch.Tensor  # (B, T) log π_t(y*_t)
    argmax_logp: torch.Tensor  # (B,)
    entropy: torch.Tensor  # (B, T) nats
    top1: torch.Tensor  # (B, T) π_t(y*_t)
    peakiness: torch.Tensor  # (B, T) ‖A_t‖_F²
    logp_full: torch.Tensor | None = None  # (B, V) the whole distribution, classifiers only (T = 1)

    @staticmethod
    def cat(parts: list["Observed"], width: int | None = None) -> "Observed":
        """Rows of several chunks in order; per-token tensors padded to ``width`` (default: the longest T)."""
        out = {}
        for f in fields(Observed):
            values = [getattr(p, f.name) for p in parts]
            if values[0] is None:
                out[f.name] = None
            elif values[0].dim() == 2 and f.name != "logp_full":
                width = width or max(v.shape[1] for v in values)
                out[f.name] = torch.cat([torch.nn.functional.pad(v, (0, width - v.shape[1])) for v in values])
            else:
                out[f.name] = torch.cat(values)
        return Observed(**out)


def observe_logits(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, *, full: bool = False) -> Observed:
    """Observed quantities from logits (B, T, V) at the positions where ``mask`` (B, T) is True."""
    logp_all = torch.log_softmax(_wide(logits), dim=-1)  # (B, T, V)
    m = mask.to(logp_all.dtype)  # (B, T)
    logp_tok = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * m  # (B, T)
    top_logp, argmax_ids = logp_all.max(dim=-1)  # (B, T)
    probs = logp_all.exp()
    vocab = logits.shape[-1]
    entropy = -(probs * logp_all).sum(-1) * m
    peakiness = (vocab * probs.pow(2).sum(-1) + vocab - 2) * m
    return Observed(
        logp_tok=logp_tok,
        logp=logp_tok.sum(-1),
        argmax_ids=argmax_ids * mask.long(),
        argmax_logp_tok=top_logp * m,
        argmax_logp=(top_logp * m).sum(-1),
        entropy=entropy,
        top1=top_logp.exp() * m,
        peakiness=peakiness,
        logp_full=logp_all[:, 0, :] if full else None,
    )


def observe(fn: Fn, params: dict, batch, *, chunk_size: int | None = None, full: bool = False) -> Observed:
    """``observe_logits`` of ``fn(params, batch)``, computed ``chunk_size`` rows at a time without gradients.

    A ``SplitLM`` is observed at the response positions only, its head streamed (``observe_split``)."""
    parts = []
    with torch.no_grad():
        for sub in chunks(batch, chunk_size):
            if isinstance(fn, SplitLM) and not full:
                parts.append(observe_split(fn, params, sub))
            else:
                parts.append(observe_logits(fn(params, sub), sub.targets, sub.target_mask, full=full))
    return Observed.cat(parts)


def observe_split(fn: SplitLM, params: dict, batch) -> Observed:
    """``observe_logits``'s numbers from the hidden states (B, T, H) gathered at the N response positions and the
    head streamed in chunks (``head.head_stats``): nothing of size T × V is formed."""
    mask = batch.target_mask  # (B, T)
    st = fn.stats(params, at_responses(fn.hidden(params, batch), mask), batch.targets[mask])  # (N,) each
    return observed_from_stats(st, mask, vocab=params[fn.weight].shape[0])


def observed_from_stats(st, mask: torch.Tensor, *, vocab: int) -> Observed:
    """An ``Observed`` of rows (B, T) from a streamed head's ``HeadStats`` (N,) at the response positions of ``mask``."""
    logp_tok = to_rows(st.logp, mask)  # (B, T)
    top = to_rows(st.logp_max, mask)
    return Observed(
        logp_tok=logp_tok,
        logp=logp_tok.sum(-1),
        argmax_ids=to_rows(st.argmax, mask),
        argmax_logp_tok=top,
        argmax_logp=top.sum(-1),
        entropy=to_rows(st.entropy, mask),
        top1=to_rows(st.logp_max.exp(), mask),
        peakiness=to_rows(vocab * st.sumsq + vocab - 2, mask),
    )


def chunks(batch, chunk_size: int | None):
    """Sub-batches of at most ``chunk_size`` rows (the whole batch when None)."""
    n = len(batch)
    step = chunk_size or n
    for start in range(0, n, step):
        yield batch if step >= n else batch.select(slice(start, min(start + step, n)))


def pieces(batch, chunk_size: int | None) -> list[tuple[slice, object]]:
    """[(rows of the batch, sub-batch)] for the chunks of ``chunks``: where each chunk's results go."""
    step = chunk_size or len(batch)
    return [(slice(start, min(start + step, len(batch))), sub) for start, sub in zip(range(0, len(batch), step), chunks(batch, chunk_size))]
