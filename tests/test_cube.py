"""The cube: names declared once, CF attributes, a plain-xarray round trip, and clear errors for files that
are not cubes."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import xarray as xr

from ckptforce import cube


def _small() -> xr.Dataset:
    rng = np.random.default_rng(0)
    return cube.build(
        index={"checkpoint": [0, 1, 2], "interval": [0, 1], "probe": ["q1", "q2"], "response": ["chosen", "argmax"], "tensor": ["w", "b"]},
        coords={"step": [0, 10, 20], "step_source": ["init", "name", "name"], "step_from": [0, 10], "step_to": [10, 20], "lr": [0.1, np.nan]},
        data={"logp": rng.normal(size=(3, 2, 2)), "dlogp_obs": rng.normal(size=(2, 2, 2)), "update_norm": rng.random((2, 2))},
        attrs=cube.provenance(tool_version="0.1.0", config={"nodes": 3, "by_tensor": True}, flag=True),
    )


def test_round_trip_with_plain_xarray(tmp_path):
    ds = _small()
    path = cube.save(ds, tmp_path / "cube.h5")
    with xr.open_dataset(path, engine="h5netcdf") as back:
        xr.testing.assert_identical(back.load(), ds)
        assert back["logp"].attrs == {"long_name": cube.VARS["logp"].long_name, "units": "nat"}
        assert back["logp"].encoding["zlib"] and back["logp"].encoding["chunksizes"] == (1, 2, 2)
    assert cube.open_cube(path).attrs["flag"] == "true"
    assert not [p for p in tmp_path.iterdir() if p.name != "cube.h5"], "a temporary file was left behind"


def test_every_name_is_declared():
    with pytest.raises(KeyError, match="not cube names: \\['logprob'\\]"):
        cube.build(index={"checkpoint": [0]}, data={"logprob": np.zeros(1)})
    assert set(cube.COORDS) <= set(cube.VARS)
    for var in cube.VARS.values():
        assert set(var.dims) <= set(cube.DIMS)


@pytest.mark.skipif(shutil.which("ncdump") is None or shutil.which("h5dump") is None, reason="netcdf-bin / hdf5-tools not installed (.ci/run installs them)")
def test_readable_by_the_netcdf_and_hdf5_tools(tmp_path):
    path = cube.save(_small(), tmp_path / "cube.h5")
    header = subprocess.run(["ncdump", "-h", str(path)], capture_output=True, text=True, check=True).stdout
    assert "double logp(checkpoint, probe, response)" in header and 'logp:units = "nat"' in header
    h5 = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, check=True).stdout
    assert 'DATASET "dlogp_obs"' in h5


def test_foreign_damaged_and_newer_files_are_explained(tmp_path):
    foreign = tmp_path / "foreign.h5"
    xr.Dataset({"x": ("a", [1.0, 2.0])}).to_netcdf(foreign, engine="h5netcdf")
    with pytest.raises(cube.CubeError, match="not a ckptforce cube .* written by another tool"):
        cube.open_cube(foreign)

    newer = _small()
    newer.attrs["ckptforce_schema"] = cube.SCHEMA_VERSION + 1
    cube.save(newer, tmp_path / "newer.h5")
    with pytest.raises(cube.CubeError, match="written by a newer ckptforce .* upgrade ckptforce"):
        cube.open_cube(tmp_path / "newer.h5")

    good = cube.save(_small(), tmp_path / "good.h5")
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(cube.CubeError, match="truncated.h5: not a readable HDF5 cube"):
        cube.open_cube(truncated)

    altered = _small().rename_dims({"probe": "p"})
    with pytest.raises(AssertionError):
        assert not cube.validate(altered)
    assert any("has dims" in p for p in cube.validate(altered))


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(cube.CubeError, match="no such directory for the output"):
        cube.save(_small(), tmp_path / "nope" / "cube.h5")
