"""Figures: a diagnostic's tables in, a matplotlib ``Figure`` out (seaborn for the statistical plots).

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state, no GUI backend). Every response
type has one colour across all figures (``colour``): the chosen group in greens, the rejected group in reds,
other answers in purples / browns, random-like responses in greys, y* in black; types the paper does not
name get colours from a qualitative palette, in order.
"""

from __future__ import annotations

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..names import ARGMAX, POOR_LINEARISATION
from .diagnostics import Diagnostic

#: One colour per response type, shared by every figure (chosen group, rejected group, other answers, random).
PALETTE = {
    "chosen": "#1b7837", "rephrase_chosen": "#5aae61", "format_chosen": "#a6dba0",
    "rejected": "#b2182b", "rephrase_rejected": "#d6604d", "format_rejected": "#f4a582",
    "other_trained": "#762a83", "other_untrained": "#9970ab", "irrelevant": "#8c510a",
    "shuffled": "#878787", "random": "#bababa", ARGMAX: "#000000",
}  # fmt: skip
_EXTRA = sns.color_palette("tab10").as_hex()


def colour(response: str, _seen: dict[str, str] = {}) -> str:  # noqa: B006 - a deliberate per-process memo
    """The colour of a response type (unknown types get the next tab10 colour, stably within a process)."""
    if response in PALETTE:
        return PALETTE[response]
    if response not in _seen:
        _seen[response] = _EXTRA[len(_seen) % len(_EXTRA)]
    return _seen[response]


def _figure(width: float = 8.0, height: float = 4.2, ncols: int = 1, **subplots) -> tuple[Figure, list]:
    sns.set_theme(style="whitegrid", context="notebook")
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False, **subplots)[0]
    return fig, list(axes)


def trajectories(d: Diagnostic) -> Figure:
    table = d.tables["mean"]
    splits = list(dict.fromkeys(table["split"]))
    fig, axes = _figure(4.2 * len(splits) + 1.6, 4.2, ncols=len(splits), sharey=True)
    for ax, split in zip(axes, splits):
        part = table[table["split"] == split]
        for response, rows in part.groupby("response", sort=False):
            ax.plot(rows["step"], rows["mean"], marker="o", ms=3, color=colour(response), label=response, lw=2 if response == ARGMAX else 1.5)
            ax.fill_between(rows["step"], rows["mean"] - rows["sem"].fillna(0), rows["mean"] + rows["sem"].fillna(0), color=colour(response), alpha=0.15)
        ax.set(title=f"{split} probes", xlabel="training step", ylabel="mean log π(y|x)  [nat]")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].legend(title="response type", loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.suptitle("Probe log-likelihood per response type (mean ± s.e.m. over probes)")
    return fig


def squeezing(d: Diagnostic) -> Figure:
    change = d.tables["change"]
    has_shape, has_rich = "shape" in d.tables, "rich" in d.tables
    fig, axes = _figure(13.0, 4.2, ncols=1 + has_shape + has_rich)
    ax = axes[0]
    sns.barplot(data=change, x="response", y="dlogp", hue="response", palette={r: colour(r) for r in change["response"]}, legend=False, ax=ax)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title="Change over the run", xlabel="response type", ylabel="Δ log π over the run  [nat]")
    ax.tick_params(axis="x", rotation=45)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    k = 1
    if has_shape:
        shape = d.tables["shape"]
        ax = axes[k]
        k += 1
        for name, style in (("top1", "-"), ("entropy", "--")):
            if name in shape:
                ax.plot(shape["step"], shape[name], style, marker="o", ms=3, color=colour("chosen"), label={"top1": "top-1 mass [1]", "entropy": "entropy [nat]"}[name])
        ax.set(title=f"Next-token distribution along {shape['along'].iloc[0]}", xlabel="training step", ylabel="mean over probes and positions")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if "peakiness" in shape:
            twin = ax.twinx()
            twin.plot(shape["step"], shape["peakiness"], ":", marker="s", ms=3, color="grey", label="peakiness ‖A‖²_F")
            twin.set_ylabel("peakiness V‖π‖² + V − 2  [1]")
            twin.ticklabel_format(axis="y", useOffset=False, style="plain")
            twin.grid(False)
            lines = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
            ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize="small", loc="best")
        else:
            ax.legend(fontsize="small")
    if has_rich:
        rich = d.tables["rich"]
        ax = axes[k]
        sample = rich.sample(n=min(len(rich), 4000), random_state=0)
        order = [r for r in change["response"] if r in set(sample["response"])]
        sns.scatterplot(data=sample, x="logp_start", y="dlogp", hue="response", hue_order=order, palette={r: colour(r) for r in order},
                        s=10, alpha=0.6, linewidth=0, legend=False, ax=ax)  # fmt: skip
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title="Rich get richer? (each response token)", xlabel="log π(token) at the first checkpoint  [nat]", ylabel="Δ log π(token) over the run  [nat]")
    fig.suptitle("Squeezing: does y* gain while the rest loses?")
    return fig


def hallucination(d: Diagnostic) -> Figure:
    per = d.tables.get("per_interval")
    fig, axes = _figure(11.0, 4.0, ncols=2)
    ax = axes[0]
    if per is not None:
        ax.bar(per["step_to"].astype(str), per["lift"], color=[colour("other_trained") if v > 0 else colour("other_untrained") for v in per["lift"]], label="lift per interval")
        ax.plot(per["step_to"].astype(str), per["cumulative"], color="black", marker="o", ms=3, label="cumulative lift")
        ax.axhline(0, color="black", lw=0.8)
        ax.legend(fontsize="small")
    ax.set(title="Lift per interval", xlabel="interval (ending at step)", ylabel="Δ other_trained − Δ other_untrained  [nat]")
    ax = axes[1]
    table, x = (d.tables["per_group"], "group") if d.grouping else (d.tables["per_split"], "split")
    sns.barplot(data=table, x=x, y="lift", color=colour("other_trained"), ax=ax)
    ax.axhline(0, color="black", lw=0.8)
    what = f"probe {d.grouping}" if d.grouping else "probe split"
    ax.set(title=f"Lift over the run, by {what}", xlabel=what, ylabel="lift  [nat]")
    fig.suptitle("Hallucination: do answers of other trained prompts leak in?")
    return fig


def forgetting(d: Diagnostic) -> Figure:
    groups, probes = d.tables["groups"], d.tables["probes"]
    fig, axes = _figure(11.0, 4.0, ncols=2)
    ax = axes[0]
    order = list(groups["group"])
    sns.stripplot(data=probes, x="group", y="delta", order=order, color=colour("chosen"), size=4, jitter=0.2, ax=ax)
    sns.pointplot(data=probes, x="group", y="delta", order=order, color="black", linestyle="none", marker="_", markersize=20, errorbar=None, ax=ax)
    tau = d.numbers.get("tau", None)
    ax.axhline(0, color="black", lw=0.8)
    if tau is not None:
        ax.axhline(-tau, color=colour("rejected"), lw=1, ls="--", label=f"−τ = −{tau}")
        ax.legend(fontsize="small")
    what = f"probe {d.grouping}" if d.grouping else "probe group"
    ax.set(title="Change of log π(chosen) per probe", xlabel=what, ylabel="Δ log π(chosen) over the run  [nat]")
    ax = axes[1]
    sns.barplot(data=groups, x="group", y="F_ratio", order=order, color=colour("rejected"), ax=ax)
    ax.set(title="Share of probes that forgot", xlabel=what, ylabel="F_ratio: share with Δ < −τ  [1]", ylim=(0, 1))
    fig.suptitle(f"Forgetting per {what}")
    return fig


def first_order(d: Diagnostic) -> Figure:
    scatter, intervals = d.tables["scatter"], d.tables["intervals"]
    fig, axes = _figure(11.0, 4.2, ncols=2)
    ax = axes[0]
    sns.scatterplot(data=scatter, x="dlogp_lin", y="dlogp_obs", hue="response", palette={r: colour(r) for r in scatter["response"].unique()},
                    s=14, alpha=0.7, linewidth=0, ax=ax)  # fmt: skip
    lo, hi = np.nanmin(scatter[["dlogp_lin", "dlogp_obs"]].to_numpy()), np.nanmax(scatter[["dlogp_lin", "dlogp_obs"]].to_numpy())
    ax.plot([lo, hi], [lo, hi], color="black", lw=0.8, ls="--", label="Δ_obs = Δ_lin")
    ax.set(title="Observed against first-order change", xlabel="Δ_lin = A·J·Δθ  [nat]", ylabel="Δ_obs  [nat]")
    ax.legend(title="response type", fontsize="x-small")
    ax = axes[1]
    x = [f"{a}→{b}" for a, b in zip(intervals["step_from"], intervals["step_to"])]
    ax.plot(x, intervals["remainder_ratio"], marker="o", color="black", label="remainder ratio ‖Δ_obs − Δ_lin‖/‖Δ_obs‖")
    if "path_gap" in intervals:
        ax.plot(x, intervals["path_gap"], marker="s", color="grey", ls=":", label="path gap max|Δ_path − Δ_obs|/max|Δ_obs|")
    ax.axhline(POOR_LINEARISATION, color=colour("rejected"), lw=1, ls="--", label=f"poor above {POOR_LINEARISATION}")
    ax.set(title="Remainder per interval", xlabel="interval (steps)", ylabel="ratio  [1]", ylim=(0, max(1.0, float(np.nanmax(intervals["remainder_ratio"])) * 1.1)))
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize="x-small")
    fig.suptitle("First-order validity: is Δ_lin a good account of the change?")
    return fig


def tensor_split(d: Diagnostic) -> Figure:
    share = d.tables["share"]
    fig, axes = _figure(max(7.0, 1.0 * share.shape[1] + 5.5), 0.35 * len(share) + 2.2)
    vmax = float(np.nanmax(np.abs(share.to_numpy()))) or 1.0
    sns.heatmap(share, cmap="RdBu_r", center=0, vmin=-vmax, vmax=vmax, annot=share.shape[1] <= 8, fmt=".2f" if vmax >= 0.1 else ".1e",
                annot_kws={"fontsize": "x-small"}, cbar_kws={"label": "Σ over intervals of mean Δ_lin  [nat]"}, ax=axes[0])  # fmt: skip
    axes[0].set(title="First-order change split by parameter tensor (largest first)", xlabel="response type", ylabel="parameter tensor")
    axes[0].tick_params(axis="x", rotation=30)
    return fig


def update_anatomy(d: Diagnostic) -> Figure:
    relative, intervals = d.tables["relative"], d.tables["intervals"]
    top = relative.loc[relative.mean(axis=1).sort_values(ascending=False).index[:16]]
    fig, axes = _figure(12.0, 0.3 * len(top) + 2.6, ncols=2)
    sns.heatmap(np.log10(top.clip(lower=1e-12)), cmap="viridis", cbar_kws={"label": "log₁₀ ‖Δθ‖/‖θ‖"}, ax=axes[0])
    axes[0].set(title="Relative update per tensor (16 largest)", xlabel="interval (ending at step)", ylabel="parameter tensor")
    ax = axes[1]
    ax.plot(intervals["step_to"], intervals["update_norm"], marker="o", color="black", label="‖Δθ‖ (all tensors)")
    ax.set(title="Update size and direction", xlabel="training step (end of interval)", ylabel="‖Δθ‖₂")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if "mean_cos" in intervals:
        twin = ax.twinx()
        twin.plot(intervals["step_to"], intervals["mean_cos"], marker="s", ls="--", color=colour("other_trained"), label="mean cosine with previous update")
        twin.set(ylabel="cosine  [1]", ylim=(-1, 1))
        twin.grid(False)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize="x-small", loc="best")
    else:
        ax.legend(fontsize="x-small")
    fig.suptitle("Update anatomy")
    return fig


def force_attribution(d: Diagnostic) -> Figure:
    heatmap, budget = d.tables["heatmap"], d.tables["budget"]
    fig, axes = _figure(13.0, max(4.2, 0.32 * len(heatmap) + 2.6), ncols=2, width_ratios=[1.3, 1])
    vmax = float(np.nanmax(np.abs(heatmap.to_numpy()))) if heatmap.size else 1.0
    sns.heatmap(heatmap, cmap="RdBu_r", center=0, vmin=-vmax, vmax=vmax, cbar_kws={"label": "force, Σ intervals, mean over probes  [nat]"}, ax=axes[0])
    axes[0].set(title="Force of each training example (largest first)", xlabel="training example", ylabel="probe response type")
    axes[0].tick_params(axis="x", rotation=60)
    ax = axes[1]
    parts = [("positive", "#1b7837", "pull (w > 0)"), ("negative", "#b2182b", "push (w < 0)"), ("momentum", "#9970ab", "momentum"),
             ("weight_decay", "#8c510a", "weight decay"), ("unexplained", "#bababa", "unexplained")]  # fmt: skip
    y = np.arange(len(budget))
    height = 0.8 / len(parts)
    for i, (col, c, label) in enumerate(parts):
        ax.barh(y + (i - len(parts) / 2 + 0.5) * height, budget[col], height=height, color=c, label=label)
    ax.scatter(budget["dlogp_lin"], y, marker="D", color="black", zorder=3, label="Δ_lin (their sum)")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, budget["response"])
    ax.invert_yaxis()
    ax.set(title="Where Δ_lin comes from", xlabel="Σ over intervals, mean over probes  [nat]", ylabel="probe response type")
    ax.legend(fontsize="x-small", loc="best")
    fig.suptitle("Force attribution: which training examples moved the probes")
    return fig


def g_statistics(d: Diagnostic) -> Figure:
    table = d.tables["intervals"]
    fig, axes = _figure(11.0, 4.0, ncols=2)
    ax = axes[0]
    ax.plot(table["step_to"], table["g_one_minus_p"], marker="o", color=colour("chosen"), label="1 − π(y) (pulled-up responses)")
    ax.plot(table["step_to"], table["g_gap"], marker="s", ls="--", color=colour("rephrase_chosen"), label="‖π − e_y‖")
    if "dpo_weight" in table:
        ax.plot(table["step_to"], table["dpo_weight"], marker="^", color=colour("rejected"), label="σ(−βh) (DPO weight)")
    ax.set(title="Strength of the training signal", xlabel="training step (end of interval)", ylabel="mean over training examples  [1]", ylim=(0, None))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="x-small")
    ax = axes[1]
    if "g_neg_rank" in table and table["g_neg_rank"].notna().any():
        ax.plot(table["step_to"], table["g_neg_rank"], marker="o", color=colour("rejected"))
        ax.set_yscale("log")
        ax.set(title="Rank of pushed-down tokens under π", ylabel="mean rank (1 = argmax)")
    else:
        ax.text(0.5, 0.5, "no response is pushed down\n(the objective has no negative gradient)", ha="center", va="center", transform=ax.transAxes)
        ax.set(title="Rank of pushed-down tokens under π", ylabel="mean rank (1 = argmax)")
    ax.set(xlabel="training step (end of interval)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("G statistics: how hard, and where, the training examples push")
    return fig


def displacement(d: Diagnostic, *, top: int = 15) -> Figure:
    pairs = d.tables["pairs"]
    fig, axes = _figure(12.5, max(4.2, 0.28 * min(top, len(pairs)) + 2.2), ncols=2, width_ratios=[1, 1.1])
    ax = axes[0]
    for hit, c, label in ((False, colour("chosen"), "chosen not displaced"), (True, colour("rejected"), "displaces chosen")):
        part = pairs[pairs["displaced"] == hit]
        ax.scatter(part["ches"], part["chosen"], color=c, s=28, label=f"{label} ({len(part)})", zorder=3)
    for _, row in pairs.nsmallest(3, "chosen").iterrows():
        ax.annotate(str(row["pair"]), (row["ches"], row["chosen"]), fontsize="x-small", xytext=(4, 2), textcoords="offset points")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title="CHES against the exact displacement", xlabel="CHES at the first checkpoint",
           ylabel="own force on chosen, Σ intervals  [nat]")  # fmt: skip
    ax.legend(fontsize="x-small", loc="best")
    ax = axes[1]
    shown = pairs.sort_values("ches", ascending=False).head(top)
    y = np.arange(len(shown))
    ax.barh(y - 0.2, shown["chosen_pull"], height=0.4, color=colour("chosen"), label="pull (w > 0: DPO's chosen pulled up)")
    ax.barh(y + 0.2, shown["chosen_push"], height=0.4, color=colour("rejected"), label="push (w < 0: DPO's rejected pushed down)")
    ax.scatter(shown["chosen"], y, marker="D", color="black", zorder=3, label="total on chosen")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{p} (CHES #{int(r)})" for p, r in zip(shown["pair"], shown["ches_rank"])])
    ax.invert_yaxis()
    ax.set(title="Each pair's own force on its chosen answer (highest CHES first)", xlabel="Σ over intervals  [nat]")
    ax.legend(fontsize="x-small", loc="best")
    fig.suptitle("Likelihood displacement: preference pairs that lower their own chosen answer")
    return fig


def mutual_support(d: Diagnostic) -> Figure:
    examples, matrix = d.tables["examples"], d.tables["matrix"]
    fig, axes = _figure(12.5, 4.6, ncols=2, width_ratios=[1, 1])
    ax = axes[0]
    sns.scatterplot(data=examples, x="support", y="area", hue="group", s=36, ax=ax, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set(title="Support from the rest of the data against learning speed", xlabel="Σ_{u≠v} force of u on v's target  [nat]",
           ylabel="log-likelihood area  [nat / token]")  # fmt: skip
    ax = axes[1]
    order = examples.sort_values(["group", "example"])["example"].tolist()
    shown = matrix.loc[order, order]
    limit = float(np.nanmax(np.abs(shown.values))) or 1.0
    sns.heatmap(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, center=0, ax=ax, xticklabels=len(order) <= 40, yticklabels=len(order) <= 40,
                cbar_kws={"label": "force  [nat]"})  # fmt: skip
    ax.set(title="Force of each example (column) on each example's target (row)", xlabel="from", ylabel="on")
    fig.suptitle("Mutual support: how training examples pull each other toward their targets")
    return fig


def learning_paths(d: Diagnostic) -> Figure:
    probes, paths = d.tables["probes"], d.tables["paths"]
    fig, axes = _figure(12.0, 4.2, ncols=2)
    ax = axes[0]
    order = sorted(probes["group"].unique())
    sns.boxplot(data=probes, x="group", y="zigzag", order=order, color="#dddddd", showfliers=False, ax=ax)
    sns.stripplot(data=probes, x="group", y="zigzag", order=order, hue="group", palette={"flipped": colour("rejected"), "clean": colour("chosen")},
                  size=4, jitter=0.2, legend=False, ax=ax)  # fmt: skip
    ax.set(title="Zig-zag score per probe", xlabel="probe group", ylabel="path length / net displacement  [1]")
    ax = axes[1]
    worst = probes.sort_values("zigzag", ascending=False)["probe"].head(6)
    for probe in worst:
        rows = paths[paths["probe"] == probe]
        c = colour("rejected") if rows["group"].iloc[0] == "flipped" else colour("chosen")
        ax.plot(rows["step"], rows["p_label"], marker="o", ms=3, color=c, alpha=0.8)
        ax.plot(rows["step"], rows["p_rival"], ls=":", color=c, alpha=0.6)
    ax.set(title="The six most winding paths", xlabel="training step", ylabel="probability  [1]  (solid: label, dotted: top rival)", ylim=(0, 1))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Learning paths: how each classifier probe travelled to its label")
    return fig


def similarity(d: Diagnostic) -> Figure:
    align, by_split = d.tables["align"], d.tables["by_split"]
    fig, axes = _figure(13.0, max(4.0, 0.22 * len(align) + 2.4), ncols=2, width_ratios=[1.6, 1])
    sns.heatmap(align, cmap="RdBu_r", center=0, vmin=-1, vmax=1, cbar_kws={"label": "alignment −cos(∇log π(y_o|x_o), ∇L_u)  [1]"}, ax=axes[0])
    axes[0].set(title="Alignment of each example's update with each probe (strongest first)", xlabel="training example", ylabel="probe")
    axes[0].tick_params(axis="x", rotation=60)
    ax = axes[1]
    for split, rows in by_split.groupby("split"):
        ax.plot(rows["step"], rows["mean_align"], marker="o", label=split)
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title="Mean alignment with the training set", xlabel="training step", ylabel="mean alignment  [1]")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title="probe group", fontsize="x-small")
    fig.suptitle("Similarity: which training examples push each probe up (red) or down (blue)")
    return fig


def feature_adaptation(d: Diagnostic) -> Figure:
    steps, groups = d.tables["steps"], d.tables["groups"]
    fig, axes = _figure(11.0, 4.0, ncols=2)
    ax = axes[0]
    for group in groups.columns:
        ax.plot(groups.index, groups[group], marker="o", ms=3, label=f"‖z − z_0‖ ({group})")
    ax.set(title="Distance from the first checkpoint", xlabel="training step", ylabel="mean ‖z − z_0‖")
    twin = ax.twinx()
    twin.plot(steps["step"], steps["one_minus_cos"], ls="--", color="grey", label="1 − cos(z, z_0)")
    twin.set(ylabel="1 − cos  [1]")
    twin.grid(False)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = twin.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize="x-small")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax = axes[1]
    ax.plot(steps["step"], steps["norm"], marker="o", color="black", label="‖z‖")
    ax.plot(steps["step"], np.sqrt(np.clip(steps["dot"], 0, None)), marker="s", ls=":", color=colour("chosen"), label="√(z·z_0)")
    ax.set(title="Size of the features", xlabel="training step", ylabel="mean over probes")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="x-small")
    fig.suptitle("Feature adaptation of the named layer")
    return fig


def lazy_displacement(d: Diagnostic, *, top: int = 15) -> Figure:
    groups, tokens, exploration = d.tables["groups"], d.tables["tokens"], d.tables["exploration"]
    fig, axes = _figure(15.5, max(4.4, 0.28 * min(top, len(groups)) + 2.2), ncols=3, width_ratios=[1.15, 1, 0.9])
    ax = axes[0]
    shown = groups.sort_values("lazy_share", ascending=False, na_position="first").head(top)
    y = np.arange(len(shown))
    ax.barh(y - 0.2, shown["lld_pos"], height=0.4, color=colour("chosen"), label="pull (Â > 0 completions)")
    ax.barh(y + 0.2, shown["lld_neg"], height=0.4, color=colour("rejected"), label="push (Â < 0 completions)")
    ax.scatter(shown["lld"], y, marker="D", color="black", zorder=3, label="LLD (total)")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, [f"{g}{' (lazy)' if lazy else ''}" for g, lazy in zip(shown["group"], shown["lazy"])], fontsize="x-small")
    ax.invert_yaxis()
    ax.set(title="Each group's own force on its correct completions", xlabel="first-order Δ log π, mean over correct  [nat]")
    ax.legend(fontsize="x-small", loc="best")
    ax = axes[1]
    scored = tokens.dropna(subset=["nthr"])
    if len(scored):
        ax.scatter(scored["nthr"], scored["harm"], s=14, color=colour("rejected"), alpha=0.6, zorder=3)
        for _, row in scored.head(3).iterrows():
            ax.annotate(str(row["token"]).strip(), (row["nthr"], row["harm"]), fontsize="x-small", xytext=(4, 2), textcoords="offset points")
        ax.set_yscale("symlog", linthresh=max(float(scored["harm"].abs().quantile(0.9)), 1e-6))  # a few tokens dominate
    ax.axhline(0, color="black", lw=0.8)
    spearman = d.numbers.get("spearman", float("nan"))
    ax.set(title=f"Negative tokens: NTHR against the exact harm (Spearman {spearman:.2f})", xlabel="NTHR score s⁻ (last layer)",
           ylabel="harm: −force on the correct completions  [nat]")  # fmt: skip
    ax = axes[2]
    if len(exploration):
        ax.plot(exploration["step"], exploration["entropy"], marker="o", color="#3b6fb6", label="entropy, all rollouts")
        ax.plot(exploration["step"], exploration["entropy_correct"], marker="o", ls="--", color="#3b6fb6", label="entropy, correct")
        twin = ax.twinx()
        twin.plot(exploration["step"], exploration["top1"], marker="s", color=colour(ARGMAX), label="top-1 mass, all")
        twin.set_ylabel("top-1 mass")
        twin.grid(False)
        lines = ax.get_legend_handles_labels(), twin.get_legend_handles_labels()
        ax.legend(lines[0][0] + lines[1][0], lines[0][1] + lines[1][1], fontsize="x-small", loc="best")
    ax.set(title="Exploration on the rollouts", xlabel="training step", ylabel="mean entropy  [nat]")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Lazy likelihood displacement in GRPO: negative completions that hold the correct ones back")
    return fig
