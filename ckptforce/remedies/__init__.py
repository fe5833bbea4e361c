"""Remedies as files: a cube in, a file a trainer reads out, with the evidence and where it came from.

    filter_kd.py    ``ckptforce export filter-kd``: EMA-filtered predictions of each example over the checkpoints
                    (Filter-KD, Ren et al. ICLR 2022) as soft targets keyed by example id (.npz)
    dpo_filter.py   ``ckptforce export dpo-filter``: the preference pairs to drop (likelihood displacement,
                    squeezing; Ren & Sutherland ICLR 2025, Razin et al. arXiv 2410.08847) as a filtered copy of the
                    training file, and a sidecar with a reason per pair
    dpo_extend.py   ``ckptforce export dpo-extend``: the pairs whose rejected answers sit in valleys of π (or squeeze their
                    chosen) as an SFT file of both their answers, to train before DPO (Ren & Sutherland ICLR 2025)
    grpo_weights.py ``ckptforce export grpo-weights``: weights for the negative tokens whose push cancels a share of
                    their group's pull on its correct completions (lazy likelihood displacement; Deng et al. arXiv
                    2505.18830) as a copy of the rollouts file with ``token_weights``, and the evidence per token

Like the cube and the report, nothing here imports torch: numpy and xarray only. Every export records the cube
(path, SHA-256, the run and the command that wrote it) and its own settings (``provenance``).
"""

from __future__ import annotations

from .common import cube_provenance
from .dpo_extend import DpoExtendConfig, dpo_extend, write_dpo_extend
from .dpo_filter import DpoFilterConfig, dpo_filter, write_dpo_filter
from .filter_kd import ema_targets, filter_kd_targets, write_filter_kd
from .grpo_weights import GrpoWeightsConfig, grpo_weights, harmful_tokens, write_grpo_weights

__all__ = ["DpoExtendConfig", "DpoFilterConfig", "dpo_extend", "write_dpo_extend", "GrpoWeightsConfig", "cube_provenance", "dpo_filter", "ema_targets", "filter_kd_targets", "grpo_weights",
           "harmful_tokens", "write_dpo_filter", "write_filter_kd", "write_grpo_weights"]
