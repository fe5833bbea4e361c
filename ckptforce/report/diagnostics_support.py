"""Mutual support between training examples (the simplicity-bias chapter of Ren, arXiv 2509.19554; Ren et al.,
arXiv 2409.09626): examples that share structure exert forces that align, so learning one pulls the others
toward their own targets, and the data that supports itself is learned first.

It needs an analysis whose probes are the training examples themselves (``analyze --probes train.jsonl --train
train.jsonl``: a TRL file is a probe file, its completion read as ``chosen``), so that ``force[interval, probe=v,
response, source=u]`` is the force of example u on example v's own target. With M[v, u] = Σ_intervals force on
v's first response type,

    self_v     = M[v, v]                      how much v's own steps raise its target
    support_v  = Σ_{u ≠ v} M[v, u]           how much the rest of the data helps (> 0) or fights (< 0) it
    within_g   = mean_{v, u ∈ g, u ≠ v} M[v, u]      across_g = mean_{v ∈ g, u ∉ g} M[v, u]

per group g (``--group-by``, else the probe group / split), and each example's learning speed from its own
log-likelihood over the checkpoints: the area, mean_t (ℓ_t − ℓ_0) / |y| (nats per token), and the first step at
which its mean token probability passes ½ (``fitted_step``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from ..ranks import spearman
from .diagnostics import Diagnostic, _fmt, _given, _needs, _probe_labels, probe_grouping

#: An example counts as fitted once its mean token log-probability reaches log ½.
FITTED_LOGP = float(np.log(0.5))


def mutual_support(ds: xr.Dataset, by: str | None = None) -> Diagnostic:
    """Tables ``examples`` (id, group, self, support, area, fitted_step), ``groups`` (group, within, across, n)
    and ``matrix`` (M, examples × examples); numbers and a verdict (module docstring)."""
    need = ["force", "logp", "logp_tok"]
    if (d := _needs(ds, "mutual_support", need, "needs training-example forces (analyze --train FILE)")) is not None:
        return d
    kind = ds["source_kind"].values.astype(str) if "source_kind" in ds.coords else np.full(ds.sizes["source"], "example")
    sources = [str(s) for s, k in zip(ds["source"].values, kind) if k == "example"]
    probes = [str(p) for p in ds["probe"].values]
    shared = [s for s in sources if s in set(probes)]
    if len(shared) < 2:
        return Diagnostic.absent("mutual_support", "needs the training examples as probes too: analyze --probes TRAIN --train TRAIN "
                                 "(the same file), so that each example's force on every other example's target is computed")  # fmt: skip
    focus = _given(ds)[0]
    m = ds["force"].sel(response=focus, probe=shared, source=shared).sum("interval", min_count=1).transpose("probe", "source").values
    off = ~np.eye(len(shared), dtype=bool)
    self_force = np.diag(m)
    support = np.where(off, m, 0.0).sum(1)
    where = [probes.index(s) for s in shared]
    groups = (probe_grouping(ds, by) if by else _probe_labels(ds))[where]
    logp = ds["logp"].sel(response=focus, probe=shared).transpose("checkpoint", "probe").values  # (C, N)
    length = np.maximum((ds["logp_tok"].isel(checkpoint=0).sel(response=focus, probe=shared) != 0).sum("token").values, 1)
    per_token = logp / length
    area = (per_token - per_token[:1]).mean(0)
    steps = ds["step"].values
    fitted = [float(steps[np.argmax(col >= FITTED_LOGP)]) if (col >= FITTED_LOGP).any() else np.nan for col in per_token.T]
    examples = pd.DataFrame({"example": shared, "group": groups, "self": self_force, "support": support, "area": area, "fitted_step": fitted})
    rows = []
    for g in sorted(set(groups)):
        inside = groups == g
        within = m[np.ix_(inside, inside)][off[np.ix_(inside, inside)]]
        across = m[np.ix_(inside, ~inside)].ravel()
        rows.append({"group": g, "n": int(inside.sum()), "within": float(within.mean()) if within.size else np.nan,
                     "across": float(across.mean()) if across.size else np.nan})  # fmt: skip
    group_table = pd.DataFrame(rows)
    within_all = float(np.nanmean(m[off & (groups[:, None] == groups[None, :])])) if (off & (groups[:, None] == groups[None, :])).any() else np.nan
    across_all = float(np.nanmean(m[groups[:, None] != groups[None, :]])) if (groups[:, None] != groups[None, :]).any() else np.nan
    rho = spearman(support, area)
    numbers = {"examples": float(len(shared)), "within": within_all, "across": across_all, "spearman_support_area": rho,
               "helped": float((support > 0).sum()), "fitted": float(np.isfinite(fitted).sum())}  # fmt: skip
    verdict = (f"{int(numbers['helped'])} of {len(shared)} training examples are helped by the rest of the data (Σ of the others' "
               f"forces on their own {focus} > 0); the support ranks their learning speed (log-likelihood area) with Spearman "
               f"{rho:+.2f}; {int(numbers['fitted'])} are fitted (mean token probability ≥ ½) by the last checkpoint")  # fmt: skip
    if np.isfinite(within_all) and np.isfinite(across_all):
        more = "more" if within_all > across_all else "less"
        verdict += f"; examples of one group support each other {more} than across groups ({_fmt(within_all)} vs {_fmt(across_all)} nats per pair)"
    matrix = pd.DataFrame(m, index=pd.Index(shared, name="on"), columns=pd.Index(shared, name="from"))
    return Diagnostic("mutual_support", {"examples": examples, "groups": group_table, "matrix": matrix}, numbers, verdict + ".")


def compare_support(runs: dict[str, xr.Dataset], by: str | None = None) -> Diagnostic:
    """Mutual support and learning speed of several runs side by side, each from its own cube (``mutual_support``
    of each, grouped by ``by``): e.g. the same model trained on a compositional mapping and on a permuted one.

    Table ``runs`` (run, examples, within, across, area = mean log-likelihood area in nats per token, fitted = how
    many examples are fitted by the last checkpoint, fitted_step = the median step at which they are, counting an
    unfitted example as never); the verdict ranks the runs by within-group support and says which learned fastest."""
    rows, absent = [], []
    for name, ds in runs.items():
        d = mutual_support(ds, by)
        if d.missing:
            absent.append(f"{name}: {d.missing}")
            continue
        ex = d.tables["examples"]
        steps = np.where(np.isfinite(ex["fitted_step"]), ex["fitted_step"], np.inf)
        rows.append({"run": name, "examples": int(d.numbers["examples"]), "within": d.numbers["within"], "across": d.numbers["across"],
                     "area": float(ex["area"].mean()), "fitted": int(d.numbers["fitted"]), "fitted_step": float(np.median(steps))})  # fmt: skip
    if len(rows) < 2:
        return Diagnostic.absent("compare_support", "needs two runs whose cubes hold mutual support; " + "; ".join(absent))
    table = pd.DataFrame(rows).sort_values("within", ascending=False, ignore_index=True)
    first, second = table.iloc[0], table.iloc[1]
    faster = table.sort_values(["area"], ascending=False).iloc[0]["run"]
    group = f"within a {by} group" if by else "within a group"

    def fitted(r) -> str:
        when = f"median step {r['fitted_step']:g}" if np.isfinite(r["fitted_step"]) else "the median example never"
        return f"{r['fitted']}/{r['examples']} fitted, {when}"

    verdict = (f"{first['run']} supports itself more {group} than {second['run']} ({_fmt(first['within'])} vs {_fmt(second['within'])} "
               f"nats per pair; across groups {_fmt(first['across'])} vs {_fmt(second['across'])}); {faster} learned faster "
               f"(log-likelihood area {_fmt(first['area'])} vs {_fmt(second['area'])} nats per token; {fitted(first)} vs {fitted(second)}).")  # fmt: skip
    numbers = {f"{r['run']}.{k}": float(r[k]) for r in rows for k in ("within", "across", "area", "fitted", "fitted_step")}
    return Diagnostic("compare_support", {"runs": table}, numbers, verdict, grouping=by or "")
