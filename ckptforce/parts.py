"""Part files: one small HDF5 file per checkpoint pair, written atomically, and their consolidation.

An analysis writes ``OUT.parts/interval-NNNNNN.h5`` as each pair is done, with the settings in
``OUT.parts/config.json``; a rerun computes only the missing parts and refuses parts made with other
settings or for other checkpoints; ``merge_parts`` reads each part once into one dataset (DESIGN §5: xarray
cannot append to an HDF5 file, and appends are lost on a crash).
"""

from __future__ import annotations

import json
from pathlib import Path

import xarray as xr

from . import cube
from .errors import CkptforceError

PARTS_SUFFIX = ".parts"


class ConfigMismatchError(CkptforceError, ValueError):
    """Existing parts were computed with other settings than this run asks for."""


def parts_dir(out: Path) -> Path:
    return out.with_name(out.name + PARTS_SUFFIX)


def part_path(out: Path, k: int) -> Path:
    return parts_dir(out) / f"interval-{k:06d}.h5"


def check_or_write_config(out: Path, config) -> None:
    """Refuse to mix settings into existing parts; record the settings for a new analysis."""
    folder = parts_dir(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CkptforceError(f"{folder}: cannot create the folder for the parts ({e.strerror or e}); "
                             "choose an -o in a writable directory") from e  # fmt: skip
    marker = folder / "config.json"
    if marker.is_file() and any(folder.glob("interval-*.h5")):  # no part yet: nothing to mix, start afresh
        diffs = config.differences(json.loads(marker.read_text()))
        if diffs:
            raise ConfigMismatchError(
                f"{folder} holds parts computed with other settings ({'; '.join(diffs)}); rerun with the same "
                f"settings to resume, or delete {folder} (or choose another -o) to start over"
            )
        return
    tmp = marker.with_suffix(".json.partial")
    try:
        tmp.write_text(config.to_json())
        tmp.replace(marker)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CkptforceError(f"{marker}: cannot write ({e.strerror or e}); "
                             "choose an -o in a writable directory with free space") from e  # fmt: skip


def check_parts_match(out: Path, run) -> None:
    """Refuse parts computed for other checkpoint pairs (checkpoints added or removed since they were made)."""
    for k in range(len(run.checkpoints) - 1):
        part = part_path(out, k)
        if not part.is_file():
            continue
        try:
            with xr.open_dataset(part, engine=cube.ENGINE) as ds:
                had = [str(x) for x in ds["checkpoint_path"].values]
        except Exception as e:  # noqa: BLE001 - h5py / h5netcdf raise many kinds for a damaged file
            raise CkptforceError(f"{part}: a part that cannot be read ({type(e).__name__}); "
                                 "delete it and rerun to recompute it") from e  # fmt: skip
        now = [str(r.path) for r in run.checkpoints[k : k + 2]]
        if had != now:
            raise ConfigMismatchError(
                f"{part}: computed for {' → '.join(had)}, but interval {k} of the run is now {' → '.join(now)} (its "
                f"checkpoints changed); delete {parts_dir(out)} (or choose another -o) to start over"
            )


def missing_parts(out: Path, n_intervals: int) -> list[int]:
    """Intervals without a complete part (a part is complete once its final name exists)."""
    return [k for k in range(n_intervals) if not part_path(out, k).is_file()]


def merge_parts(out: Path, n_intervals: int, anatomy_ds: xr.Dataset) -> xr.Dataset:
    """The parts (each read once) and the update anatomy as one dataset; the parts' attributes are dropped."""
    parts = []
    for k in range(n_intervals):
        with xr.open_dataset(part_path(out, k), engine=cube.ENGINE) as ds:
            parts.append(ds.load())
    per_ckpt = [n for n, v in parts[0].data_vars.items() if "checkpoint" in v.dims]
    per_iv = [n for n, v in parts[0].data_vars.items() if "interval" in v.dims]
    ckpt = xr.concat([d[per_ckpt] for d in parts], dim="checkpoint", coords="minimal", compat="override", join="outer")
    ckpt = ckpt.drop_duplicates("checkpoint", keep="last")  # part k+1 computed its start's kernel; logp agree
    iv = xr.concat([d[per_iv] for d in parts], dim="interval", coords="minimal", compat="override", join="outer")
    static = [n for n, v in parts[0].data_vars.items() if "checkpoint" not in v.dims and "interval" not in v.dims]  # per example
    merged = xr.merge([ckpt, iv, parts[0][static], anatomy_ds], compat="override", join="outer", combine_attrs="drop")
    notes = list(dict.fromkeys(n for d in parts for n in json.loads(d.attrs.get("training_notes", "[]"))))
    extra = {k: parts[0].attrs[k] for k in ("objective", "kernel_method", "feature_layer") if k in parts[0].attrs}
    if "kernel_approximate" in parts[0].attrs:
        extra["kernel_approximate"] = int(max(int(d.attrs["kernel_approximate"]) for d in parts))
    for key in ("preconditioner", "split_method"):  # the distinct values over the intervals (a part of an older version may lack one)
        values = [str(d.attrs[key]) for d in parts if key in d.attrs]
        if values:
            extra[key] = ",".join(dict.fromkeys(values))
    return merged.assign_attrs(jvp_method=parts[0].attrs.get("jvp_method", ""), training_notes=json.dumps(notes), **extra)
