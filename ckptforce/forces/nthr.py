"""NTHR: the last-layer score of how much each token of a GRPO group's responses drags its correct responses
(Deng et al., "On the Effect of Negative Gradient in Group Relative Deep Reinforcement Optimization",
arXiv 2505.18830, the negative token hidden reward).

In: one group's rows — the last hidden states h (n, T, H), the policy's logits (n, T, V) at the same positions, the sampled tokens y (n, T), the response mask (n, T) — and which rows are correct (the anchors).
Out: a score per response token of every row (n, T), NaN off the response.

    α_{(j,k'),(i,k)} = ⟨e_{y_{j,k'}} − π_{j,k'},  e_{y_{i,k}} − π_{i,k}⟩          prediction-error similarity
                     = [y_{j,k'} = y_{i,k}] − π_{j,k'}(y_{i,k}) − π_{i,k}(y_{j,k'}) + ⟨π_{j,k'}, π_{i,k}⟩
    s_{i,k}          = Σ_{j correct} Σ_{k'} α_{(j,k'),(i,k)} ⟨h_{j,k'}, h_{i,k}⟩

(positions k are those whose logits score token k: ``target_mask``, as for CHES). s_{i,k} is exactly
⟨∇_U Σ_j log π(y_j), ∇_U log π(y_{i,k})⟩ for the unembedding U alone (∇_U log π_k = (e_{y_k} − π_k) h_kᵀ): the
paper's proxy for the NTK between a token and the correct responses. A negative response's token with s > 0
is pushed down along a direction that also lowers the correct responses — the paper down-weights the tokens
with the largest s. ckptforce computes the same influence through the whole model, with the optimizer's P
(``attribution.token_forces``), and reports how well s ranks it.
"""

from __future__ import annotations

import torch

#: Vocabulary entries taken at once for ⟨π, π'⟩ (memory: anchors × tokens × this many floats).
VOCAB_CHUNK = 8192


def nthr_scores(hidden: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, correct: list[int]) -> torch.Tensor:
    """s (n, T) float64 for one group (see the module docstring); zeros on the response when no row is correct,
    NaN off it. ``hidden`` (n, T, H), ``logits`` (n, T, V) of π, ``targets`` / ``mask`` (n, T). π is formed
    ``VOCAB_CHUNK`` columns at a time from the logits and their log-sum-exp: no (tokens, V) float64 array."""
    m = mask.bool()
    out = torch.full(targets.shape, float("nan"), dtype=torch.float64, device=hidden.device)
    anchors = torch.zeros_like(m)
    anchors[correct] = m[correct]
    if not correct or not bool(anchors.any()):
        out[m] = 0.0
        return out
    z_all, y_all, h_all = logits[m], targets[m], hidden[m].double()  # (N, V), (N,), (N, H)
    z_pos, y_pos, h_pos = logits[anchors], targets[anchors], hidden[anchors].double()  # (N⁺, ·)
    lse_all, lse_pos = (torch.logsumexp(z.double(), -1) for z in (z_all, z_pos))  # (N,), (N⁺,)
    prob = lambda z, lse, cols: torch.exp(z[:, cols].double() - lse[:, None])  # noqa: E731 - π at some columns
    same = (y_pos[:, None] == y_all[None, :]).double()  # (N⁺, N)
    p_pos_of_y = prob(z_pos, lse_pos, y_all)  # π_{j,k'}(y_{i,k})   (N⁺, N)
    p_of_ypos = prob(z_all, lse_all, y_pos).T  # π_{i,k}(y_{j,k'})   (N⁺, N)
    overlap = sum(prob(z_pos, lse_pos, slice(v, v + VOCAB_CHUNK)) @ prob(z_all, lse_all, slice(v, v + VOCAB_CHUNK)).T
                  for v in range(0, z_all.shape[1], VOCAB_CHUNK))  # fmt: skip
    alpha = same - p_pos_of_y - p_of_ypos + overlap
    out[m] = (alpha * (h_pos @ h_all.T)).sum(0)
    return out
