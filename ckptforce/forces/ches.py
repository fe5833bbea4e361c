"""CHES: the last-layer proxy for likelihood displacement in DPO (Razin et al., "Unintentional Unalignment:
Likelihood Displacement in Direct Preference Optimization", arXiv 2410.08847, §5 and the authors' code
``ches/ches.py`` in princeton-nlp/unintentional-unalignment, which this follows).

In: the last layer's hidden states (B, T, H) of the training rows — row 2u is [x_u ; y⁺_u], row 2u+1 is
[x_u ; y⁻_u] — and their ``target_mask`` (B, T). Out: per pair u, CHES and its length-normalised form (U,).

    h_{x,y<k}  = the last hidden state at the position whose logits score response token y_k (k = 1 … |y|):
                 the last prompt token for y_1, y_{k−1} for y_k — exactly ``target_mask``'s positions
                 (probes.TokenBatch), the vectors the head turns into the logits (``hidden_states[-1]`` of a
                 Hugging Face model: after the final norm)
    S±         = Σ_{k=1}^{|y±|} h_{x,y±<k}                                             (H,)
    CHES       = ⟨S⁺, S⁻⟩ − ‖S⁺‖²                                                      paper eq. (CHES)
    LN-CHES    = ⟨S⁺/|y⁺|, S⁻/|y⁻|⟩ − ‖S⁺/|y⁺|‖²                                      the length-normalised form

EOS convention (the authors' ``ches.py``): the response tokens are those the trainer scored — with TRL's data
that includes the EOS it appends to ``chosen`` / ``rejected`` — and the hidden state *at* the last token (the
EOS, which predicts nothing the loss uses) is left out: ``ches.py`` keeps positions ≥ the last prompt token and
drops the sequence's final position (``[:, :-1]``); its length normalisation divides by that count, |y±|. (The
authors' ``compute_preference_similarity_per_example.py`` keeps the final position too; we follow ``ches.py``,
whose positions are the ones the DPO gradient flows through.)

Why it predicts displacement: DPO's own step on pair u moves log π(y⁺|x) by −c·w·(‖∇ℓ⁺‖² − ⟨∇ℓ⁺, ∇ℓ⁻⟩) (P = I,
w = βσ(−βh)); restricted to the unembedding's gradients, ⟨∇ℓ⁺, ∇ℓ⁻⟩ − ‖∇ℓ⁺‖² is a sum of CHES-like terms, so a
high CHES says the pair's own push on y⁻ drags y⁺ down. ckptforce computes that force exactly through the whole
model (attribution.py: ``ExampleForces.own_pos`` / ``own_neg``); CHES is checked against it on the user's run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .observe import chunks

HiddenFn = Callable[[dict, object], torch.Tensor]  # (params, batch) -> last hidden states (B, T, H)


@dataclass
class Ches:
    ches: torch.Tensor  # (U,) ⟨S⁺, S⁻⟩ − ‖S⁺‖²
    ches_ln: torch.Tensor  # (U,) the same on the means S±/|y±|


def response_sums(hidden: torch.Tensor, target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S (B, H), |y| (B,)): the hidden states summed over each row's response-predicting positions, and their count."""
    m = target_mask.to(hidden.dtype)  # (B, T)
    return torch.einsum("bt,bth->bh", m, hidden), m.sum(1)


def ches_from_sums(sums: torch.Tensor, lengths: torch.Tensor) -> Ches:
    """CHES of pairs from per-row sums ``sums`` (2U, H), rows (chosen, rejected) per pair, and lengths (2U,)."""
    s = sums.view(-1, 2, sums.shape[-1])  # (U, 2, H)
    n = lengths.view(-1, 2).clamp_min(1)  # (U, 2)
    s_pos, s_neg = s[:, 0], s[:, 1]  # (U, H)
    raw = (s_pos * s_neg).sum(-1) - s_pos.pow(2).sum(-1)
    mean_pos, mean_neg = s_pos / n[:, :1], s_neg / n[:, 1:]
    return Ches(raw, (mean_pos * mean_neg).sum(-1) - mean_pos.pow(2).sum(-1))


def pair_ches(hidden_fn: HiddenFn, params: dict, rows, *, chunk_size: int | None = None) -> Ches:
    """CHES of every preference pair of ``rows`` (a TokenBatch with rows (chosen, rejected) per pair, in that
    order) under ``params``: two forwards per pair, no backward; reductions in float64."""
    if len(rows) % 2:
        raise ValueError(f"{len(rows)} rows: CHES needs (chosen, rejected) rows per pair")
    sums, lengths = [], []
    with torch.no_grad():
        for sub in chunks(rows, chunk_size and max(2, chunk_size - chunk_size % 2)):
            s, n = response_sums(hidden_fn(params, sub).double(), sub.target_mask)
            sums.append(s)
            lengths.append(n)
    out = ches_from_sums(torch.cat(sums), torch.cat(lengths))
    return Ches(out.ches.cpu(), out.ches_ln.cpu())
