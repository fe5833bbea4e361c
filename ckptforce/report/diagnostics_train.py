"""Diagnostics of the training-example forces (DESIGN §4 items 6–8, and the likelihood displacement of preference
pairs): the cube in, tables and a verdict out.

They need an analysis with ``--train``: ``force`` / ``force_pos`` / ``force_neg`` / ``dlogp_unexplained``,
the G statistics, and the kernels. Same conventions as ``diagnostics.py`` (whose helpers they use).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..names import DISPLACE_TOPK
from ..ranks import spearman, topk_overlap
from .diagnostics import Diagnostic, _fmt, _given, _needs, _probe_labels


def force_attribution(ds: xr.Dataset, *, top: int = 12) -> Diagnostic:
    """Force of each training example on each probe (DESIGN §4 item 6), summed over intervals, mean over probes.

    Tables: ``heatmap`` (response × the ``top`` examples by total |force|), ``budget`` (per response: the
    positive and negative parts of the examples' forces, momentum, weight decay, unexplained, Δ_lin), ``top``
    (per probe, the three examples with the largest force on its chosen response, or its first type).
    """
    need = ["force", "dlogp_lin", "dlogp_unexplained"]
    if (d := _needs(ds, "force_attribution", need, "needs training-example forces (analyze --train FILE)")) is not None:
        return d
    given = _given(ds)
    kind = ds["source_kind"].values.astype(str) if "source_kind" in ds.coords else np.full(ds.sizes["source"], "example")
    examples = list(ds["source"].values[kind == "example"])
    force = ds["force"].sel(response=given).sum("interval", min_count=1)  # (probe, response, source)
    per_type = force.mean("probe", skipna=True)  # (response, source)
    ex = per_type.sel(source=examples)
    order = abs(ex).sum("response").to_series().sort_values(ascending=False).index[:top]
    heatmap = ex.sel(source=list(order)).transpose("response", "source").to_pandas()

    def total(name: str) -> xr.DataArray:
        return ds[name].sel(response=given).sum("interval", min_count=1).mean("probe", skipna=True)

    special = lambda name: per_type.sel(source=name).values if name in ds["source"].values else np.zeros(len(given))  # noqa: E731
    budget = pd.DataFrame({
        "positive": total("force_pos").sel(source=examples).sum("source").values,
        "negative": total("force_neg").sel(source=examples).sum("source").values,
        "momentum": special("momentum"), "weight_decay": special("weight_decay"),
        "unexplained": total("dlogp_unexplained").values, "dlogp_lin": total("dlogp_lin").values,
    }, index=pd.Index(given, name="response")).reset_index()  # fmt: skip
    focus = "chosen" if "chosen" in given else given[0]
    rows = []
    for probe in ds["probe"].values:
        f = force.sel(probe=probe, response=focus, source=examples).to_series().dropna()
        for src, value in f.reindex(f.abs().sort_values(ascending=False).index[:3]).items():
            rows.append({"probe": str(probe), "response": focus, "source": str(src), "force": float(value)})
    b = budget.set_index("response").loc[focus]
    explained = float(b["positive"] + b["negative"])
    lead = str(heatmap.loc[focus].abs().idxmax()) if heatmap.shape[1] else ""
    numbers = {"explained": explained, "unexplained": float(b["unexplained"]), "positive": float(b["positive"]),
               "negative": float(b["negative"]), "dlogp_lin": float(b["dlogp_lin"])}  # fmt: skip
    verdict = (f"on {focus}, the training examples account for {_fmt(explained)} of Δ_lin {_fmt(b['dlogp_lin'])} nats "
               f"(pull {_fmt(b['positive'])}, push {_fmt(b['negative'])}; momentum {_fmt(b['momentum'])}, "
               f"weight decay {_fmt(b['weight_decay'])}, unexplained {_fmt(b['unexplained'])})")  # fmt: skip
    if lead:
        verdict += f"; the strongest single force on it comes from example {lead}"
    tables = {"heatmap": heatmap, "budget": budget, "top": pd.DataFrame(rows)}
    return Diagnostic("force_attribution", tables, numbers, verdict + ".")


def g_statistics(ds: xr.Dataset) -> Diagnostic:
    """Statistics of the training signal G per training example (DESIGN §4 item 7), over intervals.

    Table ``intervals``: step_to and the mean over examples of 1 − π(y) and ‖π − e_y‖ on the responses pulled
    up, the mean rank of the tokens pushed down, and for preference objectives σ(−βh) and the margin h.
    """
    need = ["g_one_minus_p", "g_gap"]
    if (d := _needs(ds, "g_statistics", need, "needs the G statistics of training examples (analyze --train FILE)")) is not None:
        return d
    names = [n for n in ("g_one_minus_p", "g_gap", "g_neg_rank", "dpo_weight", "dpo_margin") if n in ds]
    table = pd.DataFrame({"step_to": ds["step_to"].values, **{n: ds[n].mean("source", skipna=True).values for n in names}})
    first, last = table.iloc[0], table.iloc[-1]
    verdict = f"the pull on the trained responses went from 1 − π(y) = {first['g_one_minus_p']:.2f} to {last['g_one_minus_p']:.2f}"
    if np.isfinite(last.get("dpo_weight", np.nan)):
        verdict += f"; preference pairs still push with σ(−βh) = {last['dpo_weight']:.2f} (margin {_fmt(last['dpo_margin'])} nats)"
    if np.isfinite(last.get("g_neg_rank", np.nan)):
        verdict += f"; pushed-down tokens sit at mean rank {last['g_neg_rank']:.0f} under π (a large rank is a valley: squeezing risk)"
    per_source = ds[names].to_dataframe().reset_index()
    return Diagnostic("g_statistics", {"intervals": table, "per_source": per_source}, {n: float(last[n]) for n in names}, verdict + ".")


def similarity(ds: xr.Dataset, *, top: int = 20) -> Diagnostic:
    """How each training example's update direction aligns with each probe (DESIGN §4 item 8).

    The cube's kernel pairs the probe's log-likelihood with the example's loss, K = ⟨∇log π(y_o|x_o), ∇L_u⟩, so a
    step on u changes the probe by −η·K. The report shows the *alignment* −cos(∇log π(y_o), ∇L_u): positive when
    training on u raises the probe. Tables: ``align`` (probe × the ``top`` examples by mean |alignment|, at the
    first checkpoint with a kernel), ``by_split`` (step, probe group, mean alignment with all examples) and
    ``tracin`` (per probe, the example that helped it most: the lowest Σ_t η_t K_t).
    """
    if (d := _needs(ds, "similarity", ["kernel", "kernel_cos"], "needs probe × training-example kernels (analyze --train FILE)")) is not None:
        return d
    kind = ds["source_kind"].values.astype(str) if "source_kind" in ds.coords else np.full(ds.sizes["source"], "example")
    examples = list(ds["source"].values[kind == "example"])
    align = -ds["kernel_cos"].sel(source=examples)
    have = [int(i) for i in range(ds.sizes["checkpoint"]) if np.isfinite(align.isel(checkpoint=i).values).any()]
    if not have:
        return Diagnostic.absent("similarity", "the kernel was not computed at any checkpoint")
    at = align.isel(checkpoint=have[0]).dropna("probe", how="all")
    order = abs(at).mean("probe").to_series().sort_values(ascending=False).index[:top]
    align_map = at.sel(source=list(order)).transpose("probe", "source").to_pandas()
    split = pd.Series(_probe_labels(ds), index=ds["probe"].values)
    rows = []
    for i in have:
        mean = align.isel(checkpoint=i).mean("source", skipna=True).to_series()
        for label, values in mean.groupby(split.reindex(mean.index).to_numpy()):
            rows.append({"step": int(ds["step"].values[i]), "split": label, "mean_align": float(values.mean())})
    by_split = pd.DataFrame(rows)
    tables = {"align": align_map, "by_split": by_split}
    if "kernel_tracin" in ds:
        tr = ds["kernel_tracin"].sel(source=examples).dropna("probe", how="all")
        helper = tr.idxmin("source").to_series()
        tables["tracin"] = pd.DataFrame({"probe": helper.index.astype(str), "helped_most_by": helper.values.astype(str),
                                         "tracin": tr.min("source").values})  # fmt: skip
    final = by_split[by_split["step"] == by_split["step"].max()].set_index("split")["mean_align"]
    strongest = align_map.abs().mean(axis=0).idxmax()
    verdict = (f"the update direction of training example {strongest} is the most aligned with the probes (mean |alignment| "
               f"{float(align_map[strongest].abs().mean()):.2f}); mean alignment with the training set at step "
               f"{int(by_split['step'].max())}: " + ", ".join(f"{v:+.3f} ({k})" for k, v in final.items()))  # fmt: skip
    if int(ds.attrs.get("kernel_approximate", 0) or 0):
        verdict = f"approximate kernels ({ds.attrs.get('kernel_method', 'random projection')}): " + verdict
    return Diagnostic("similarity", tables, {f"mean_align_{k}": float(v) for k, v in final.items()}, verdict + ".")


def displacement(ds: xr.Dataset) -> Diagnostic:
    """Likelihood displacement of preference pairs (Razin et al., arXiv 2410.08847): which pairs' own updates
    lower their own chosen answer, and how well CHES (a last-layer score, two forwards) ranks them.

    Over the run: per pair, its own force on its chosen answer summed over intervals (``self_force``, the exact
    first-order account through the whole model, with the optimizer's P) against CHES at the first checkpoint (as
    the paper scores pairs before training). A pair *displaces chosen* when that sum is negative. Tables: ``pairs``
    (one row per pair: prompt, ches, ches_ln, the own force on chosen — pull, push, total — and on rejected,
    displaced, CHES rank) and ``intervals`` (step_to, pairs displacing, and the cube's per-interval Spearman and
    top-k overlap). Numbers: ``displaced``, ``pairs``, ``spearman``, ``spearman_ln``, ``topk``, ``topk_overlap``.
    """
    need = ["self_force", "self_force_pos", "self_force_neg", "ches", "ches_ln"]
    why = "needs each preference pair's force on its own answers (analyze --train FILE with a dpo, ipo or simpo objective)"
    if (d := _needs(ds, "displacement", need, why)) is not None:
        return d
    kind = ds["source_kind"].values.astype(str) if "source_kind" in ds.coords else np.full(ds.sizes["source"], "example")
    pairs = list(ds["source"].values[kind == "example"])
    total = lambda name, r: ds[name].sel(source=pairs, own_response=r).sum("interval", min_count=1).values  # noqa: E731
    chosen, rejected = total("self_force", "chosen"), total("self_force", "rejected")
    ches, ches_ln = (ds[n].isel(checkpoint=0).sel(source=pairs).values for n in ("ches", "ches_ln"))
    drop = -chosen  # how far its own updates lowered the pair's chosen answer
    displaced = chosen < 0
    n, k = int(displaced.sum()), int(displaced.sum()) or min(DISPLACE_TOPK, len(pairs))
    rank = pd.Series(ches).rank(ascending=False, method="min").to_numpy()
    prompt = ds["source_prompt"].sel(source=pairs).values.astype(str) if "source_prompt" in ds.coords else np.full(len(pairs), "")
    table = pd.DataFrame({"pair": np.asarray(pairs).astype(str), "prompt": prompt, "ches": ches, "ches_ln": ches_ln,
                          "chosen_pull": total("self_force_pos", "chosen"), "chosen_push": total("self_force_neg", "chosen"),
                          "chosen": chosen, "rejected": rejected, "displaced": displaced, "ches_rank": rank})  # fmt: skip
    per_iv = {"step_to": ds["step_to"].values}
    if "displaces_chosen" in ds:
        per_iv["displaced"] = ds["displaces_chosen"].sel(source=pairs).sum("source").values
    per_iv.update({name: ds[name].values for name in ("ches_spearman", "ches_ln_spearman", "ches_topk_overlap") if name in ds})
    numbers = {"displaced": float(n), "pairs": float(len(pairs)), "spearman": spearman(ches, drop), "spearman_ln": spearman(ches_ln, drop),
               "topk": float(k), "topk_overlap": topk_overlap(ches, drop, k)}  # fmt: skip
    verdict = (f"{n} of {len(pairs)} pairs displace chosen (their own updates lower their chosen answer over the run); "
               f"CHES ranks the displacement with Spearman {_corr(numbers['spearman'])} (length-normalised "
               f"{_corr(numbers['spearman_ln'])}) and puts {numbers['topk_overlap']:.0%} of the {k} most displaced in its top {k}")  # fmt: skip
    if n:
        worst = table.loc[table["chosen"].idxmin()]
        verdict += f"; most displaced: pair {worst['pair']} ({_fmt(worst['chosen'])} nats on its chosen answer, CHES rank {int(worst['ches_rank'])})"
    return Diagnostic("displacement", {"pairs": table, "intervals": pd.DataFrame(per_iv)}, numbers, verdict + ".")


def _corr(x: float) -> str:
    return "n/a (fewer than 3 pairs)" if not np.isfinite(x) else f"{x:.2f}".replace("-", "−")
