"""GRPO: lazy likelihood displacement, token-level forces and NTHR against their definitions (float64), the loss
types and gradient clipping against the trainer's own steps, and the sample run written by TRL's GRPOTrainer.

* NTHR equals ⟨∇_U Σ_j log π(y_j), ∇_U log π(y_{i,k})⟩ for the unembedding U alone, by autograd.
* The token forces of a group sum, over each sign's completions, to the group's own force on its correct
  completions (``own_self_forces``), and each equals autograd's ⟨∇ℓ_A, δθ_{i,k}⟩ built token by token.
* One GRPO step on a tiny model: the group's own force on its correct completions (LLD) equals their observed
  change to first order: the gap shrinks like η².
* Loss types: each matches TRL's ``_compute_loss`` formula on a step of several groups with the coefficients
  c_u = η / (groups per step); gradient clipping scales the coefficients by min(1, max_norm / grad_norm).
* The sample run (slow): analysed with one checkpoint per step, the training examples' forces explain Δ_lin to a
  few per cent (the trainer's loss type, clipping and groups per step are read right); the report names lazy
  groups and their harmful tokens.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ckptforce.forces.attribution import example_forces, token_forces
from ckptforce.forces.precondition import Preconditioner
from ckptforce.forces.nthr import nthr_scores
from ckptforce.forces.objectives import advantages, loss, response_weights
from ckptforce.training_forces import _coefficients, clip_factors
from test_attribution import _rows, observe_rows
from test_forces import _gpt2, _params, batch  # noqa: F401 - the probe-batch fixture

pytestmark = pytest.mark.filterwarnings("ignore")

REWARDS = torch.tensor([[1.0, 0, 1, 0]])


def _group(tmp_path):
    """One group of 4 completions sharing most tokens, two of them correct (reward 1)."""
    completions = [[3, 4, 5, 6], [3, 4, 7, 6], [3, 4, 5, 6, 2], [8, 4, 7]]
    return _rows(tmp_path, [{"id": "g", "prompt_ids": [1, 2], "responses": {f"completion_{j}": c for j, c in enumerate(completions)}}])


def _weights(model, params, rows, loss_type="grpo"):
    logp = observe_rows(model, params, rows).detach().view(1, -1)
    lengths = rows.target_mask.sum(1).double().view(1, -1)
    return response_weights("grpo", logp, lengths=lengths, rewards=REWARDS, loss_type=loss_type).flatten()


def test_nthr_is_the_unembedding_gradient_inner_product(monkeypatch):
    import ckptforce.forces.nthr as nthr

    monkeypatch.setattr(nthr, "VOCAB_CHUNK", 4)  # three vocabulary chunks of 11
    g = torch.Generator().manual_seed(0)
    n, T, H, V = 3, 5, 6, 11
    h = torch.randn(n, T, H, generator=g, dtype=torch.float64)
    U = torch.randn(V, H, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.randint(0, V, (n, T), generator=g)
    mask = torch.ones(n, T, dtype=torch.bool)
    mask[0, :2] = False  # prompt positions
    mask[2, 4] = False
    logits = h @ U.T  # (n, T, V)
    logq = torch.log_softmax(logits, -1)
    tok_logp = logq.gather(-1, y[..., None]).squeeze(-1)
    anchors = [0, 2]
    (g_a,) = torch.autograd.grad((tok_logp * mask)[anchors].sum(), U, retain_graph=True)
    s = nthr_scores(h, logits.detach(), y, mask, anchors)
    for i in range(n):
        for k in range(T):
            if not mask[i, k]:
                assert math.isnan(float(s[i, k]))
                continue
            (g_tok,) = torch.autograd.grad(tok_logp[i, k], U, retain_graph=True)
            assert float(s[i, k]) == pytest.approx(float((g_a * g_tok).sum()), rel=1e-10, abs=1e-12)


def test_token_forces_sum_to_the_groups_own_force_and_equal_autograd(tmp_path, batch):  # noqa: F811
    model = _gpt2()
    params = _params(model)
    rows = _group(tmp_path)
    w = _weights(model, params, rows)
    g = torch.Generator().manual_seed(1)
    scale = {n: 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}  # an Adam-like P
    pre = Preconditioner("adam", scale, None, None)
    c = 0.03
    anchors = [j for j in range(4) if float(advantages(REWARDS)[0, j]) > 0]
    assert anchors == [0, 2]
    F = token_forces(model.logits, params, rows, w, anchors, c, pre)  # (4, T)
    own = example_forces(model.logits, params, batch, rows, [0] * 4, w, torch.tensor([c], dtype=torch.float64), pre, own=True)
    for part, sign in ((own.own_pos, 1), (own.own_neg, -1)):
        rows_of_sign = [i for i in range(4) if float(w[i]) * sign > 0]
        assert float(F[rows_of_sign].sum()) == pytest.approx(float(part[0, anchors].sum()), rel=1e-9, abs=1e-12)
    # one token by autograd: δθ_{i,k} = c w_i P ∇ log π(y_{i,k}), against ∇ Σ_anchors log π
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    grad_a = torch.autograd.grad(observe_rows(model, leaves, rows.select(anchors)).sum(), list(leaves.values()))
    logits = model.logits(leaves, rows.select([1]))
    positions = rows.select([1]).target_mask[0].nonzero().flatten()
    for k in positions.tolist():
        tok = torch.log_softmax(logits[0, k], -1)[rows.select([1]).targets[0, k]]
        grad_t = torch.autograd.grad(tok, list(leaves.values()), retain_graph=True)
        want = sum((ga * c * float(w[1]) * scale[n] * gt).sum() for n, ga, gt in zip(leaves, grad_a, grad_t))
        assert float(F[1, k]) == pytest.approx(float(want), rel=1e-9, abs=1e-12)
    assert F[1].abs().sum() > 0 and (F[1] < 0).any()  # a wrong completion's tokens drag the correct ones


def test_lld_of_one_step_is_the_first_order_change_of_the_correct_completions(tmp_path, batch):  # noqa: F811
    model = _gpt2()
    params = _params(model)
    rows = _group(tmp_path)
    w = _weights(model, params, rows)
    pre = Preconditioner("sgd", None, None, None)
    anchors = [0, 2]
    before = observe_rows(model, params, rows.select(anchors)).sum()
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    grads = torch.autograd.grad(-(w * observe_rows(model, leaves, rows)).sum(), list(leaves.values()))
    gaps = []
    for eta in (4e-3, 2e-3):
        forces = example_forces(model.logits, params, batch, rows, [0] * 4, w, torch.tensor([eta], dtype=torch.float64), pre, own=True)
        lld = float((forces.own_pos + forces.own_neg)[0, anchors].sum())
        moved = {n: p - eta * g for (n, p), g in zip(params.items(), grads)}
        observed = float(observe_rows(model, moved, rows.select(anchors)).sum() - before)
        assert lld == pytest.approx(observed, rel=0.05)
        gaps.append(abs(lld - observed))
    assert gaps[1] < gaps[0] / 3  # second order: halving η quarters the gap


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "bnpo", "dr_grpo"])
def test_loss_types_match_trls_step_over_several_groups(loss_type):
    """TRL (GRPOTrainer._compute_loss, on-policy, β = 0): per-token loss −Â_i log π_{i,k}, then grpo: mean over the
    batch's completions of their token means; dapo / bnpo: Σ over the step's tokens / the step's tokens; dr_grpo:
    Σ / (completions × max_completion_length). Ours: Σ_u L_u / (groups per step), L_u from objectives.loss."""
    g = torch.Generator().manual_seed(2)
    groups, n, L = 3, 4, 7
    lengths = torch.randint(2, L + 1, (groups, n), generator=g).double()
    tok = -torch.rand(groups, n, L, generator=g, dtype=torch.float64)  # per-token log π
    mask = (torch.arange(L)[None, None, :] < lengths[..., None]).double()
    rewards = torch.randint(0, 2, (groups, n), generator=g).double()
    rewards[0, 0], rewards[0, 1] = 1.0, 0.0
    adv = advantages(rewards)
    per_token = -adv[..., None] * tok * mask
    trl = {"grpo": (per_token.sum(-1) / lengths).mean(), "dapo": per_token.sum() / mask.sum(), "bnpo": per_token.sum() / mask.sum(),
           "dr_grpo": per_token.sum() / (groups * n * L)}[loss_type]  # fmt: skip
    logp = (tok * mask).sum(-1)
    norm = torch.full((groups,), float(lengths.sum()) / groups, dtype=torch.float64)  # the step's tokens / its groups (training_forces)
    ours = loss("grpo", logp, lengths=lengths, rewards=rewards, loss_type=loss_type, token_norm=norm, max_completion_length=L).sum() / groups
    assert float(ours) == pytest.approx(float(trl), rel=1e-12)


def test_gradient_clipping_scales_each_steps_examples():
    log = [{"step": 1, "grad_norm": 0.5}, {"step": 2, "grad_norm": 4.0}, {"step": 3, "loss": 1.0}, {"step": 9, "grad_norm": 2.0}]
    factors, mean, note = clip_factors(log, 1.0, 0, 3)
    assert factors == {1: 1.0, 2: 0.25} and mean == pytest.approx(0.625) and "1 of 2" in note
    assert clip_factors(log, 0.0, 0, 3) == ({}, 1.0, "")

    class Set:
        has_steps = True
        examples = [type("E", (), {"steps": [1]}), type("E", (), {"steps": [2, 3]})]

        def __len__(self):
            return 2

    pt = type("PT", (), {"tset": Set(), "batch_size": 2})
    c = _coefficients(pt, 0.1, 0, 3, 3, (factors, mean))
    np.testing.assert_allclose(c.numpy(), [0.1 * 1.0 / 2, 0.1 * (0.25 + 0.625) / 2])


def test_advantages_scale_as_trls_scale_rewards():
    """TRL (GRPOTrainer._generate_and_score_completions, sum_then_normalize): Â = r − mean_group r, divided by
    std + 1e-4 with std the group's ('group'), the whole step's ('batch'), or not at all ('none'); std Bessel-corrected."""
    r = torch.tensor([[1.0, 0, 0, 1], [0, 0, 0, 1], [1, 1, 1, 1]], dtype=torch.float64)
    centred = r - r.mean(1, keepdim=True)
    torch.testing.assert_close(advantages(r, "none"), centred)
    torch.testing.assert_close(advantages(r), centred / (r.std(1, keepdim=True) + 1e-4))
    steps = [1, 1, 2]  # groups 0 and 1 in one optimizer step, group 2 alone
    want = torch.stack([centred[0] / (r[:2].std() + 1e-4), centred[1] / (r[:2].std() + 1e-4), centred[2] / (r[2].std() + 1e-4)])
    torch.testing.assert_close(advantages(r, "batch", steps), want)


def test_scale_rewards_are_read_from_the_header(tmp_path):
    from ckptforce.train_examples import TrainFileError, load_training_set

    rows = [{"id": "g", "prompt_ids": [1], "completions": [[2], [3], [4]], "rewards": [1.0, 0.0, 0.0], "steps": [1]}]
    for scale, want in (("none", "none"), (False, "none"), (True, "group"), ("batch", "batch")):
        path = tmp_path / "t.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in [{"objective": "grpo", "scale_rewards": scale}, *rows]))
        assert load_training_set(path).scale_rewards == want
    path.write_text("".join(json.dumps(x) + "\n" for x in [{"objective": "grpo", "scale_rewards": "batch"}, {k: v for k, v in rows[0].items() if k != "steps"}]))
    with pytest.raises(TrainFileError, match="give every group its 'steps'"):
        load_training_set(path)
