"""Diagnostics (DESIGN §4): the cube in, small tables and a verdict out. No torch, no plotting.

Each diagnostic is a pure function ``f(ds) -> Diagnostic``: ``tables`` (pandas DataFrames a figure or a
test reads), ``numbers`` (the headline values the verdict is computed from) and ``verdict`` (one sentence).
When the cube lacks what a diagnostic needs it returns ``Diagnostic.absent(...)`` with the reason and what
would provide it, and the report says so instead of leaving the section out.

Conventions: "over the run" means from the first to the last checkpoint (``logp[-1] − logp[0]``), "per
interval" means along ``dlogp_obs``. Means over probes skip NaN (a probe without that response type).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from .. import cube
from ..names import ARGMAX, POOR_LINEARISATION
from ..remedies.filter_kd import ema_targets

#: Forgetting threshold τ (nats): a probe "forgot" when its chosen answer fell by more than this.
FORGET_TAU = 0.5
#: Mean top-1 mass over every response position above which a run has collapsed onto single tokens.
COLLAPSE_TOP1 = 0.9


@dataclass(frozen=True)
class Highlight:
    """A piece of run text with one part marked (a harmful token in its completion): shown as text, never markup."""

    label: str
    before: str
    mark: str
    after: str
    note: str = ""

    def plain(self) -> str:
        """The text with the mark in guillemets, for the PDF and the terminal."""
        return f"{self.label}: {self.before}«{self.mark}»{self.after}" + (f" — {self.note}" if self.note else "")


@dataclass
class Diagnostic:
    """One diagnostic's result: tables for figures, headline numbers, a verdict, run text worth reading with a
    part marked (``highlights``); or why it is absent."""

    key: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)
    verdict: str = ""
    missing: str = ""  # non-empty: the cube cannot support this diagnostic, and why
    grouping: str = ""  # what the probes are grouped by, when the caller chose it (--group-by)
    highlights: list[Highlight] = field(default_factory=list)

    @classmethod
    def absent(cls, key: str, why: str) -> "Diagnostic":
        return cls(key=key, missing=why)


def _steps(ds: xr.Dataset) -> tuple[int, int]:
    return int(ds["step"].values[0]), int(ds["step"].values[-1])


def _given(ds: xr.Dataset) -> list[str]:
    """Response types given in the probe file (every type but the computed argmax)."""
    return [str(r) for r in ds["response"].values if r != ARGMAX]


def _run_change(ds: xr.Dataset) -> xr.DataArray:
    """(probe, response) change of log π over the run: last checkpoint minus first."""
    return ds["logp"].isel(checkpoint=-1) - ds["logp"].isel(checkpoint=0)


def _needs(ds: xr.Dataset, key: str, names: list[str], why: str) -> Diagnostic | None:
    lacking = [n for n in names if n not in ds.variables]
    return Diagnostic.absent(key, f"{why} (the cube has no {', '.join(repr(n) for n in lacking)})") if lacking else None


def _fmt(x: float) -> str:
    """A signed number of nats, as a reader wants it: +1.23 / −0.40."""
    return f"{x:+.2f}".replace("-", "−")


# --- 1. trajectories -----------------------------------------------------------------------------------


def trajectories(ds: xr.Dataset) -> Diagnostic:
    """log π(y|x) per response type over the checkpoints, mean ± s.e.m. over probes, per probe split.

    Table ``mean``: step, response, split, mean, sem, n. Verdict: each type's mean change over the run.
    """
    if (d := _needs(ds, "trajectories", ["logp"], "needs log-probabilities at the checkpoints")) is not None:
        return d
    split = ds["probe_split"].values if "probe_split" in ds.coords else np.full(ds.sizes["probe"], "")
    frame = ds["logp"].to_dataframe().reset_index()[["checkpoint", "probe", "response", "logp"]]
    frame["step"] = ds["step"].values[frame["checkpoint"].to_numpy()] if "step" in ds.coords else frame["checkpoint"]
    frame["split"] = pd.Series(split, index=ds["probe"].values).reindex(frame["probe"]).to_numpy()
    frame["split"] = frame["split"].replace("", "all")
    grouped = frame.dropna(subset=["logp"]).groupby(["step", "response", "split"], sort=False)["logp"]
    table = grouped.agg(["mean", "sem", "count"]).rename(columns={"count": "n"}).reset_index()
    change = _run_change(ds).mean("probe", skipna=True).to_series()
    a, b = _steps(ds)
    parts = [f"{r} {_fmt(v)}" for r, v in change.items() if np.isfinite(v)]
    return Diagnostic(
        "trajectories", {"mean": table, "change": change.rename("dlogp").reset_index()},
        {f"change_{r}": float(v) for r, v in change.items()},
        f"Mean change of log π over steps {a}→{b} (nats): " + ", ".join(parts) + ".",
    )  # fmt: skip


# --- 2. squeezing --------------------------------------------------------------------------------------


def squeezing(ds: xr.Dataset) -> Diagnostic:
    """The squeezing effect: y* = argmax along ``chosen`` against every given response type.

    squeeze index = Δlog π(y*) − mean_types Δlog π(type), over the run and per interval (nats).
    Tables: ``change`` (response, dlogp), ``per_interval`` (step_to, squeeze_index), ``shape`` (step,
    peakiness, entropy, top1: means over probes and response positions of ``chosen``), ``rich`` (the
    rich-get-richer scatter: each response token's log π at the first checkpoint and its change).
    """
    if (d := _needs(ds, "squeezing", ["logp"], "needs log-probabilities")) is not None:
        return d
    if ARGMAX not in ds["response"].values:
        return Diagnostic.absent("squeezing", "needs the argmax response y*, computed along 'chosen'; give probes a 'chosen' response")
    change = _run_change(ds).mean("probe", skipna=True)
    given = _given(ds)
    if given == ["label"]:
        return Diagnostic.absent("squeezing", "needs language-model probes with several response types; a classifier probe has one "
                                 "label (its moves are in the learning paths)")  # fmt: skip
    d_star = float(change.sel(response=ARGMAX))
    others = change.sel(response=given)
    index = d_star - float(others.mean())
    fell = int((others < 0).sum())
    per_interval = ds["dlogp_obs"].mean("probe", skipna=True) if "dlogp_obs" in ds else None
    tables = {"change": change.to_series().rename("dlogp").reset_index()}
    if per_interval is not None:
        idx = per_interval.sel(response=ARGMAX) - per_interval.sel(response=given).mean("response")
        tables["per_interval"] = pd.DataFrame({"step_to": ds["step_to"].values, "squeeze_index": idx.values})
    shape = {}
    focus = "chosen" if "chosen" in given else given[0]  # the distributions along which y* is read
    for name in ("peakiness", "entropy", "top1"):
        if name in ds:
            shape[name] = ds[name].sel(response=focus).mean(["probe", "token"], skipna=True).values
    # collapse: confident even where no answer should be (random-like responses); a classifier growing sure of
    # its labels is learning, so without such responses there is nothing to call a collapse
    wild = [r for r in ("random", "shuffled", "irrelevant") if r in given]
    top1 = ds["top1"].sel(response=wild) if "top1" in ds and wild else None
    top1_all = float(top1.isel(checkpoint=-1).mean(skipna=True)) if top1 is not None else float("nan")
    top1_start = float(top1.isel(checkpoint=0).mean(skipna=True)) if top1 is not None else float("nan")
    if shape:
        tables["shape"] = pd.DataFrame({"step": ds["step"].values, **shape}).assign(along=focus)
    if "logp_tok" in ds:
        start, end = ds["logp_tok"].isel(checkpoint=0), ds["logp_tok"].isel(checkpoint=-1)
        rich = xr.Dataset({"logp_start": start, "dlogp": end - start}).to_dataframe().reset_index()
        tables["rich"] = rich.dropna(subset=["logp_start", "dlogp"])[["probe", "response", "token", "logp_start", "dlogp"]]
    numbers = {"dlogp_argmax": d_star, "squeeze_index": index, "types_fell": fell, "types": len(given),
               "top1_end": top1_all, "top1_start": top1_start}  # fmt: skip
    a, b = _steps(ds)
    if np.isfinite(top1_all) and top1_all >= COLLAPSE_TOP1 and top1_all > top1_start:
        verdict = (f"collapse: at step {b} the next-token distribution puts {top1_all:.0%} of its mass on one token on "
                   f"average over the positions of {', '.join(wild)} (from {top1_start:.0%} at step {a}); this is a collapse "
                   f"onto single tokens, not a gentle squeeze — the steps were likely too large")  # fmt: skip
    elif d_star > 0 and fell > len(given) / 2:
        verdict = f"squeezing: log π(y*) rose {d_star:.2f} nats while {fell} of {len(given)} response types fell (squeeze index {_fmt(index)})"
    elif d_star > 0:
        verdict = (f"no squeezing: log π(y*) rose {d_star:.2f} nats, but only {fell} of {len(given)} response types fell "
                   f"(squeeze index {_fmt(index)}): the mass moved to more than the argmax")  # fmt: skip
    else:
        verdict = f"no squeezing: log π(y*) changed {_fmt(d_star)} nats over steps {a}→{b}; {fell} of {len(given)} response types fell"
    return Diagnostic("squeezing", tables, numbers, verdict + ".")


# --- 3. hallucination ----------------------------------------------------------------------------------


def hallucination(ds: xr.Dataset, *, by: str | None = None) -> Diagnostic:
    """Hallucination lift = Δlog π(other_trained | x) − Δlog π(other_untrained | x), mean over probes.

    A positive lift: answers of *other trained* questions gain on this prompt more than answers of questions
    never trained on — training leaks answers across prompts. Tables: ``per_interval`` (step_to, lift,
    cumulative) and ``per_split`` (split, lift over the run) — or, with ``by`` (a probe label, see
    ``probe_grouping``), ``per_group`` (group, lift over the run).
    """
    if (d := _needs(ds, "hallucination", ["logp"], "needs log-probabilities")) is not None:
        return d
    have = set(ds["response"].values)
    if not {"other_trained", "other_untrained"} <= have:
        lacking = sorted({"other_trained", "other_untrained"} - have)
        return Diagnostic.absent("hallucination", f"needs the response types other_trained and other_untrained; the probes lack {', '.join(lacking)}")
    run = _run_change(ds)
    lift_probe = run.sel(response="other_trained") - run.sel(response="other_untrained")  # (probe,)
    lift = float(lift_probe.mean(skipna=True))
    tables = {}
    if "dlogp_obs" in ds:
        step = ds["dlogp_obs"].sel(response="other_trained") - ds["dlogp_obs"].sel(response="other_untrained")
        per = step.mean("probe", skipna=True).values
        tables["per_interval"] = pd.DataFrame({"step_to": ds["step_to"].values, "lift": per, "cumulative": np.cumsum(per)})
    if by:
        per = pd.Series(lift_probe.values, index=pd.Index(probe_grouping(ds, by), name="group")).groupby(level=0).mean()
        tables["per_group"] = per.rename("lift").reset_index()
    else:
        split = ds["probe_split"].values if "probe_split" in ds.coords else np.full(ds.sizes["probe"], "")
        by_split = pd.Series(lift_probe.values, index=pd.Index(np.where(split == "", "all", split), name="split")).groupby(level=0).mean()
        tables["per_split"] = by_split.rename("lift").reset_index()
    positive = int((tables["per_interval"]["lift"] > 0).sum()) if "per_interval" in tables else 0
    n_int = len(tables.get("per_interval", []))
    a, b = _steps(ds)
    where = f"; positive on {positive} of {n_int} intervals" if n_int else ""
    if lift > 0:
        verdict = (f"hallucination signal: answers of other trained prompts gained {lift:.2f} nats more than answers "
                   f"of untrained prompts over steps {a}→{b} (lift {_fmt(lift)}{where})")  # fmt: skip
    else:
        verdict = f"no hallucination signal: lift {_fmt(lift)} nats over steps {a}→{b}{where}"
    return Diagnostic("hallucination", tables, {"lift": lift, "positive_intervals": positive}, verdict + ".", grouping=by or "")


# --- 4. forgetting -------------------------------------------------------------------------------------


def forgetting(ds: xr.Dataset, *, tau: float = FORGET_TAU, response: str | None = None, by: str | None = None) -> Diagnostic:
    """Forgetting per probe group (or split, or the label ``by``): F_avg = mean(−Δ log p), F_ratio = share of
    probes with Δ < −τ.

    Δ is the change of log π(``response``|x) over the run. Table ``groups``: group, n, F_avg, F_ratio.
    """
    if (d := _needs(ds, "forgetting", ["logp"], "needs log-probabilities")) is not None:
        return d
    response = response or ("chosen" if "chosen" in ds["response"].values else "label")
    if response not in ds["response"].values:
        return Diagnostic.absent("forgetting", f"needs the {response!r} response (the answer the model should keep)")
    delta = _run_change(ds).sel(response=response).values  # (probe,)
    label = probe_grouping(ds, by) if by else _probe_labels(ds)
    frame = pd.DataFrame({"group": label, "delta": delta}).dropna()
    groups = frame.groupby("group", sort=True)["delta"].agg(
        n="count", F_avg=lambda d: float(np.mean(-d)), F_ratio=lambda d: float(np.mean(d < -tau))
    ).reset_index()  # fmt: skip
    worst = groups.sort_values("F_avg", ascending=False).iloc[0]
    forgot = int((frame["delta"] < -tau).sum())
    a, b = _steps(ds)
    if worst["F_avg"] > 0 and forgot:
        verdict = (f"forgetting: group '{worst['group']}' lost {worst['F_avg']:.2f} nats of log π({response}) on average "
                   f"over steps {a}→{b}; {forgot} of {len(frame)} probes fell by more than τ = {tau} nats")  # fmt: skip
    else:
        verdict = f"no forgetting: no probe's log π({response}) fell by more than τ = {tau} nats over steps {a}→{b}" if not forgot else (
            f"little forgetting: {forgot} of {len(frame)} probes fell by more than τ = {tau} nats, but no group lost on average")  # fmt: skip
    numbers = {"forgot": forgot, "probes": len(frame), "worst_F_avg": float(worst["F_avg"]), "tau": tau}
    return Diagnostic("forgetting", {"groups": groups, "probes": frame}, numbers, verdict + ".", grouping=by or "")


def _probe_labels(ds: xr.Dataset) -> np.ndarray:
    """The probe's group, else its split, else 'all'."""
    n = ds.sizes["probe"]
    group = ds["probe_group"].values.astype(str) if "probe_group" in ds.coords else np.full(n, "")
    split = ds["probe_split"].values.astype(str) if "probe_split" in ds.coords else np.full(n, "")
    return np.where(group != "", group, np.where(split != "", split, "all"))


#: Shown for a probe that lacks the label it is grouped by.
NO_LABEL = "(none)"


def groupings(ds: xr.Dataset) -> list[str]:
    """What probes can be grouped by: ``split``, ``group`` and the probe file's own labels (``meta.attr`` …)."""
    return ["split", "group", *cube.labels(ds, "probe")]


def probe_grouping(ds: xr.Dataset, by: str) -> np.ndarray:
    """Each probe's value of ``by`` (``split``, ``group`` or one of its own labels), ``NO_LABEL`` where it has none."""
    name = {"split": "probe_split", "group": "probe_group"}.get(by, cube.label_coord("probe", by))
    values = ds[name].values.astype(str) if name in ds.coords else np.full(ds.sizes["probe"], "")
    return np.where(values == "", NO_LABEL, values)


# --- 5. first-order validity ---------------------------------------------------------------------------


def first_order(ds: xr.Dataset) -> Diagnostic:
    """Is Δ_lin = A·J·Δθ a good account of Δ_obs?  remainder ratio ‖Δ_obs − Δ_lin‖ / ‖Δ_obs‖ per interval.

    Tables: ``intervals`` (step_from, step_to, remainder_ratio, path_gap = max|Δ_path − Δ_obs| / max|Δ_obs|)
    and ``scatter`` (interval, probe, response, dlogp_obs, dlogp_lin) for the scatter plot (y* excluded:
    its tokens switch along the path).
    """
    need = ["dlogp_obs", "dlogp_lin", "remainder_ratio"]
    if (d := _needs(ds, "first_order", need, "needs the observed and first-order changes")) is not None:
        return d
    given = _given(ds)
    obs, lin = ds["dlogp_obs"].sel(response=given), ds["dlogp_lin"].sel(response=given)
    intervals = pd.DataFrame({"step_from": ds["step_from"].values, "step_to": ds["step_to"].values, "remainder_ratio": ds["remainder_ratio"].values})
    if "dlogp_path" in ds:
        gap = abs(ds["dlogp_path"].sel(response=given) - obs).max(["probe", "response"]) / abs(obs).max(["probe", "response"])
        intervals["path_gap"] = gap.values
    scatter = xr.Dataset({"dlogp_obs": obs, "dlogp_lin": lin}).to_dataframe().reset_index().dropna(subset=["dlogp_obs", "dlogp_lin"])
    ratios = intervals["remainder_ratio"].to_numpy()
    poor = intervals[ratios > POOR_LINEARISATION]
    finite = ratios[np.isfinite(ratios)]
    if not len(finite):
        return Diagnostic("first_order", {"intervals": intervals, "scatter": scatter}, {"poor": 0},
                          "cannot tell: no probe changed over any interval (the remainder ratio is undefined).")
    numbers = {"max_ratio": float(finite.max()), "median_ratio": float(np.median(finite)), "poor": len(poor)}
    if len(poor):
        named = [f"{a}→{b}" for a, b in zip(poor["step_from"], poor["step_to"])]
        steps = ", ".join(named[:5]) + (f" and {len(named) - 5} more" if len(named) > 5 else "")
        verdict = (f"first-order prediction poor on {len(poor)} of {len(ratios)} intervals (remainder ratio > {POOR_LINEARISATION}): "
                   f"steps {steps}; read those intervals from Δ_path, or analyze checkpoints closer together")  # fmt: skip
    else:
        verdict = (f"first-order prediction holds: remainder ratio ≤ {numbers['max_ratio']:.2f} on all {len(finite)} "
                   f"intervals with a change (median {numbers['median_ratio']:.2f})")  # fmt: skip
    return Diagnostic("first_order", {"intervals": intervals, "scatter": scatter}, numbers, verdict + ".")


# --- where the change comes from: the per-tensor split -------------------------------------------------


def tensor_split(ds: xr.Dataset, *, top: int = 12) -> Diagnostic:
    """Which parameter tensors move each response type: Σ_intervals mean_probes Δ_lin split by tensor.

    Table ``share`` (tensor × response, nats) for the ``top`` tensors by total |contribution|; ``numbers``
    name the largest tensor for ``chosen`` (or the first type).
    """
    if (d := _needs(ds, "tensor_split", ["dlogp_lin_tensor"], "needs the per-tensor split (analyze without --no-by-tensor)")) is not None:
        return d
    given = _given(ds)
    total = ds["dlogp_lin_tensor"].sel(response=given).mean("probe", skipna=True).sum("interval")  # (response, tensor)
    frame = total.transpose("tensor", "response").to_pandas()
    order = frame.abs().sum(axis=1).sort_values(ascending=False).index[:top]
    frame = frame.loc[order]
    focus = "chosen" if "chosen" in given else given[0]
    col = total.sel(response=focus)
    lead = str(col["tensor"].values[int(np.argmax(np.abs(col.values)))])
    share = float(abs(col.sel(tensor=lead)) / abs(col).sum())
    verdict = f"the change of log π({focus}) comes most from {lead} ({share:.0%} of the summed |contributions|)"
    return Diagnostic("tensor_split", {"share": frame}, {"lead_share": share, "lead": lead}, verdict + ".")  # type: ignore[dict-item]


# --- 11. update anatomy --------------------------------------------------------------------------------


def update_anatomy(ds: xr.Dataset) -> Diagnostic:
    """Per-tensor update norms ‖Δθ‖, relative updates ‖Δθ‖/‖θ‖, consecutive update cosine, effective lr.

    Tables: ``relative`` (tensor × step_to), ``intervals`` (step_to, update_norm = √Σ‖Δθ‖², median relative,
    mean cosine with the previous update, lr when known).
    """
    if (d := _needs(ds, "update_anatomy", ["update_norm", "param_norm"], "needs the update anatomy")) is not None:
        return d
    rel = (ds["update_norm"] / ds["param_norm"].where(ds["param_norm"] > 0)).transpose("tensor", "interval")
    relative = pd.DataFrame(rel.values, index=ds["tensor"].values, columns=ds["step_to"].values)
    intervals = pd.DataFrame({
        "step_to": ds["step_to"].values,
        "update_norm": np.sqrt((ds["update_norm"] ** 2).sum("tensor")).values,
        "median_relative": rel.median("tensor", skipna=True).values,
    })  # fmt: skip
    if "update_cos" in ds:
        intervals["mean_cos"] = ds["update_cos"].mean("tensor", skipna=True).values
    if "lr" in ds.coords or "lr" in ds:
        intervals["lr"] = ds["lr"].values
    lead = relative.mean(axis=1).idxmax()
    numbers = {"lead_relative": float(relative.mean(axis=1).max())}
    verdict = f"largest relative updates in {lead} ({numbers['lead_relative']:.1e} per interval on average)"
    cos = intervals["mean_cos"].dropna() if "mean_cos" in intervals else pd.Series(dtype=float)
    if len(cos):
        numbers["mean_cos"] = float(cos.mean())
        kind = "alternate in direction (zig-zag)" if cos.mean() < 0 else "keep their direction" if cos.mean() > 0.5 else "turn from interval to interval"
        verdict += f"; consecutive updates {kind} (mean cosine {cos.mean():+.2f})"
    return Diagnostic("update_anatomy", {"relative": relative, "intervals": intervals}, numbers, verdict + ".")


# --- features and learning paths -------------------------------------------------------------------------


def feature_adaptation(ds: xr.Dataset) -> Diagnostic:
    """Drift of a named hidden layer's features over checkpoints (DESIGN §4 item 9).

    Table ``steps``: step and the means over probes of ‖z_t − z_0‖, 1 − cos(z_t, z_0), z_t·z_0, ‖z_t‖ (per probe
    group in ``groups``). ``numbers`` add E_0 = mean ‖e_y − p_0‖ of the head at the first checkpoint for a
    classifier (the "energy" that drives feature change when fine-tuning starts: small after head probing).
    """
    need = ["feature_drift", "feature_one_minus_cos", "feature_norm", "feature_dot"]
    if (d := _needs(ds, "feature_adaptation", need, "needs the features of a named layer (analyze --feature-layer NAME)")) is not None:
        return d
    mean = lambda name: ds[name].mean("probe", skipna=True).values  # noqa: E731
    steps = pd.DataFrame({"step": ds["step"].values, "drift": mean("feature_drift"), "one_minus_cos": mean("feature_one_minus_cos"),
                          "dot": mean("feature_dot"), "norm": mean("feature_norm")})  # fmt: skip
    groups = pd.Series(_probe_labels(ds), index=ds["probe"].values)
    per_group = ds["feature_drift"].to_pandas().T.groupby(groups.to_numpy()).mean().T  # (checkpoint, group)
    per_group.index = ds["step"].values
    numbers = {"drift_end": float(steps["drift"].iloc[-1]), "one_minus_cos_end": float(steps["one_minus_cos"].iloc[-1]),
               "relative_drift_end": float(steps["drift"].iloc[-1] / steps["norm"].iloc[0]) if steps["norm"].iloc[0] else float("nan")}  # fmt: skip
    layer = ds.attrs.get("feature_layer", "the named layer")
    verdict = (f"features of {layer} moved ‖z − z_0‖ = {numbers['drift_end']:.3g} by step {int(steps['step'].iloc[-1])} "
               f"({numbers['relative_drift_end']:.0%} of ‖z_0‖; 1 − cos = {numbers['one_minus_cos_end']:.3f})")  # fmt: skip
    if "logp_class" in ds and "probe_label" in ds.coords:
        p0 = np.exp(ds["logp_class"].isel(checkpoint=0).values)  # (P, V)
        onehot = np.eye(p0.shape[1])[ds["probe_label"].values.astype(int)]
        numbers["energy_start"] = float(np.linalg.norm(onehot - p0, axis=1).mean())
        verdict += f"; the head's energy at the start E_0 = mean ‖e_y − p_0‖ = {numbers['energy_start']:.2f}"
    return Diagnostic("feature_adaptation", {"steps": steps, "groups": per_group}, numbers, verdict + ".")


def learning_paths(ds: xr.Dataset, *, ema: float = 0.95) -> Diagnostic:
    """Per-example prediction paths of a classifier in the simplex (DESIGN §4 item 10).

    For probe o with label y and distributions q_t = π(·|x_o) at the checkpoints: path length Σ_t ‖q_{t+1} − q_t‖₁,
    net displacement ‖q_T − q_0‖₁, zig-zag score = path / net (1 = a straight path), the peak mass on a non-label
    class before the end, and the Filter-KD target q̄ ← ema·q̄ + (1 − ema)·q_t. Tables: ``probes`` (one row per
    probe: group, zigzag, peak_rival, p_label_end, p_label_ema) and ``paths`` (step, probe, p_label, p_rival).
    """
    if (d := _needs(ds, "learning_paths", ["logp_class", "probe_label"], "needs classifier probes (per-class log-probabilities and labels)")) is not None:
        return d
    q = np.exp(ds["logp_class"].values)  # (C, P, V)
    labels = ds["probe_label"].values.astype(int)
    n_ckpt, n_probe, _ = q.shape
    if n_ckpt < 3:
        return Diagnostic.absent("learning_paths", "needs at least three checkpoints to tell a path from a step")
    steps = np.abs(np.diff(q, axis=0)).sum(-1)  # (C-1, P)
    net = np.abs(q[-1] - q[0]).sum(-1)
    zigzag = steps.sum(0) / np.maximum(net, 1e-12)
    p_label = q[:, np.arange(n_probe), labels]  # (C, P)
    rival = q.copy()
    rival[:, np.arange(n_probe), labels] = -1
    p_rival = rival.max(-1)  # (C, P) largest non-label mass
    q_bar = ema_targets(q, ema)  # (P, V): the Filter-KD target, as `ckptforce export filter-kd` writes it
    groups = _probe_labels(ds)
    probes = pd.DataFrame({"probe": ds["probe"].values.astype(str), "group": groups, "zigzag": zigzag,
                           "peak_rival": p_rival[:-1].max(0), "p_label_end": p_label[-1],
                           "p_label_ema": q_bar[np.arange(n_probe), labels]})  # fmt: skip
    step = ds["step"].values
    paths = pd.DataFrame({"step": np.repeat(step, n_probe), "probe": np.tile(probes["probe"], n_ckpt),
                          "group": np.tile(groups, n_ckpt), "p_label": p_label.ravel(), "p_rival": p_rival.ravel()})  # fmt: skip
    by_group = probes.groupby("group")["zigzag"].median()
    numbers = {f"zigzag_{g}": float(v) for g, v in by_group.items()}
    worst = probes.sort_values("zigzag", ascending=False).iloc[0]
    verdict = "median zig-zag score " + ", ".join(f"{v:.2f} ({g})" for g, v in by_group.items())
    if {"flipped", "clean"} <= set(by_group.index):
        more = by_group["flipped"] > by_group["clean"]
        verdict += f": flipped-label probes take {'longer, more winding' if more else 'no more winding'} paths than clean ones"
    verdict += f"; the most winding is {worst['probe']} (score {worst['zigzag']:.1f}, peak rival mass {worst['peak_rival']:.2f})"
    return Diagnostic("learning_paths", {"probes": probes, "paths": paths}, numbers, verdict + ".")
