"""The installed console script, run as a user would, on the bundled sample run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

SAMPLE = Path(__file__).parents[1] / "sample_runs" / "tiny-gpt2-trainer"


def _ckptforce(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("ckptforce")
    assert exe, "the ckptforce console script is not installed: pip install -e ."
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)


def test_console_script_scans_sample_run():
    out = _ckptforce("scan", str(SAMPLE), "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["layout"] == "hf"
    assert [c["step"] for c in summary["checkpoints"]] == [2, 4, 6]
    assert summary["optimizers"][0]["kind"] == "adam"


def test_console_script_table_and_error():
    table = _ckptforce("scan", str(SAMPLE))
    assert table.returncode == 0 and "checkpoint-6" in table.stdout
    bad = _ckptforce("scan", str(SAMPLE / "does-not-exist"))
    assert bad.returncode == 2
    assert bad.stderr.startswith("ckptforce: error: ") and "Traceback" not in bad.stderr
