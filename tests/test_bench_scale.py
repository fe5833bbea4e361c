"""bench/scale.py end to end on the Llama path in miniature: the script a GPU session runs at 1B must run as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 2 min: a Trainer run of a tiny Llama in bfloat16, then four analyses of it
def test_scale_bench_runs_a_llama_in_bfloat16_with_every_case(tmp_path):
    if shutil.which("ckptforce") is None:
        pytest.skip("the ckptforce command is not installed")
    cmd = [sys.executable, str(ROOT / "bench" / "scale.py"), "--workdir", str(tmp_path), "--model", "llama-tiny", "--dtype", "bfloat16",
           "--probes", "4", "--long", "24", "--long-rows", "3", "--long-split", "--intervals", "1", "--no-split", "--train", "20",
           "--forces", "approximate"]  # fmt: skip
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    run = tmp_path / "llama-tiny-bfloat16" / "run"
    manifest = json.loads((run / "bench_manifest.json").read_text())
    assert (manifest["model"], manifest["dtype"], manifest["num_key_value_heads"]) == ("llama-tiny", "bfloat16", 2)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert "4 probes × 6 responses" in out, out
    assert "[forward]" in out and "for 24 rows" in out, out  # 4 probes × 6 responses, the unit of the ratios
    ratios = dict(re.findall(r"\[analyze ([^\]]+)\][^=]*= ([0-9.]+) forwards", out))
    assert set(ratios) == {"long, --nodes 2", "--train, 20 SFT examples, --forces approximate, 1 interval",
                           "default (split by tensor, 2 nodes)", "--no-by-tensor"}, out  # fmt: skip
    assert all(float(r) > 0 for r in ratios.values()), out
    error = re.search(r"‖approx − exact‖ / ‖exact‖ over the first examples ([0-9.]+)", out)
    assert error is not None and 0 <= float(error.group(1)) < 2, out
