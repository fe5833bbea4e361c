"""G for each training objective (DESIGN §1): how hard, and which way, a training example pushes its responses.

Every objective here is a function of the policy's summed log-probabilities of the example's responses
(and, for some, a reference model's), so its gradient w.r.t. the logits of response r is

    G_r = w_r · R(y_r),   R(y)_l = π_l − e_{y_l}   (the SFT residual at response position l)
    w_r = −∂L/∂ log π(y_r|x)                         (a scalar per response: ``response_weights``)

w_r > 0 pulls y_r up (a positive force), w_r < 0 pushes it down (a *negative gradient*). By linearity the
force splits exactly into its positive and negative parts. Knowledge distillation is the exception: its G is
π − p_teacher at every position, handled by ``kd_loss`` directly.

| objective | L (per example)                                 | w (by response)                              |
|-----------|-------------------------------------------------|----------------------------------------------|
| sft / ce  | −log π(y)/|y|                                    | 1/|y|                                         |
| unlearn   | +log π(y)/|y|  (gradient ascent)                 | −1/|y|                                        |
| dpo       | −log σ(β h), h = (ℓ⁺ − ℓ⁺_ref) − (ℓ⁻ − ℓ⁻_ref)    | ±β σ(−βh)                                     |
| ipo       | (h − 1/(2β))², h on token-averaged ℓ/|y| (TRL)    | ±2(1/(2β) − h)/|y±|                           |
| simpo     | −log σ(β(ℓ⁺/|y⁺| − ℓ⁻/|y⁻|) − γ)                 | ±(β/|y±|) σ(−(β(ℓ⁺/|y⁺| − ℓ⁻/|y⁻|) − γ))       |
| grpo      | −Σ_i Â_i ℓ_i / (n|y_i|), Â = (r − r̄)/(s_r + 1e-4) | Â_i/(n|y_i|)       TRL ``loss_type="grpo"``    |
|  ″ dapo   | −Σ_i Â_i ℓ_i / N_u                                | Â_i/N_u            ``"dapo"`` (TRL's default), ``"bnpo"`` |
|  ″ dr_grpo| −Σ_i Â_i ℓ_i / (n·L_max)                          | Â_i/(n·L_max)      ``"dr_grpo"``                |

(ℓ = log π(y|x) summed over the response tokens.) GRPO's loss types differ only in what divides the summed
token losses (TRL ``GRPOTrainer._compute_loss``): each completion's own length (``grpo``, then the mean over the
batch's completions), the tokens of the whole step (``dapo`` / ``bnpo``: N_u is the group's share of them, the
step's completion tokens / its groups — ``token_norm``), or n × ``max_completion_length`` (``dr_grpo``). With c_u =
η × uses / (groups per step) each is exactly the trainer's step. The pure functions take tensors of shape (U, R): U
training examples, R responses each (1 for sft/unlearn/kd, 2 = (chosen, rejected) for preferences, n for grpo).
"""

from __future__ import annotations

import torch

OBJECTIVES = ("sft", "ce", "unlearn", "dpo", "ipo", "simpo", "grpo", "kd")
PREFERENCE = ("dpo", "ipo", "simpo")
NEEDS_REFERENCE = ("dpo", "ipo", "kd")
#: TRL's defaults: DPOConfig.beta (dpo, ipo), CPOConfig.beta and CPOConfig.simpo_gamma (SimPO's margin γ).
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 0.1}
DEFAULT_SIMPO_GAMMA = 0.5
#: TRL's GRPO adds this to the (Bessel-corrected) standard deviation of a group's rewards.
GRPO_STD_EPS = 1e-4
#: GRPOConfig.loss_type values whose policy term this module knows, and TRL's default.
GRPO_LOSS_TYPES = ("grpo", "sapo", "dapo", "bnpo", "cispo", "dr_grpo")
GRPO_DEFAULT_LOSS = "dapo"


def margin(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """h = (ℓ⁺ − ℓ⁺_ref) − (ℓ⁻ − ℓ⁻_ref) for (U, 2) log-probabilities (chosen, rejected) -> (U,)."""
    ratio = logp - ref_logp
    return ratio[:, 0] - ratio[:, 1]


def loss(objective: str, logp: torch.Tensor, *, ref_logp=None, lengths=None, rewards=None, beta=None, gamma=None,
         advantage=None, loss_type=None, token_norm=None, max_completion_length=None) -> torch.Tensor:  # fmt: skip
    """The per-example loss L (U,) of ``objective`` from summed log-probabilities ``logp`` (U, R).

    ``lengths`` (U, R) response lengths in tokens; ``rewards`` (U, R) for grpo; ``ref_logp`` (U, R) for dpo/ipo.
    GRPO: ``advantage`` (U, R) when the trainer logged it (else from ``rewards``), ``loss_type`` (TRL's, default
    dapo), ``token_norm`` (U,) N_u for dapo / bnpo (default: the group's own completion tokens),
    ``max_completion_length`` for dr_grpo.
    Differentiable in ``logp``: ``response_weights`` is −∂L/∂logp, and the tests check it is.
    """
    beta = DEFAULT_BETA.get(objective, 0.1) if beta is None else beta
    if objective in ("sft", "ce"):
        return -(logp / lengths).sum(1)
    if objective == "unlearn":
        return (logp / lengths).sum(1)
    if objective == "dpo":
        return -torch.nn.functional.logsigmoid(beta * margin(logp, ref_logp))
    if objective == "ipo":  # TRL's IPO uses log-probabilities averaged over the response tokens
        return (margin(logp / lengths, ref_logp / lengths) - 1 / (2 * beta)) ** 2
    if objective == "simpo":
        gamma = DEFAULT_SIMPO_GAMMA if gamma is None else gamma
        norm = logp / lengths
        return -torch.nn.functional.logsigmoid(beta * (norm[:, 0] - norm[:, 1]) - gamma)
    if objective == "grpo":
        adv = advantages(rewards) if advantage is None else advantage
        kind = loss_type or GRPO_DEFAULT_LOSS
        if kind in ("grpo", "sapo"):
            return -(adv * logp / lengths).sum(1) / logp.shape[1]
        if kind in ("dapo", "bnpo", "cispo"):
            norm = lengths.sum(1) if token_norm is None else token_norm
            return -(adv * logp).sum(1) / norm
        if kind == "dr_grpo":
            if not max_completion_length:
                raise ValueError("loss_type dr_grpo divides by max_completion_length: give it")
            return -(adv * logp).sum(1) / (logp.shape[1] * max_completion_length)
        raise ValueError(f"GRPO loss_type {kind!r} is not known; known: {', '.join(GRPO_LOSS_TYPES)}")
    raise ValueError(f"objective {objective!r}: no closed-form weights; known: {', '.join(OBJECTIVES)}")


def advantages(rewards: torch.Tensor, scale: str = "group", batches: list[int] | None = None) -> torch.Tensor:
    """Advantages Â = (r − mean_group r)/(std + 1e-4) per example (U, n), as TRL's GRPO computes them
    (Bessel-corrected std): ``scale`` "group" the std within each group (0 for a group of one), "batch" the std of
    every reward of the optimizer step (``batches``: each group's step), "none" no division (Dr. GRPO). With
    binary rewards and success rate p, "group" is close to Â⁺ = (1−p)/√(p(1−p)), Â⁻ = −p/√(p(1−p)) of DESIGN §1
    (which uses the population std).
    """
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(1, keepdim=True)
    if scale == "none":
        return centred
    if scale == "batch":
        if batches is None:
            raise ValueError("scale_rewards 'batch' needs each group's optimizer step")
        std = torch.stack([rewards[[i for i, b in enumerate(batches) if b == step]].flatten().std(unbiased=True) for step in batches])
        return centred / (std[:, None].nan_to_num(0.0) + GRPO_STD_EPS)
    return centred / (rewards.std(1, unbiased=True, keepdim=True) + GRPO_STD_EPS)


def response_weights(objective: str, logp: torch.Tensor, **kw) -> torch.Tensor:
    """w = −∂L/∂ℓ (U, R), the scalar of G_r = w_r R(y_r), by autograd of ``loss`` (exact; tested)."""
    with torch.enable_grad():
        leaf = logp.detach().double().requires_grad_(True)
        extra = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
        (grad,) = torch.autograd.grad(loss(objective, leaf, **extra).sum(), leaf)
    return (-grad).to(logp.dtype)


def residual(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R = π − e_y at response positions, 0 elsewhere: (B, T, V) from logits (B, T, V), targets/mask (B, T)."""
    probs = torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1)
    onehot = torch.nn.functional.one_hot(targets, probs.shape[-1]).to(probs.dtype)
    return (probs - onehot) * mask.unsqueeze(-1).to(probs.dtype)


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_l CE(p_teacher,l, π_l) / |y| per row (B,): its gradient w.r.t. the logits is G = (π − p_teacher)/|y|."""
    logq = torch.log_softmax(logits, -1)
    p = torch.softmax(teacher_logits, -1)
    per_tok = -(p * logq).sum(-1) * mask.to(logq.dtype)  # (B, T)
    return per_tok.sum(1) / mask.sum(1).clamp_min(1).to(logq.dtype)


def g_statistics(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row (B,): ``gap`` mean_l ‖π_l − e_{y_l}‖₂, ``one_minus_p`` mean_l (1 − π_l(y_l)), and ``rank`` the mean
    rank of y_l under π_l (1 = the argmax; a large rank on a pushed-down response is a 'valley': squeezing risk)."""
    logits = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    probs = torch.softmax(logits, -1)  # (B, T, V)
    m = mask.to(probs.dtype)
    n = m.sum(1).clamp_min(1)
    p_y = probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)
    gap = torch.sqrt((probs**2).sum(-1) - 2 * p_y + 1)  # ‖π − e_y‖ without forming e_y
    rank = (logits > logits.gather(-1, targets.unsqueeze(-1))).sum(-1).to(probs.dtype) + 1  # (B, T)
    return {"gap": (gap * m).sum(1) / n, "one_minus_p": ((1 - p_y) * m).sum(1) / n, "rank": (rank * m).sum(1) / n}
