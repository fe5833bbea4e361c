"""Diagnostics of a GRPO run (``--train`` with grpo rollouts): lazy likelihood displacement and the negative
tokens that cause it (Deng et al., arXiv 2505.18830), and the exploration of the policy on its own rollouts.

The cube in (``ckptforce/lld.py`` wrote the variables), tables, numbers, highlights and a verdict out; the
same conventions as ``diagnostics.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..names import LAZY_SHARE, NTHR_TOPK
from ..ranks import spearman, topk_overlap
from .diagnostics import Diagnostic, Highlight, _fmt, _needs
from .diagnostics_train import _corr

#: Harmful tokens quoted in the report (every token's force stays in the cube).
HARMFUL_SHOWN = 8


def _groups(ds: xr.Dataset) -> list[str]:
    kind = ds["source_kind"].values.astype(str) if "source_kind" in ds.coords else np.full(ds.sizes["source"], "example")
    return [str(s) for s in ds["source"].values[kind == "example"]]


def completion_text(tokens: np.ndarray) -> list[str]:
    """A completion's tokens as decoded one by one ("" past its end), the way they join into text: as they are
    when the tokenizer keeps the spaces in its tokens (BPE: ' works'), else with a space between them (words)."""
    kept = [str(t) for t in tokens if str(t) != ""]
    spaced = any(t[:1].isspace() for t in kept)
    return kept if spaced else [t if i == 0 else " " + t for i, t in enumerate(kept)]


def lazy_flags(pos: np.ndarray, neg: np.ndarray, total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The share of the pull that the push cancels, −neg / pos (NaN where pos ≤ 0), and whether the correct
    completions are lazy: share > LAZY_SHARE or total ≤ 0 (False where total is NaN: no gradient)."""
    share = np.where(pos > 0, -neg / np.where(pos > 0, pos, 1.0), np.nan)
    with np.errstate(invalid="ignore"):
        return share, (total <= 0) | (share > LAZY_SHARE)


def lazy_displacement(ds: xr.Dataset) -> Diagnostic:
    """Lazy likelihood displacement per GRPO group, its harmful tokens, and the policy's exploration.

    Per group (its own update, summed over the intervals that used it): ``lld_pos`` the first-order change of its
    correct completions (Â > 0) from its positive-advantage completions, ``lld_neg`` from its negative ones,
    ``lld`` = their sum. The group is *lazy* when the negative part cancels more than ``LAZY_SHARE`` of the pull
    (−lld_neg / lld_pos > LAZY_SHARE) or the total is ≤ 0 (*displaced*: its own update lowers its correct answers).

    Tables: ``groups`` (one row per group with a gradient: prompt, correct count, mean reward, lld_pos, lld_neg, lld,
    lazy_share, lazy, displaced, observed — the change of those log π over its interval, every update to all
    orders), ``tokens`` (each token of a negative completion: group, completion, position, token, harm = −its force
    on the group's correct completions, nthr, their ranks), ``intervals`` (groups, lazy, Spearman and top-k overlap of
    NTHR against the harm, from the cube) and ``exploration`` (per checkpoint: mean entropy and top-1 mass of the
    policy along the rollouts, correct vs other). Highlights: the most harmful tokens in their completions.
    """
    need = ["lld", "lld_pos", "lld_neg", "token_force", "rollout_advantage", "rollout_token"]
    why = "needs GRPO rollouts with rewards (analyze --train FILE with a grpo objective: prompt, completions, rewards)"
    if (d := _needs(ds, "lazy_displacement", need, why)) is not None:
        return d
    groups = _groups(ds)
    run = lambda name: ds[name].sel(source=groups).sum("interval", min_count=1)  # noqa: E731 - Σ over the intervals that used it
    adv = ds["rollout_advantage"].sel(source=groups)
    used = run("lld").notnull().values
    pos, neg, total = (run(n).values for n in ("lld_pos", "lld_neg", "lld"))
    observed = ds["lld_observed"].sel(source=groups).where(ds["lld"].sel(source=groups).notnull()).sum("interval", min_count=1).values
    share, lazy = lazy_flags(pos, neg, total)
    displaced = total <= 0
    prompt = ds["source_prompt"].sel(source=groups).values.astype(str) if "source_prompt" in ds.coords else np.full(len(groups), "")
    reward = ds["rollout_reward"].sel(source=groups).mean("own_response").values if "rollout_reward" in ds else np.full(len(groups), np.nan)
    table = pd.DataFrame({"group": groups, "prompt": prompt, "correct": (adv > 0).sum("own_response").values, "reward": reward,
                          "lld_pos": pos, "lld_neg": neg, "lld": total, "lazy_share": share, "lazy": lazy, "displaced": displaced,
                          "observed": observed})[used].reset_index(drop=True)  # fmt: skip
    tokens = _token_table(ds, groups)
    per_group = [ds[n].sel(source=groups).values for n in ("lld_pos", "lld_neg", "lld")]  # (interval, group)
    per_iv = pd.DataFrame({"step_to": ds["step_to"].values, "groups": np.isfinite(per_group[2]).sum(1),
                           "lazy": lazy_flags(*per_group)[1].sum(1)})  # fmt: skip
    for name in ("nthr_spearman", "nthr_topk_overlap"):
        if name in ds:
            per_iv[name] = ds[name].values
    exploration = _exploration(ds, groups, adv)
    scored = tokens.dropna(subset=["nthr"])
    k = min(NTHR_TOPK, len(scored))
    numbers = {"groups": float(len(table)), "lazy": float(table["lazy"].sum()), "displaced": float(table["displaced"].sum()),
               "spearman": spearman(scored["nthr"].to_numpy(), scored["harm"].to_numpy()) if len(scored) > 2 else float("nan"),
               "topk": float(k), "topk_overlap": topk_overlap(scored["nthr"].to_numpy(), scored["harm"].to_numpy(), k) if k else float("nan")}  # fmt: skip
    if len(exploration):
        first, last = exploration.iloc[0], exploration.iloc[-1]
        numbers.update({"entropy_first": float(first["entropy"]), "entropy_last": float(last["entropy"]),
                        "top1_first": float(first["top1"]), "top1_last": float(last["top1"])})  # fmt: skip
    highlights = _harmful(ds, tokens)
    verdict = _verdict(table, numbers, highlights)
    tables = {"groups": table, "tokens": tokens, "intervals": per_iv, "exploration": exploration}
    return Diagnostic("lazy_displacement", tables, numbers, verdict, highlights=highlights)


def _token_table(ds: xr.Dataset, groups: list[str]) -> pd.DataFrame:
    """One row per token of a negative-advantage completion with a finite force (the harm it does, summed over
    the intervals that used its group), its NTHR score (mean over them) and both ranks (1 = most harmful)."""
    negative = ds["rollout_advantage"].sel(source=groups) < 0
    harm = -ds["token_force"].sel(source=groups).sum("interval", min_count=1).where(negative)
    nthr = ds["nthr"].sel(source=groups).mean("interval", skipna=True) if "nthr" in ds else xr.full_like(harm, np.nan)
    frame = xr.Dataset({"harm": harm, "nthr": nthr, "token": ds["rollout_token"].sel(source=groups)}).to_dataframe().reset_index()
    frame = frame[np.isfinite(frame["harm"])].rename(columns={"source": "group", "own_response": "completion", "completion_token": "position"})
    frame = frame[["group", "completion", "position", "token", "harm", "nthr"]].sort_values("harm", ascending=False).reset_index(drop=True)
    frame["harm_rank"] = frame["harm"].rank(ascending=False, method="min")
    frame["nthr_rank"] = frame["nthr"].rank(ascending=False, method="min")
    return frame


def _exploration(ds: xr.Dataset, groups: list[str], adv: xr.DataArray) -> pd.DataFrame:
    """Per checkpoint, the policy's mean entropy and top-1 mass along every rollout, and on the correct ones."""
    if "rollout_entropy" not in ds:
        return pd.DataFrame(columns=["step", "entropy", "top1", "entropy_correct", "top1_correct"])
    ent, top = (ds[n].sel(source=groups) for n in ("rollout_entropy", "rollout_top1"))
    correct = adv > 0
    mean = lambda v: v.mean(["source", "own_response"], skipna=True).values  # noqa: E731
    return pd.DataFrame({"step": ds["step"].values, "entropy": mean(ent), "top1": mean(top),
                         "entropy_correct": mean(ent.where(correct)), "top1_correct": mean(top.where(correct))})  # fmt: skip


def _harmful(ds: xr.Dataset, tokens: pd.DataFrame) -> list[Highlight]:
    """The most harmful tokens (harm > 0) in their completions, with the group's prompt."""
    out = []
    prompts = dict(zip(ds["source"].values.astype(str), ds["source_prompt"].values.astype(str))) if "source_prompt" in ds.coords else {}
    for _, row in tokens[tokens["harm"] > 0].head(HARMFUL_SHOWN).iterrows():
        pieces = completion_text(ds["rollout_token"].sel(source=row["group"], own_response=row["completion"]).values)
        at = int(row["position"])
        nthr = f", NTHR rank {int(row['nthr_rank'])}" if np.isfinite(row["nthr"]) else ""
        label = f"{row['group']} / {row['completion']}"
        note = f"lowers the group's correct completions by {row['harm']:.3g} nats{nthr}"
        if prompts.get(row["group"]):
            note += f"; prompt: {prompts[row['group']]}"
        mark = pieces[at] if at < len(pieces) else str(row["token"])
        space = mark[: len(mark) - len(mark.lstrip())]
        out.append(Highlight(label, "".join(pieces[:at]) + space, mark.lstrip(), "".join(pieces[at + 1 :]), note))
    return out


def _verdict(table: pd.DataFrame, numbers: dict[str, float], highlights: list[Highlight]) -> str:
    n, lazy, displaced = len(table), int(numbers["lazy"]), int(numbers["displaced"])
    if not n:
        return "no group had a gradient in the analysed intervals (every group's rewards were equal, or no interval used them)."
    text = (f"{lazy} of {n} groups have lazy correct completions (their negative completions cancel more than "
            f"{LAZY_SHARE:.0%} of the pull of their positive ones), {displaced} of them displaced (the group's own update lowers its correct "
            f"completions)")  # fmt: skip
    if lazy:
        worst = table.sort_values("lazy_share", ascending=False, na_position="first").iloc[0]
        share = "all" if not np.isfinite(worst["lazy_share"]) else f"{worst['lazy_share']:.0%}"
        text += f"; laziest: {worst['group']} (push {_fmt(worst['lld_neg'])} against pull {_fmt(worst['lld_pos'])} nats, {share} cancelled)"
    text += (f"; NTHR ranks the harm of the negative tokens with Spearman {_corr(numbers['spearman'])} and finds "
             f"{numbers['topk_overlap']:.0%} of the {int(numbers['topk'])} most harmful" if numbers["topk"] else "; NTHR not in this cube")
    if highlights:
        text += f"; most harmful token: «{highlights[0].mark.strip()}» in {highlights[0].label}"
    if "entropy_first" in numbers:
        text += (f"; policy entropy on the rollouts {numbers['entropy_first']:.2f} → {numbers['entropy_last']:.2f} nats, "
                 f"top-1 mass {numbers['top1_first']:.2f} → {numbers['top1_last']:.2f}")  # fmt: skip
    return text + "."
