"""The report's GRPO section on a hand-made cube with known answers: which groups are lazy or displaced, the NTHR
rank agreement, the harmful tokens quoted as text (escaped in the HTML), and a cube without rollouts."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from ckptforce.names import LAZY_SHARE
from ckptforce.ranks import spearman
from ckptforce.report import diagnostics_rl as drl

GROUPS = ["g0", "g1", "g2", "g3"]
WORDS = [["bob", " works", " as", " a", " cook"], ["bob", " lives", " in", " rome", ""], ["bob", " works", " as", " a", " nurse"],
         ["<script>alert(1)</script>", " lives", " in", " oslo", ""]]  # fmt: skip


def _cube() -> xr.Dataset:
    """4 groups × 4 completions, 2 intervals. completion_0 is each group's one correct completion (g3: all rewards
    equal, no gradient). Own update in interval 0 for g0, g1, in interval 1 for g2:
    g0 pull +1.0 push −0.2 (not lazy), g1 +1.0 / −0.7 (lazy: 70 % cancelled), g2 +0.5 / −0.9 (displaced)."""
    g, n, t = len(GROUPS), 4, 5
    rewards = np.array([[1.0, 0, 0, 0]] * 3 + [[1.0, 1, 1, 1]])
    adv = np.where(rewards.std(1, keepdims=True) > 0, (rewards - rewards.mean(1, keepdims=True)) / 0.433, 0.0)
    pos = np.full((2, g), np.nan)
    neg = np.full((2, g), np.nan)
    pos[0, :2], neg[0, :2] = [1.0, 1.0], [-0.2, -0.7]
    pos[1, 2], neg[1, 2] = 0.5, -0.9
    token_force = np.full((2, g, n, t), np.nan)
    nthr = np.full((2, g, n, t), np.nan)
    rng = np.random.default_rng(0)
    for i, u in ((0, 0), (0, 1), (1, 2)):
        token_force[i, u, :, :4] = -rng.uniform(0, 1, (n, 4))
        nthr[i, u, :, :4] = -token_force[i, u, :, :4] + rng.normal(0, 0.3, (n, 4))
    token_force[0, 1, 3, 0] = -9.0  # the most harmful token: the first of g1's completion_3
    tokens = np.array([[WORDS[j % 4] for j in range(n)] for _ in range(g)], dtype=object).astype(str)
    tokens[1, 3] = WORDS[3]
    entropy = np.linspace(0.8, 0.2, 3)[:, None, None] * np.ones((3, g, n))
    top1 = np.linspace(0.5, 0.9, 3)[:, None, None] * np.ones((3, g, n))
    ds = xr.Dataset(
        {
            "lld_pos": (("interval", "source"), pos), "lld_neg": (("interval", "source"), neg), "lld": (("interval", "source"), pos + neg),
            "lld_observed": (("interval", "source"), np.array([[0.5, 0.2, 0.1, 0.0], [0.3, 0.3, -0.4, 0.0]])),
            "token_force": (("interval", "source", "own_response", "completion_token"), token_force),
            "nthr": (("interval", "source", "own_response", "completion_token"), nthr),
            "rollout_token": (("source", "own_response", "completion_token"), tokens),
            "rollout_reward": (("source", "own_response"), rewards), "rollout_advantage": (("source", "own_response"), adv),
            "rollout_entropy": (("checkpoint", "source", "own_response"), entropy), "rollout_top1": (("checkpoint", "source", "own_response"), top1),
        },
        coords={"source": GROUPS, "source_kind": ("source", ["example"] * g), "source_prompt": ("source", [f"Q {u}" for u in GROUPS]),
                "own_response": [f"completion_{j}" for j in range(n)], "completion_token": np.arange(t), "interval": [0, 1],
                "step_to": ("interval", [1, 2]), "checkpoint": [0, 1, 2], "step": ("checkpoint", [0, 1, 2])},
    )  # fmt: skip
    return ds


def test_lazy_and_displaced_groups_and_the_verdict_come_from_the_cube():
    d = drl.lazy_displacement(_cube())
    groups = d.tables["groups"].set_index("group")
    assert list(groups.index) == ["g0", "g1", "g2"]  # g3 had no gradient
    assert list(groups["lazy"]) == [False, True, True] and list(groups["displaced"]) == [False, False, True]
    assert groups.loc["g1", "lazy_share"] == pytest.approx(0.7) and groups.loc["g2", "lazy_share"] == pytest.approx(1.8)
    assert groups.loc["g2", "observed"] == pytest.approx(-0.4) and groups.loc["g0", "observed"] == pytest.approx(0.5)
    assert d.numbers["lazy"] == 2 and d.numbers["displaced"] == 1 and d.numbers["groups"] == 3
    assert d.verdict.startswith(f"2 of 3 groups have lazy correct completions (their negative completions cancel more than {LAZY_SHARE:.0%}")
    assert "laziest: g2 (push −0.90 against pull +0.50 nats, 180% cancelled)" in d.verdict
    assert list(d.tables["intervals"]["lazy"]) == [1, 1] and list(d.tables["intervals"]["groups"]) == [2, 1]
    assert d.numbers["entropy_first"] == pytest.approx(0.8) and d.numbers["top1_last"] == pytest.approx(0.9)
    assert "policy entropy on the rollouts 0.80 → 0.20 nats, top-1 mass 0.50 → 0.90" in d.verdict


def test_nthr_agreement_counts_only_the_negative_completions_tokens():
    ds = _cube()
    d = drl.lazy_displacement(ds)
    tokens = d.tables["tokens"]
    assert set(tokens["completion"]) == {"completion_1", "completion_2", "completion_3"}  # completion_0 is correct
    assert len(tokens) == 3 * 3 * 4  # three groups with a gradient, three negative completions, four tokens each
    negative = ds["rollout_advantage"] < 0
    harm = (-ds["token_force"].sum("interval", min_count=1)).where(negative).values.ravel()
    score = ds["nthr"].mean("interval").where(negative).values.ravel()
    keep = np.isfinite(harm) & np.isfinite(score)
    assert d.numbers["spearman"] == pytest.approx(spearman(score[keep], harm[keep]))
    assert f"Spearman {d.numbers['spearman']:.2f}" in d.verdict
    # scores that rank the harm exactly
    ds["nthr"] = -ds["token_force"]
    assert drl.lazy_displacement(ds).numbers["spearman"] == pytest.approx(1.0)
    assert drl.lazy_displacement(ds).numbers["topk_overlap"] == pytest.approx(1.0)


def test_the_most_harmful_token_is_quoted_in_its_completion_and_escaped_in_the_html():
    from ckptforce.report import html
    from ckptforce.report.context import ReportContext
    from ckptforce.report.sections import SECTIONS, Evaluated

    d = drl.lazy_displacement(_cube())
    top = d.highlights[0]
    assert (top.label, top.before, top.mark, top.after) == ("g1 / completion_3", "", "<script>alert(1)</script>", " lives in oslo")
    assert "lowers the group's correct completions by 9 nats" in top.note and "prompt: Q g1" in top.note
    assert "most harmful token: «<script>alert(1)</script>» in g1 / completion_3" in d.verdict
    assert drl.completion_text(np.array(["bob", "works", ""])) == ["bob", " works"]  # word-level tokens get spaces
    section = next(s for s in SECTIONS if s.key == "lazy_displacement")
    ctx = ReportContext("run", "/run", [0, 1, 2], 0, "0", "now", [], [Evaluated(section, d, None)], [], [], 0, [], "", "")
    page = html.render(ctx)
    assert "<mark>&lt;script&gt;alert(1)&lt;/script&gt;</mark> lives in oslo" in page and "<script>" not in page


def test_the_figure_draws_and_a_cube_without_rollouts_says_what_would_give_the_section():
    from ckptforce.report import figures

    fig = figures.lazy_displacement(drl.lazy_displacement(_cube()))
    assert len(fig.axes) == 4  # three panels and the top-1 twin axis
    d = drl.lazy_displacement(xr.Dataset())
    assert d.missing and "grpo objective" in d.missing
