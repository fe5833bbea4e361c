"""The report's sections, in reading order: a title, the diagnostic, its figure, and how to read it.

A plain list (``SECTIONS``) is the registry: html.py and pdf.py walk it; adding a diagnostic is one entry.
``evaluate(ds)`` runs every section's diagnostic on a cube and draws the figures of those it can support.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import xarray as xr
from matplotlib.figure import Figure

from ..names import LAZY_SHARE

from . import diagnostics as dg
from . import diagnostics_rl as drl
from . import diagnostics_support as dsup
from . import diagnostics_train as dt
from . import figures as fg


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    diagnostic: Callable[[xr.Dataset], dg.Diagnostic]
    figure: Callable[[dg.Diagnostic], Figure] | None
    how_to_read: str
    grouped: bool = False  # its diagnostic groups probes, and takes ``by`` (--group-by)


SECTIONS: list[Section] = [
    Section("trajectories", "1. Probe log-likelihood over training", dg.trajectories, fg.trajectories,
            "Each line is one response type, averaged over the probes of a split (band: ± one standard error). "
            "A rising line means training made that kind of answer more likely. Compare the chosen answers (greens) "
            "with the rejected ones (reds), answers of other prompts (purples) and random text (greys): SFT should "
            "lift chosen and push random down; DPO lowers nearly everything, rejected fastest."),
    Section("squeezing", "2. Squeezing: the argmax y* against everything else", dg.squeezing, fg.squeezing,
            "y* is the teacher-forced argmax along the chosen answer. When a negative gradient pushes down an answer "
            "the model already finds unlikely, the mass it loses flows to the most likely token: log π(y*) rises "
            "while most response types fall (the squeeze index Δy* − mean Δtypes is large). Left: change of each type "
            "over the run. Middle: how peaked the next-token distribution becomes. Right: each response token's start "
            "log π against its change, coloured as on the left; a rising cloud on the right is 'rich get richer'. A top-1 mass near 1 on every "
            "response type is a collapse onto single tokens, not a squeeze."),
    Section("hallucination", "3. Hallucination: answers leaking across prompts", dg.hallucination, fg.hallucination,
            "The lift compares, on the same prompt, the answer of another trained question (other_trained) with the "
            "answer of a question never trained on (other_untrained). Both are wrong for this prompt; if the trained one "
            "gains more, training taught the model to give trained answers to unrelated questions. Bars above zero are "
            "intervals that leaked; the line is the running total. Right: the lift per probe split (or per --group-by "
            "label).", grouped=True),
    Section("forgetting", "4. Forgetting per probe group", dg.forgetting, fg.forgetting,
            f"Each dot is one probe: how much its chosen answer's log-likelihood changed over the run; the bar marks "
            f"the group mean. F_avg is the mean loss −Δ, F_ratio the share of probes that fell by more than τ = "
            f"{dg.FORGET_TAU} nats (dashed line). Groups come from the probe file's 'group' field (else 'split'), or from the "
            f"label named with --group-by (a 'meta' field or an extra column of the probe file).", grouped=True),
    Section("first_order", "5. First-order validity", dg.first_order, fg.first_order,
            "Every force in this report is a first-order account Δ_lin = A·J·Δθ of the observed change Δ_obs. Left: "
            "points on the diagonal are changes the linear account explains. Right: the remainder ratio per interval; "
            "above 0.5 the account misses most of the change and that interval should be read from the path-integrated "
            "Δ_path (grey, its gap to Δ_obs) or analysed with checkpoints closer together."),
    Section("tensor_split", "Where the change comes from: parameter tensors", dg.tensor_split, fg.tensor_split,
            "The first-order change of each response type, split exactly into the contributions of each parameter "
            "tensor's update and summed over intervals (red: raised log π, blue: lowered it). The tensors are sorted by "
            "their total effect; a layer that dominates one type but not the others is where that behaviour is learnt."),
    Section("force_attribution", "6. Force attribution by training example", dt.force_attribution, fg.force_attribution,
            "Each training example u moved each probe by Δ_u = A·J·δθ_u, with δθ_u = −η·P·g_u its share of the update "
            "(P: the optimizer's preconditioner from the saved state, η: the logged learning rate). Left: the examples "
            "with the largest total force, per probe response type (red raised log π, blue lowered it). Right: the "
            "budget of the first-order change per response type — the examples' pull (responses they train up) and "
            "push (responses they train down, e.g. DPO's rejected), the optimizer's momentum carry-over and weight "
            "decay, and what none of these explains; the bars add up to Δ_lin (diamond). A large 'unexplained' bar "
            "means the training file does not cover what the run trained on, or the interval spans many steps."),
    Section("g_statistics", "7. G statistics of the training signal", dt.g_statistics, fg.g_statistics,
            "G = ∂L/∂z is the 'energy' of each training example. 1 − π(y) and ‖π − e_y‖ fall as the model learns its "
            "trained responses (a fading pull). For preference objectives σ(−βh) is how hard a pair still pushes. The "
            "rank of the tokens pushed down says where the negative gradient lands: at a large rank (a valley of π) "
            "the mass it removes flows to the argmax — the squeezing effect."),
    Section("displacement", "Likelihood displacement of preference pairs", dt.displacement, fg.displacement,
            "A DPO (IPO, SimPO) step on a pair pulls its chosen answer up and pushes its rejected answer down; when the "
            "two are alike, the push drags the chosen answer down too (likelihood displacement, Razin et al., arXiv "
            "2410.08847). For every pair the cube holds its own force on its own answers — the exact first-order change "
            "⟨∇θ log π(y|x), δθ_u⟩ through the whole model, with the optimizer's preconditioner — and CHES = ⟨S⁺, S⁻⟩ − "
            "‖S⁺‖², the paper's cheap score from the last hidden states summed over the chosen (S⁺) and rejected (S⁻) "
            "response positions (two forwards, no gradient; the length-normalised form uses their means). Left: each "
            "pair's CHES against its own force on its chosen answer over the run; red points (below zero) displace "
            "chosen. Right: that force split into its pull and push, for the pairs with the highest CHES. A high "
            "Spearman correlation says CHES can screen a data set for such pairs before training; where it is low, "
            "trust the exact forces. Pairs that displace chosen are candidates to drop or to rewrite: "
            "ckptforce export dpo-filter CUBE --train FILE -o filtered.jsonl writes the training file without them, with a reason "
            "per pair."),
    Section("lazy_displacement", "Lazy likelihood displacement in GRPO", drl.lazy_displacement, fg.lazy_displacement,
            "A GRPO step on a group of completions of one prompt pulls up those with a positive advantage Â (the correct "
            "ones) and pushes down the others. When a negative completion shares tokens and context with the correct "
            "ones, its push drags them down too, and the correct answers rise little or fall: lazy likelihood "
            "displacement (Deng et al., arXiv 2505.18830). For every group the cube holds the exact first-order change "
            "of its correct completions under its own update (through the whole model, with the optimizer's "
            "preconditioner, the loss type's normaliser and the logged gradient clipping), split into the pull of its "
            f"positive completions and the push of its negative ones; a group is lazy when the push cancels more than "
            f"{LAZY_SHARE:.0%} of the pull, displaced when it cancels all of it. Left: that split for the laziest groups. "
            "Middle: every token of the negative completions, its exact harm (−its force on the group's correct "
            "completions) against the paper's NTHR score, a last-layer similarity s⁻ = Σ α⟨h⁺, h⁻⟩ that needs no "
            "gradient; a high Spearman correlation means NTHR is a fair screen for the tokens to down-weight, where it is "
            "low trust the exact forces. Right: the policy's mean entropy and top-1 mass along the rollouts at each "
            "checkpoint; entropy falling toward 0 is exploration collapsing. The marked tokens below are the most "
            "harmful ones, shown in their completions; ckptforce export grpo-weights CUBE --train FILE -o weighted.jsonl writes "
            "the rollouts with those tokens down-weighted (token_weights), with the evidence per token."),
    Section("similarity", "8. Similarity maps", dt.similarity, fg.similarity,
            "K[o, u] = ⟨∇θ log π(y_o|x_o), ∇θ L_u⟩ is the empirical NTK between a probe and a training example: one SGD "
            "step on u changes the probe by about −η·K. The figures show the alignment −cos of the two gradients: red "
            "means training on u pushes the probe up, blue pushes it down. Left: the examples most aligned (either "
            "way) with the probes. Right: the mean alignment of each probe group with the whole training set over "
            "training; trained prompts usually align more than untrained ones. The cube also holds the raw kernel, its "
            "cosine and the TracIn sum Σ_t η_t K_t (negative: the example helped the probe)."),
    Section("feature_adaptation", "9. Feature adaptation", dg.feature_adaptation, fg.feature_adaptation,
            "z is the output of the layer named with --feature-layer for each probe. Left: how far the features moved "
            "from the first checkpoint (‖z − z_0‖, per probe group) and how much they turned (1 − cos). Right: their "
            "norm and their projection on the start (z·z_0). Fine-tuning from a well-fitted head (small energy "
            "E_0 = mean ‖e_y − p_0‖, e.g. after head probing) changes the features little and mostly along z_0; a "
            "random head pushes them far (Ren et al., ICLR 2023)."),
    Section("mutual_support", "Mutual support between training examples", dsup.mutual_support, fg.mutual_support,
            "With the training examples analyzed as probes too (analyze --probes TRAIN --train TRAIN), every example's "
            "force on every other example's own target is in the cube. Examples that share structure push each other "
            "toward their targets (positive forces), and the data that supports itself is learned first: the simplicity "
            "bias of the force analysis (Ren, arXiv 2509.19554). Left: each example's support from the rest of the data "
            "(Σ of the others' forces on it, over the run) against how fast it was learned (its mean log-likelihood gain "
            "per token over the checkpoints). Right: the whole matrix, examples sorted by group — a block-diagonal of red "
            "means examples of a group help each other; blue entries are examples that fight each other.",
            grouped=True),
    Section("learning_paths", "10. Learning paths of classifier examples", dg.learning_paths, fg.learning_paths,
            "Each probe's predicted distribution moves through the simplex as training goes on. The zig-zag score is the "
            "length of that path over the distance it finally covered: 1 is a straight path, large values mean the "
            "prediction went somewhere else first (an example with a wrong or ambiguous label is pulled by its "
            "similar neighbours before its own label wins). Right: probability of the label (solid) and of the "
            "strongest other class (dotted) for the most winding probes; red are probes whose labels were flipped. With "
            "the training examples as probes, ckptforce export filter-kd CUBE -o targets.npz writes the filtered paths "
            "(Filter-KD: q̄ ← α·q̄ + (1 − α)·q_t) as soft targets to distil a fresh student on."),
    Section("update_anatomy", "11. Update anatomy", dg.update_anatomy, fg.update_anatomy,
            "Left: the size of each tensor's update relative to its weights, per interval (log scale; brighter is "
            "larger). Right: the size of the whole update and the mean cosine between consecutive updates of each "
            "tensor: near +1 the optimizer keeps its direction, below 0 it zig-zags."),
]  # fmt: skip


#: How a section whose diagnostic raised is marked (tests look for it).
FAILED = "this diagnostic failed on this cube"


@dataclass
class Evaluated:
    section: Section
    result: dg.Diagnostic
    figure: Figure | None


def evaluate(ds: xr.Dataset, group_by: str | None = None) -> list[Evaluated]:
    """Every section's diagnostic on ``ds``, with its figure when the cube supports it; the sections that group
    probes group them by ``group_by`` (a name of ``diagnostics.groupings``) when it is given."""
    out = []
    for s in SECTIONS:
        try:
            result = s.diagnostic(ds, by=group_by) if s.grouped and group_by else s.diagnostic(ds)
            figure = s.figure(result) if s.figure is not None and not result.missing and result.tables else None
        except Exception as e:  # noqa: BLE001 - one diagnostic's failure must not cost the reader the others
            result, figure = dg.Diagnostic.absent(s.key, f"{FAILED} ({type(e).__name__}: {e}); please report this with the cube"), None
        out.append(Evaluated(s, result, figure))
    return out
