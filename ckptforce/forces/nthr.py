"""NTHR: the last-layer score of how much each token of a GRPO group's responses drags its correct responses
(Deng et al., "On the Effect of Negative Gradient in Group Relative Deep Reinforcement Optimization",
arXiv 2505.18830, the negative token hidden reward).

In: one group's rows — the last hidden states h (n, T, H), the policy's distributions π (n, T, V) at the same
positions, the sampled tokens y (n, T), the response mask (n, T) — and which rows are correct (the anchors).
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


def nthr_scores(hidden: torch.Tensor, probs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, correct: list[int]) -> torch.Tensor:
    """s (n, T) float64 for one group (see the module docstring); zeros on the response when no row is correct,
    NaN off it. ``hidden`` (n, T, H), ``probs`` (n, T, V), ``targets`` / ``mask`` (n, T)."""
    m = mask.bool()
    out = torch.full(targets.shape, float("nan"), dtype=torch.float64, device=hidden.device)
    h_all, p_all, y_all = hidden[m].double(), probs[m].double(), targets[m]  # (N, H), (N, V), (N,)
    anchors = torch.zeros_like(m)
    anchors[correct] = m[correct]
    if not correct or not bool(anchors.any()):
        out[m] = 0.0
        return out
    h_pos, p_pos, y_pos = hidden[anchors].double(), probs[anchors].double(), targets[anchors]  # (N⁺, ·)
    same = (y_pos[:, None] == y_all[None, :]).double()  # (N⁺, N)
    p_pos_of_y = p_pos[:, y_all]  # π_{j,k'}(y_{i,k})   (N⁺, N)
    p_of_ypos = p_all[:, y_pos].T  # π_{i,k}(y_{j,k'})   (N⁺, N)
    overlap = sum(p_pos[:, v : v + VOCAB_CHUNK] @ p_all[:, v : v + VOCAB_CHUNK].T for v in range(0, p_all.shape[1], VOCAB_CHUNK))
    alpha = same - p_pos_of_y - p_of_ypos + overlap
    out[m] = (alpha * (h_pos @ h_all.T)).sum(0)
    return out
