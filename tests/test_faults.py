"""Faults: a process killed mid-write, a full disk. Nothing half-written under a final name, nothing lost.

* SIGKILL while ``analyze`` writes a part or the final cube (the final name stays absent), and while ``report``
  rewrites ``report.pdf`` (the complete previous file stays): a re-run completes, and its cube equals an
  uninterrupted one. The kill lands deterministically: the child process pauses right after writing the
  temporary file (before ``os.replace``) and says so through a flag file.
* ENOSPC from the writer (a patched ``xarray.Dataset.to_netcdf``) at the third part, or at the final cube:
  one clear line, exit 2, the parts already written are kept, and a re-run computes only what is missing.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xarray as xr
from click.testing import CliRunner

from ckptforce import pipeline
from ckptforce.cli import main
from ckptforce.cube import open_cube
from conftest import tree_digest
from fixtures.tiny_lm import FACTORY, write_id_probes, write_tiny_run

REPO = Path(__file__).parents[1]

#: A child that runs the CLI and pauses (flag file, then sleep) right after writing the temporary file of
#: the target, before it is renamed to its final name: a SIGKILL then lands mid-write, every time.
DRIVER = r"""
import os, sys, time
target, flag = os.environ["CKF_PAUSE_AT"], os.environ["CKF_FLAG"]

def pause(path):
    if os.path.basename(str(path)).startswith("." + target + "."):
        open(flag, "w").close()
        time.sleep(300)

import xarray as xr
to_netcdf = xr.Dataset.to_netcdf
def paused_to_netcdf(self, path=None, *a, **k):
    out = to_netcdf(self, path, *a, **k)
    pause(path)
    return out
xr.Dataset.to_netcdf = paused_to_netcdf

import ckptforce.report.pdf as pdf
write_pdf = pdf.write
def paused_pdf(ctx, path):
    write_pdf(ctx, path)
    pause(path)
pdf.write = paused_pdf

from ckptforce.cli import main
main(prog_name="ckptforce")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny 4-checkpoint run (3 intervals), its probes, and an uninterrupted cube of it."""
    base = tmp_path_factory.mktemp("faults")
    run = write_tiny_run(base / "run", steps=(10, 20, 30, 40))
    probes = write_id_probes(base / "probes.jsonl")
    reference = base / "reference.h5"
    result = CliRunner().invoke(main, _args(run, probes, reference))
    assert result.exit_code == 0, result.output
    return run, probes, reference


def _args(run: Path, probes: Path, out: Path) -> list[str]:
    return ["analyze", str(run), "--probes", str(probes), "--model", FACTORY, "-o", str(out), "-q"]


def _same_numbers(a: Path, b: Path) -> None:
    with xr.open_dataset(a, engine="h5netcdf") as x, xr.open_dataset(b, engine="h5netcdf") as y:
        xr.testing.assert_allclose(x.drop_attrs(deep=False), y.drop_attrs(deep=False), rtol=1e-6, atol=1e-7)


def _kill_while_writing(tmp_path: Path, target: str, args: list[str]) -> None:
    """Run ``ckptforce ARGS`` in a child, SIGKILL it while the temporary file of ``target`` is written."""
    flag = tmp_path / "paused"
    env = {**os.environ, "CKF_PAUSE_AT": target, "CKF_FLAG": str(flag),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 240
    while not flag.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert flag.exists(), f"the child never reached the write of {target}: {err.decode()[-2000:]}"


@pytest.mark.parametrize("target", ["interval-000001.h5", "cube.h5"])
def test_sigkill_during_analyze_leaves_no_half_file_and_resumes(setup, tmp_path, target):
    run, probes, reference = setup
    out = tmp_path / "cube.h5"
    parts = pipeline.parts_dir(out)
    before = tree_digest(run)
    _kill_while_writing(tmp_path, target, _args(run, probes, out))
    assert not out.exists(), "a cube appeared under its final name before it was complete"
    finished = sorted(p.name for p in parts.glob("interval-*.h5"))
    assert finished == (["interval-000000.h5"] if target.startswith("interval") else ["interval-000000.h5", "interval-000001.h5", "interval-000002.h5"])
    for p in parts.glob("interval-*.h5"):  # every part under its final name is complete
        with xr.open_dataset(p, engine="h5netcdf") as ds:
            ds.load()
    assert tree_digest(run) == before

    result = CliRunner().invoke(main, _args(run, probes, out))
    assert result.exit_code == 0, result.output
    open_cube(out)
    _same_numbers(out, reference)
    assert not parts.exists()


def _valid_pdf(path: Path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")


def _valid_html(path: Path) -> bool:
    return path.read_text(encoding="utf-8").rstrip().endswith("</html>")


def test_sigkill_during_report_keeps_the_previous_report_and_reruns(setup, tmp_path):
    analysed, out = setup[2], tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(analysed), "-o", str(out)])
    assert result.exit_code == 0, result.output
    previous = (out / "report.pdf").read_bytes()

    _kill_while_writing(tmp_path, "report.pdf", ["report", str(analysed), "-o", str(out)])
    assert (out / "report.pdf").read_bytes() == previous, "the PDF under its final name was touched before it was complete"
    assert _valid_pdf(out / "report.pdf") and _valid_html(out / "report.html")

    (out / "report.pdf").unlink()
    again = CliRunner().invoke(main, ["report", str(analysed), "-o", str(out)])
    assert again.exit_code == 0, again.output
    assert _valid_pdf(out / "report.pdf") and _valid_html(out / "report.html")


def _full_disk(at: int):
    """A ``Dataset.to_netcdf`` that raises ENOSPC on call number ``at`` (1-based), after starting the file."""
    real, calls = xr.Dataset.to_netcdf, []

    def to_netcdf(ds, path=None, *a, **k):
        calls.append(path)
        if len(calls) == at:
            Path(path).write_bytes(b"\x89HDF\r\n")  # the start of a file, as a full disk leaves it
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(ds, path, *a, **k)

    return to_netcdf


@pytest.mark.parametrize("at, failing, kept", [(3, "interval-000002.h5", 2), (4, "cube.h5", 3)])
def test_full_disk_is_one_line_keeps_parts_and_resumes(setup, tmp_path, monkeypatch, at, failing, kept):
    run, probes, reference = setup
    out = tmp_path / "cube.h5"
    parts = pipeline.parts_dir(out)
    monkeypatch.setattr(xr.Dataset, "to_netcdf", _full_disk(at))
    result = CliRunner().invoke(main, _args(run, probes, out))
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ckptforce: error: "), result.stderr
    assert failing in lines[0] and "No space left on device" in lines[0] and "free some space" in lines[0], lines[0]
    assert not out.exists()
    assert sorted(p.name for p in parts.iterdir() if p.name != "config.json") == [f"interval-{k:06d}.h5" for k in range(kept)]

    monkeypatch.undo()
    computed: list[int] = []
    real_part = pipeline.compute_part
    monkeypatch.setattr(pipeline, "compute_part", lambda cfg, k, *a, **kw: computed.append(k) or real_part(cfg, k, *a, **kw))
    again = CliRunner().invoke(main, _args(run, probes, out))
    assert again.exit_code == 0, again.output
    assert computed == list(range(kept, 3)), "the re-run recomputed parts that were already written"
    _same_numbers(out, reference)


def test_full_disk_during_report_is_one_line(setup, tmp_path, monkeypatch):
    analysed = setup[2]
    from ckptforce.report import pdf

    def full(ctx, path):
        Path(path).write_bytes(b"%PDF-1.4\n")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(pdf, "write", full)
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["report", str(analysed), "-o", str(out)])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "report.pdf" in lines[0] and "No space left on device" in lines[0], result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["report.html"]  # no half PDF, no temporary file left
    assert _valid_html(out / "report.html")
