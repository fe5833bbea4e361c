"""The report's GRPO section on a hand-made cube with known answers: which groups are lazy or displaced, the NTHR
rank agreement, the harmful tokens quoted as text (escaped in the HTML), and a cube without rollouts."""

from __future__ import annotations

import json

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


# --- ckptforce export grpo-weights: the harmful tokens of the same cube, as token weights ------------------------

ROLLOUTS = (
    '{"objective": "grpo", "batch_size": 2}\n'
    '{"id": "g0", "prompt": "Q0", "completions": [[1, 2], [3], [4], [5]], "rewards": [1, 0, 0, 0], "extra": "kept"}\n'
    '{"id": "g1", "prompt": "Q1", "completions": [[1, 2], [3], [4], [5]], "rewards": [1, 0, 0, 0]}\r\n'
    "\n"
    '{"id": "g2", "prompt": "Q2", "completions": [[1, 2], [3], [4], [5]], "rewards": [1, 0, 0, 0]}\n'
    '{"id": "g3", "prompt": "Q3", "completions": [[1, 2], [3], [4], [5]], "rewards": [1, 1, 1, 1]}'
)


def _saved(tmp_path):
    from ckptforce import cube

    ds = _cube()
    index = {d: ds[d].values.tolist() for d in ("checkpoint", "interval", "source", "own_response", "completion_token")}
    coords = {c: ds[c].values for c in ("step", "step_to", "source_kind", "source_prompt")}
    path = cube.save(cube.build(index=index, coords=coords, data={n: v.values for n, v in ds.data_vars.items()},
                                attrs=cube.provenance(run_dir="/runs/grpo", config={})), tmp_path / "grpo.h5")  # fmt: skip
    train = tmp_path / "rollouts.jsonl"
    train.write_bytes(ROLLOUTS.encode())
    return path, train


def test_grpo_weights_mark_exactly_the_tokens_whose_push_cancels_a_share_of_the_pull(tmp_path):
    from ckptforce.remedies import GrpoWeightsConfig, harmful_tokens, write_grpo_weights
    from ckptforce.remedies.common import file_sha256

    path, train = _saved(tmp_path)
    ds = _cube()
    harm = -ds["token_force"].sum("interval", min_count=1).where(ds["rollout_advantage"] < 0)
    pull = ds["lld_pos"].sum("interval", min_count=1) * (ds["rollout_advantage"] > 0).sum("own_response")
    share = (harm / pull).values
    for min_share in (0.3, 0.6, 5.0):
        want = {(GROUPS[u], int(i), int(k)) for u, i, k in np.argwhere(np.nan_to_num(share, nan=-1) >= min_share)}
        got = {(h["id"], h["completion"], h["position"]) for h in harmful_tokens(ds, GrpoWeightsConfig(min_share=min_share))}
        assert got == want
    assert ("g1", 3, 0) in got and share[1, 3, 0] == pytest.approx(9.0)  # the planted token: 9 nats against a pull of 1
    out, sidecar, records = write_grpo_weights(path, train, tmp_path / "w.jsonl", GrpoWeightsConfig(min_share=0.6, weight=0.25))
    lines = out.read_bytes().split(b"\n")
    raw = ROLLOUTS.encode().split(b"\n")
    weighted = {json.loads(x)["id"]: json.loads(x) for x in lines if x.strip() and b"token_weights" in x}
    hit = {(r["id"], r["completion"], r["position"]) for r in records}
    for gid, row in weighted.items():
        scored = [int((ds["rollout_token"].sel(source=gid, own_response=f"completion_{i}") != "").sum()) for i in range(4)]
        assert [len(w) for w in row["token_weights"]] == scored  # one weight per scored token (the cube's rollout_token)
        for i, w in enumerate(row["token_weights"]):
            assert w == [0.25 if (gid, i, k) in hit else 1.0 for k in range(scored[i])]
        assert {k: v for k, v in row.items() if k != "token_weights"} == json.loads(raw[GROUPS.index(gid) + 1 + (gid >= "g2")])
    untouched = [x for x in lines if x.strip() and b"token_weights" not in x]
    assert all(x in raw for x in untouched) and lines[0] == raw[0] and lines[3] == raw[3]  # header and blank line as they were
    head = json.loads(sidecar.read_text().splitlines()[0])["provenance"]
    assert head["export"] == "grpo-weights" and head["settings"]["weight"] == 0.25 and head["settings"]["train_sha256"] == file_sha256(train)
    assert records[0]["id"] == "g1" and records[0]["token"] == "<script>alert(1)</script>" and records[0]["line"] == 3
    assert train.read_bytes() == ROLLOUTS.encode()


def test_grpo_weights_cli_and_errors(tmp_path):
    from click.testing import CliRunner

    from ckptforce.cli import main

    path, train = _saved(tmp_path)
    ok = CliRunner().invoke(main, ["export", "grpo-weights", str(path), "--train", str(train), "-o", str(tmp_path / "w.jsonl"), "--min-share", "0.6"])
    assert ok.exit_code == 0, ok.output
    assert "harmful tokens in" in ok.output and "g1 completion 3 token 0 '<script>alert(1)</script>': cancels 900% of the pull" in ok.output
    same = CliRunner().invoke(main, ["export", "grpo-weights", str(path), "--train", str(train), "-o", str(train)])
    assert same.exit_code != 0 and "the same file as --train" in same.output
    from ckptforce import cube

    cube.save(cube.build(index={"checkpoint": [0], "source": ["p"]}, data={"ches": [[1.0]]}, coords={"step": [0]}), tmp_path / "dpo.h5")
    bad = CliRunner().invoke(main, ["export", "grpo-weights", str(tmp_path / "dpo.h5"), "--train", str(train), "-o", str(tmp_path / "x.jsonl")])
    assert bad.exit_code != 0 and "no GRPO token forces" in bad.output and "Traceback" not in bad.output
    assert "grpo-weights" in CliRunner().invoke(main, ["export", "--help"]).output
