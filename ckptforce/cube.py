"""THE data model: every result lands in one labelled ``xarray.Dataset``, saved as HDF5 (netCDF4 via h5netcdf).

The names of DESIGN §6 are declared once here (``DIMS``, ``VARS``) with their dimensions, ``long_name`` and
``units``; builders turn plain arrays from the stages into a Dataset, ``save`` / ``open_cube`` write and read
it (gzip, chunked; the final file is replaced atomically), and ``validate`` explains what is wrong with a
foreign or damaged file. Nothing here imports torch: a user needs only xarray to read a cube::

    ds = xarray.open_dataset("cube.h5", engine="h5netcdf")
    ds.dlogp_obs.sel(response="chosen").mean("probe")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import xarray as xr

from .atomic import write_atomic
from .errors import CkptforceError
from .names import ARGMAX, RESPONSE_TYPES  # noqa: F401 - re-exported: the cube's response labels

SCHEMA_VERSION = 1
ENGINE = "h5netcdf"


class CubeError(CkptforceError, ValueError):
    """A file is not a ckptforce cube, is damaged, or was written by a newer version."""


@dataclass(frozen=True)
class Var:
    dims: tuple[str, ...]
    long_name: str
    units: str = ""


#: Dimensions, and what one element of each is.
DIMS = {
    "checkpoint": "a saved checkpoint, in step order",
    "interval": "a pair of consecutive checkpoints",
    "probe": "a probe example (its id)",
    "response": "a response type (chosen, rejected, …, argmax)",
    "tensor": "a parameter tensor (canonical name)",
    "token": "a response position",
    "source": "a training example or other source of force",
    "class": "a class of a classifier",
    "class_to": "a class, as the second index of a V×V matrix",
    "own_response": "a training example's own response (a preference pair's chosen, rejected; a GRPO group's completion_i)",
    "completion_token": "the i-th token of a GRPO completion",
    "topk": "rank in the next-token distribution (0: the most likely token)",
}

#: Coordinates and data variables: name -> dims, long_name, units. Declared once; builders and readers use these.
VARS: dict[str, Var] = {
    # coordinates
    "step": Var(("checkpoint",), "training step of the checkpoint"),
    "step_source": Var(("checkpoint",), "where the step came from (record, name, order, init)"),
    "checkpoint_path": Var(("checkpoint",), "checkpoint file or folder"),
    "step_from": Var(("interval",), "step at the start of the interval"),
    "step_to": Var(("interval",), "step at the end of the interval"),
    "lr": Var(("interval",), "learning rate over the interval", "1"),
    "probe_split": Var(("probe",), "split of the probe (train / test / …)"),
    "probe_group": Var(("probe",), "group (domain) of the probe"),
    "probe_prompt": Var(("probe",), "prompt text of the probe (empty when given as token ids)"),
    "response_text": Var(("probe", "response"), "response text (empty when given as token ids or computed)"),
    "probe_label": Var(("probe",), "class label of a classification probe"),
    "source_kind": Var(("source",), "example, momentum (optimizer carry-over) or weight_decay"),
    "source_prompt": Var(("source",), "prompt text of the training example"),
    # probes at each checkpoint
    "logp": Var(("checkpoint", "probe", "response"), "log-probability of the response, summed over its tokens", "nat"),
    "logp_tok": Var(("checkpoint", "probe", "response", "token"), "log-probability of each response token", "nat"),
    "entropy": Var(("checkpoint", "probe", "response", "token"), "entropy of the next-token distribution", "nat"),
    "top1": Var(("checkpoint", "probe", "response", "token"), "probability of the most likely next token", "1"),
    "peakiness": Var(("checkpoint", "probe", "response", "token"), "‖A‖_F² = V‖π‖² + V − 2 of the next-token distribution", "1"),
    "topk_token": Var(("checkpoint", "probe", "response", "token", "topk"), "token id of the k-th most likely next token (--topk; float, NaN where absent)"),
    "topk_logp": Var(("checkpoint", "probe", "response", "token", "topk"), "log-probability of the k-th most likely next token (--topk)", "nat"),
    "logp_class": Var(("checkpoint", "probe", "class"), "log-probability of each class (classifiers)", "nat"),
    # changes over each interval
    "dlogp_obs": Var(("interval", "probe", "response"), "observed change of log π(y|x)", "nat"),
    "dlogp_lin": Var(("interval", "probe", "response"), "first-order prediction A·J·Δθ of the change", "nat"),
    "dlogp_path": Var(("interval", "probe", "response"), "path-integrated prediction (Gauss–Legendre)", "nat"),
    "dlogp_lin_tok": Var(("interval", "probe", "response", "token"), "first-order prediction per response token", "nat"),
    "dlogp_lin_tensor": Var(("interval", "probe", "response", "tensor"), "first-order prediction split by parameter tensor", "nat"),
    "dlogp_path_tensor": Var(("interval", "probe", "response", "tensor"), "path-integrated change split by parameter tensor", "nat"),
    "remainder_ratio": Var(("interval",), "‖Δ_obs − Δ_lin‖ / ‖Δ_obs‖ over probes and responses", "1"),
    # feature adaptation (--feature-layer): the named layer's output z against z_0 at the first checkpoint
    "feature_norm": Var(("checkpoint", "probe"), "‖z‖ of the probe's features at the named layer"),
    "feature_drift": Var(("checkpoint", "probe"), "‖z − z_0‖: distance from the features at the first checkpoint"),
    "feature_one_minus_cos": Var(("checkpoint", "probe"), "1 − cos(z, z_0)", "1"),
    "feature_dot": Var(("checkpoint", "probe"), "z · z_0"),
    # small-vocabulary classifiers with --train: the full matrices of DESIGN §1 at the interval's start
    "a_class": Var(("interval", "probe", "class", "class_to"), "A(x_o) = I − 1π_oᵀ", "1"),
    "g_class": Var(("interval", "source", "class"), "G(x_u, y_u) = π_u − e_{y_u}", "1"),
    "k_class": Var(("interval", "probe", "source", "class", "class_to"), "K(x_o, x_u) = J_o J_uᵀ (empirical NTK on the logits)"),
    # update anatomy
    "update_norm": Var(("interval", "tensor"), "‖Δθ‖₂ of the tensor over the interval"),
    "param_norm": Var(("interval", "tensor"), "‖θ‖₂ of the tensor at the start of the interval"),
    "update_cos": Var(("interval", "tensor"), "cosine of the tensor's update with the previous interval's", "1"),
    "zero_frac": Var(("interval", "tensor"), "share of exactly-zero update entries", "1"),
    # training-example forces (analyze --train)
    "force": Var(("interval", "probe", "response", "source"), "force of each source on each probe: A·J·δθ_source", "nat"),
    "force_pos": Var(("interval", "probe", "response", "source"), "force of the source's positive part (responses pulled up)", "nat"),
    "force_neg": Var(("interval", "probe", "response", "source"), "force of the source's negative part (responses pushed down)", "nat"),
    "dlogp_unexplained": Var(("interval", "probe", "response"), "Δ_lin minus the sum of every source's force", "nat"),
    "force_pos_tok": Var(("interval", "probe", "response", "token"), "Σ over training examples of their positive parts, per response token", "nat"),
    "force_neg_tok": Var(("interval", "probe", "response", "token"), "Σ over training examples of their negative parts, per response token", "nat"),
    "g_gap": Var(("interval", "source"), "mean ‖π − e_y‖ over the tokens of the responses the example pulls up", "1"),
    "g_one_minus_p": Var(("interval", "source"), "mean 1 − π(y) over the tokens of the responses the example pulls up", "1"),
    "g_neg_rank": Var(("interval", "source"), "mean rank under π of the tokens the example pushes down (1 = argmax)", "1"),
    "dpo_margin": Var(("interval", "source"), "preference margin h of policy against reference log-ratios", "nat"),
    "dpo_weight": Var(("interval", "source"), "σ(−βh): how hard a preference pair still pushes", "1"),
    # likelihood displacement of preference pairs (analyze --train with dpo / ipo / simpo): displacement.py
    "ches": Var(("checkpoint", "source"), "CHES = ⟨S⁺, S⁻⟩ − ‖S⁺‖², S± the last hidden states summed over the pair's response positions"),
    "ches_ln": Var(("checkpoint", "source"), "length-normalised CHES: ⟨S⁺/|y⁺|, S⁻/|y⁻|⟩ − ‖S⁺/|y⁺|‖²"),
    "self_force": Var(("interval", "source", "own_response"), "force of the pair's own update on its own chosen / rejected log π", "nat"),
    "self_force_pos": Var(("interval", "source", "own_response"), "the same, of the pair's positive part (w > 0: pulled up; DPO's chosen)", "nat"),
    "self_force_neg": Var(("interval", "source", "own_response"), "the same, of the pair's negative part (w < 0: pushed down; DPO's rejected)", "nat"),
    "displaces_chosen": Var(("interval", "source"), "1 where the pair's own update lowers its chosen log π, else 0 (NaN: not used in the interval)", "1"),
    "force_approx_error": Var(("interval",), "with --forces approximate: ‖approximate − exact‖ / ‖exact‖ of the forces of the first 8 examples (NaN: exact)", "1"),
    "ches_spearman": Var(("interval",), "Spearman correlation of CHES at the interval's start with −self_force on chosen", "1"),
    "ches_ln_spearman": Var(("interval",), "the same for the length-normalised CHES", "1"),
    "ches_topk_overlap": Var(("interval",), "share of the k pairs displacing chosen most that CHES also ranks in its top k", "1"),
    "ches_topk": Var(("interval",), "k of the top-k overlap: the pairs displacing chosen (5 when none does)", "1"),
    # lazy likelihood displacement of GRPO groups (analyze --train with grpo): lld.py
    "rollout_reward": Var(("source", "own_response"), "reward of each completion of the group"),
    "rollout_advantage": Var(("source", "own_response"), "group-normalised advantage Â = (r − r̄)/(s_r + 1e-4) of each completion", "1"),
    "rollout_logp": Var(("checkpoint", "source", "own_response"), "log π(y_i|x) of each completion", "nat"),
    "rollout_entropy": Var(("checkpoint", "source", "own_response"), "mean entropy of the policy along the completion", "nat"),
    "rollout_top1": Var(("checkpoint", "source", "own_response"), "mean largest probability of the policy along the completion", "1"),
    "rollout_token": Var(("source", "own_response", "completion_token"), "text of each completion token"),
    "lld": Var(("interval", "source"), "the group's own first-order change of its correct completions' log π (mean over them)", "nat"),
    "lld_pos": Var(("interval", "source"), "the same, of the group's positive part (Â > 0 completions pulled up)", "nat"),
    "lld_neg": Var(("interval", "source"), "the same, of the group's negative part (Â < 0 completions pushed down)", "nat"),
    "lld_observed": Var(("interval", "source"), "observed change of the group's correct completions' log π over the interval (mean)", "nat"),
    "token_force": Var(("interval", "source", "own_response", "completion_token"), "force of each completion token on the group's correct completions (Σ log π)", "nat"),
    "nthr": Var(("interval", "source", "own_response", "completion_token"), "NTHR: Σ_j Σ_k' α⟨h⁺, h⟩ of each token with the correct completions (last layer, at the interval's start)"),
    "nthr_spearman": Var(("interval",), "Spearman correlation of NTHR with −token_force over the negative completions' tokens", "1"),
    "nthr_topk_overlap": Var(("interval",), "share of the 10 negative tokens dragging the correct completions most that NTHR also ranks in its top 10", "1"),
    "kernel": Var(("checkpoint", "probe", "source"), "⟨∇θ log π(y_o|x_o), ∇θ L(x_u)⟩"),
    "kernel_cos": Var(("checkpoint", "probe", "source"), "cosine of the two gradients", "1"),
    "kernel_tracin": Var(("probe", "source"), "TracIn: Σ_t η_t ⟨∇θ log π(y_o|x_o), ∇θ L(x_u)⟩ over the checkpoints starting an interval"),
}

#: Labels a user keeps with their data (``meta`` fields, extra columns: ``labels.py``) are text coordinates along
#: these dimensions, named ``{dim}:{label}`` (``probe:meta.attr``, ``source:train_index``); declared by this rule
#: rather than one by one, since their names come from the user's files.
LABEL_DIMS = ("probe", "source")


def label_coord(dim: str, label: str) -> str:
    """The cube's name of a user label along ``dim``: ``label_coord("probe", "meta.attr") == "probe:meta.attr"``."""
    assert dim in LABEL_DIMS, dim
    return f"{dim}:{label}"


def label_coords(dim: str, table: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """``{label: values}`` as coordinates of ``build``."""
    return {label_coord(dim, name): values for name, values in table.items()}


def labels(ds: xr.Dataset, dim: str) -> dict[str, np.ndarray]:
    """The user's labels along ``dim`` in a cube: ``{label: text per element}``."""
    prefix = f"{dim}:"
    return {str(n)[len(prefix):]: ds[n].values.astype(str) for n in ds.coords if str(n).startswith(prefix)}


def _label_dims(name: str) -> tuple[str, ...] | None:
    dim = name.split(":", 1)[0] if ":" in name else None
    return (dim,) if dim in LABEL_DIMS else None


COORDS = ("step", "step_source", "checkpoint_path", "step_from", "step_to", "lr", "probe_split", "probe_group", "probe_prompt",
          "response_text", "source_kind", "source_prompt", "probe_label")  # fmt: skip


def build(
    *,
    index: Mapping[str, list],
    data: Mapping[str, np.ndarray],
    coords: Mapping[str, np.ndarray | list] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """A cube from plain arrays: ``index`` gives the labels of each dimension used (``probe`` ids, ``response``
    types, ``tensor`` names …), ``data`` and ``coords`` arrays keyed by names of ``VARS``; their dims follow."""
    unknown = [n for n in [*data, *(coords or {})] if n not in VARS and not (n in (coords or {}) and _label_dims(n))]
    if unknown:
        raise KeyError(f"not cube names: {unknown}; declare them in ckptforce.cube.VARS")
    ds = xr.Dataset(coords={dim: list(labels) for dim, labels in index.items()})
    for name, values in (coords or {}).items():
        if name in VARS:
            ds = ds.assign_coords({name: (VARS[name].dims, np.asarray(values))})
        else:  # a user label: text
            ds = ds.assign_coords({name: (_label_dims(name), np.asarray(values, dtype=str))})
    for name, values in data.items():
        ds[name] = (VARS[name].dims, np.asarray(values))
    return describe(ds.assign_attrs(dict(attrs or {})))


def describe(ds: xr.Dataset) -> xr.Dataset:
    """Attach ``long_name`` / ``units`` to every known variable and coordinate (CF style)."""
    for name in [*ds.data_vars, *ds.coords]:
        var = VARS.get(name)
        if var is not None:
            ds[name].attrs.update({"long_name": var.long_name, **({"units": var.units} if var.units else {})})
        elif name in DIMS:
            ds[name].attrs["long_name"] = DIMS[name]
        elif _label_dims(str(name)):
            ds[name].attrs["long_name"] = f"label '{str(name).split(':', 1)[1]}' of each {_label_dims(str(name))[0]}, from the user's file"
    ds.attrs.setdefault("ckptforce_schema", SCHEMA_VERSION)
    ds.attrs.setdefault("Conventions", "CF-1.10")
    return ds


def provenance(**fields: Any) -> dict[str, str | int | float]:
    """HDF5-safe attributes: strings and numbers as they are, anything structured as a JSON string."""
    out: dict[str, str | int | float] = {}
    for key, value in fields.items():
        out[key] = value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else json.dumps(value, sort_keys=True, default=str)
    return out


def save(ds: xr.Dataset, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``ds`` to ``path`` atomically: a temporary file beside it, then ``os.replace``."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CubeError(f"{path.parent}: no such directory for the output; create it or choose another -o path")
    encoding = {}
    if compress:
        for name, var in ds.data_vars.items():
            if var.dtype.kind in "fiub" and var.ndim:
                encoding[name] = {"compression": "gzip", "compression_opts": 4, "chunksizes": _chunks(var)}
    return write_atomic(path, lambda tmp: ds.to_netcdf(tmp, engine=ENGINE, encoding=encoding), error=CubeError)


def _chunks(var: xr.DataArray) -> tuple[int, ...]:
    """One interval / checkpoint per chunk along the leading dim, whole along the others (they are small)."""
    return tuple(1 if i == 0 and var.ndim > 1 else s for i, s in enumerate(var.shape))


def open_cube(path: str | Path) -> xr.Dataset:
    """Open and validate a cube (loaded into memory; the file is closed)."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a cube" if path.is_dir() else "no such file"
        raise CubeError(f"{path}: {what}; give a cube written by ckptforce analyze")
    try:
        # phony_dims: a foreign HDF5 file (dimensionless datasets) opens, and is then refused by validate()
        with xr.open_dataset(path, engine=ENGINE, phony_dims="access") as ds:
            ds = ds.load()
    except Exception as e:  # noqa: BLE001 - h5py / h5netcdf raise many kinds for a damaged file
        first = (str(e).splitlines() or [""])[0][:120]
        raise CubeError(f"{path}: not a readable HDF5 cube ({type(e).__name__}: {first}); it may be truncated: "
                        "rerun ckptforce analyze to write it again") from e  # fmt: skip
    problems = validate(ds)
    if problems:
        raise CubeError(f"{path}: {problems[0]}")
    return ds


def validate(ds: xr.Dataset) -> list[str]:
    """What is wrong with ``ds`` as a cube (empty when nothing is)."""
    problems = []
    version = ds.attrs.get("ckptforce_schema")
    if version is None:
        return ["not a ckptforce cube (no 'ckptforce_schema' attribute); it was written by another tool: "
                "give a cube written by ckptforce analyze"]  # fmt: skip
    try:
        version = int(version)
    except (TypeError, ValueError):
        return [f"cube schema version {version!r} is not a number; the file was altered: rerun ckptforce analyze"]
    if version > SCHEMA_VERSION:
        return [f"written by a newer ckptforce (cube schema {version}, this one reads ≤ {SCHEMA_VERSION}); upgrade ckptforce"]
    for name, var in ds.variables.items():
        want = VARS.get(name) or (Var(_label_dims(name), "") if _label_dims(name) else None)
        if want is not None and tuple(var.dims) != want.dims:
            problems.append(f"variable {name!r} has dims {tuple(var.dims)}, expected {want.dims}; the file was altered")
    if "step" in ds.coords and ds.sizes.get("checkpoint", 0) > 1 and not bool((np.diff(ds["step"].values) > 0).all()):
        problems.append("steps are not increasing along 'checkpoint'; the file was altered")
    return problems
