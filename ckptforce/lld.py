"""Lazy likelihood displacement in GRPO (``--train`` with grpo): what each group's own update does to its own
correct responses, token by token, beside the paper's last-layer score (Deng et al., arXiv 2505.18830).

In: the prepared training rows (the n completions of each group), θ at the interval's ends, the exact
per-example forces of ``attribution.example_forces(own=True)``, the weights w (U, n) and coefficients c (U,).
Out: plain arrays of interval k keyed by cube names (``own_response`` = completion_0 … completion_{n−1},
``completion_token`` = the i-th token of a completion):

    rollout_reward, rollout_advantage    (source, own_response)         r and w's sign carrier Â of each completion
    rollout_logp / _entropy / _top1      (checkpoint, source, own_response)  log π(y_i|x), and the policy's mean
                                                                        entropy and top-1 mass along y_i (exploration)
    self_force[_pos|_neg]                (interval, source, own_response)   the group's own first-order change of
                                                                        each completion (the positive part: its Â > 0
                                                                        completions; the negative: its Â < 0 ones)
    lld, lld_pos, lld_neg                (interval, source)             the same on the correct completions (Â > 0),
                                                                        their mean: LLD = lld_pos + lld_neg
    lld_observed                         (interval, source)             the observed change of those log π over the
                                                                        interval (every update in it, to all orders)
    token_force                          (interval, source, own_response, completion_token)   each token's force on
                                                                        the group's correct completions (summed)
    nthr                                 (interval, source, own_response, completion_token)   forces/nthr.py at θ_k
    nthr_spearman, nthr_topk_overlap     (interval,)                    how NTHR ranks the harm −token_force of the
                                                                        negative completions' tokens

A group the interval did not use, or whose rewards are all equal (no gradient), has NaN forces there.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import ModelBindError
from .forces.attribution import token_forces
from .forces.nthr import nthr_scores
from .forces.objectives import advantages
from .forces.observe import chunks
from .names import NTHR_TOPK
from .ranks import spearman, topk_overlap


def rollout_stats(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row (B,) float64: ``logp`` Σ_k log π(y_k), ``entropy`` and ``top1`` the mean over the response of the
    policy's entropy and largest probability (exploration collapse: both move to 0 and 1)."""
    logq = torch.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    m = mask.double()
    n = m.sum(1).clamp_min(1)
    logp = (logq.gather(-1, targets.unsqueeze(-1)).squeeze(-1) * m).sum(1)
    entropy = (-(logq.exp() * logq).sum(-1) * m).sum(1) / n
    top1 = (logq.max(-1).values.exp() * m).sum(1) / n
    return {"logp": logp.cpu(), "entropy": entropy.cpu(), "top1": top1.cpu()}


def chunked_stats(fn, params: dict, batch, chunk_size: int | None) -> dict[str, torch.Tensor]:
    """``rollout_stats`` of ``fn(params, batch)``, ``chunk_size`` rows at a time without gradients."""
    with torch.no_grad():
        parts = [rollout_stats(fn(params, sub), sub.targets, sub.target_mask) for sub in chunks(batch, chunk_size)]
    return {k: torch.cat([x[k] for x in parts]) for k in parts[0]}


def compact(values: torch.Tensor, mask: torch.Tensor, width: int) -> np.ndarray:
    """(B, T) at response positions -> (B, width): each row's response tokens in order, NaN after its end."""
    out = np.full((values.shape[0], width), np.nan)
    for b in range(values.shape[0]):
        v = values[b][mask[b].bool().cpu()].double().cpu().numpy()
        out[b, : len(v)] = v
    return out


def token_piece(tok, i: int) -> str:
    """A token's text, never "" (the empty string marks a completion's end in the cube): its decoding; else its
    vocabulary entry (SentencePiece's lone '▁' decodes to nothing); else '#id'."""
    if tok is None:
        return f"#{i}"
    text = tok.decode([i])
    if text:
        return text
    convert = getattr(tok, "convert_ids_to_tokens", None)
    raw = convert(i) if callable(convert) else None
    return raw if isinstance(raw, str) and raw else f"#{i}"


def token_texts(pt, width: int) -> np.ndarray:
    """(U, n, width) text of each completion token ("" after its end, never for a token: ``token_piece``)."""
    n_ex, n = len(pt.tset), pt.n_resp
    out = np.full((n_ex * n, width), "", dtype=object)
    tok = pt.tokenizer
    targets, mask = pt.batch.targets.cpu(), pt.batch.target_mask.cpu().bool()
    for b in range(len(pt.batch)):
        ids = targets[b][mask[b]].tolist()
        out[b, : len(ids)] = [token_piece(tok, i) for i in ids]
    return out.reshape(n_ex, n, width).astype(str)


def completion_width(pt) -> int:
    return int(pt.batch.target_mask.sum(1).max())


def lld_part(p, pt, k: int, before: dict, after: dict, weights: torch.Tensor, coeff: torch.Tensor,
             own_pos: torch.Tensor, own_neg: torch.Tensor, pre) -> tuple[dict, list[str]]:  # fmt: skip
    """The arrays of interval k (module docstring) and notes. ``weights`` (U, n); ``own_pos`` / ``own_neg``
    (U, n) from ``example_forces(own=True)``."""
    n_ex, n = len(pt.tset), pt.n_resp
    width = completion_width(pt)
    batch, config = pt.batch, p.config
    stats = [chunked_stats(p.model.logits, theta, batch, p.logits_chunk_size) for theta in (before, after)]
    rewards = torch.tensor([e.rewards for e in pt.tset.examples], dtype=torch.float64)
    adv = pt.advantages if pt.advantages is not None else advantages(rewards)
    correct = adv > 0  # (U, n): the anchors, pulled up by the group's positive advantages
    used = (coeff != 0) & (weights != 0).any(1)
    pos, neg = own_pos.double().clone(), own_neg.double().clone()
    pos[~used], neg[~used] = math.nan, math.nan
    n_correct = correct.sum(1).double()
    anchor_mean = lambda v: torch.where(n_correct > 0, (v.nan_to_num(0) * correct).sum(1) / n_correct.clamp_min(1), math.nan)  # noqa: E731
    lld_pos, lld_neg = anchor_mean(pos), anchor_mean(neg)
    lld_pos[~used], lld_neg[~used] = math.nan, math.nan
    observed = anchor_mean((stats[1]["logp"] - stats[0]["logp"]).view(n_ex, n))
    tok_force = np.full((n_ex, n, width), np.nan)
    nthr = np.full((n_ex, n, width), np.nan)
    notes: list[str] = []
    hidden_ok = True
    for u in range(n_ex):
        anchors = correct[u].nonzero().flatten().tolist()
        if not bool(used[u]) or not anchors or len(anchors) == n:
            continue
        rows = list(range(u * n, (u + 1) * n))
        sub = batch.select(rows)
        f = token_forces(p.model.logits, before, sub, weights[u], anchors, float(coeff[u]), pre, method=config.method, chunk_size=p.logits_chunk_size)
        tok_force[u] = compact(f, sub.target_mask.cpu(), width)
        if hidden_ok:
            try:
                with torch.no_grad():
                    hidden = p.model.last_hidden(before, sub)
                    group_logits = p.model.logits(before, sub)
                nthr[u] = compact(nthr_scores(hidden, group_logits, sub.targets, sub.target_mask, anchors).cpu(), sub.target_mask.cpu(), width)
            except ModelBindError as e:
                hidden_ok = False
                notes.append(f"NTHR not computed: {e}")
    negative = np.broadcast_to((~correct).numpy()[:, :, None], tok_force.shape) & (adv < 0).numpy()[:, :, None]
    pick = negative & np.isfinite(tok_force) & np.isfinite(nthr)
    harm, score = -tok_force[pick], nthr[pick]
    k_top = min(NTHR_TOPK, int(pick.sum()))
    nan2 = np.full((2, n, width), np.nan)
    pad = lambda v: np.concatenate([np.asarray(v), np.full((2, *np.asarray(v).shape[1:]), math.nan)])  # noqa: E731 - momentum / decay
    data = {
        "rollout_reward": pad(rewards.numpy()), "rollout_advantage": pad(adv.numpy()),
        "rollout_logp": np.stack([pad(s["logp"].view(n_ex, n).numpy()) for s in stats]),
        "rollout_entropy": np.stack([pad(s["entropy"].view(n_ex, n).numpy()) for s in stats]),
        "rollout_top1": np.stack([pad(s["top1"].view(n_ex, n).numpy()) for s in stats]),
        "self_force": pad((pos + neg).numpy())[None], "self_force_pos": pad(pos.numpy())[None], "self_force_neg": pad(neg.numpy())[None],
        "lld": pad((lld_pos + lld_neg).numpy())[None], "lld_pos": pad(lld_pos.numpy())[None], "lld_neg": pad(lld_neg.numpy())[None],
        "lld_observed": pad(observed.numpy())[None],
        "token_force": np.concatenate([tok_force, nan2])[None], "nthr": np.concatenate([nthr, nan2])[None],
        "rollout_token": np.concatenate([token_texts(pt, width), np.full((2, n, width), "")]),
        "nthr_spearman": np.array([spearman(score, harm) if len(harm) > 2 else math.nan]),
        "nthr_topk_overlap": np.array([topk_overlap(score, harm, k_top) if k_top else math.nan]),
    }  # fmt: skip
    return data, notes
