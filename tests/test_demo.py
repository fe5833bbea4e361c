"""``ckptforce demo`` end to end on CPU, as a user runs it: the installed console script trains the sample runs
into a fresh cache, audits each, and the reports and their verdicts show what the runs are built to show."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("sklearn", reason="the digits sample run needs scikit-learn (the test extra installs it)")


@pytest.mark.slow  # 26 min on 2 busy cores (shared with other jobs): three recipes trained, seven audits
@pytest.mark.timeout(2400)
def test_demo_builds_audits_and_reports(tmp_path):
    exe = shutil.which("ckptforce") or pytest.skip("the ckptforce console script is not installed")
    env = {**os.environ, "CKPTFORCE_SAMPLE_RUNS": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "demo"
    done = subprocess.run([exe, "demo", "-o", str(out)], capture_output=True, text=True, timeout=2100, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = json.loads((out / "demo.json").read_text())
    assert [s["name"] for s in summaries] == ["sft", "dpo", "grpo", "digits-noisy", "digits-finetune", "compose-compositional", "compose-permuted"]
    for s in summaries:
        for key in ("cube", "html", "pdf"):
            assert Path(s[key]).is_file() and Path(s[key]).stat().st_size > 10_000, s[key]
            assert s[key] in done.stdout or key == "cube"
        assert "this diagnostic failed" not in Path(s["html"]).read_text()
    by = {s["name"]: s["verdicts"] for s in summaries}
    assert by["sft"]["hallucination"].startswith("hallucination signal")
    assert by["dpo"]["squeezing"].startswith("squeezing: log π(y*) rose")
    assert "flipped-label probes take longer, more winding paths" in by["digits-noisy"]["learning_paths"]
    assert "force_attribution" in by["sft"] and "force_attribution" in by["dpo"]
    lazy = re.match(r"(\d+) of (\d+) groups have lazy correct completions", by["grpo"]["lazy_displacement"])
    assert lazy and 0 < int(lazy[1]) <= int(lazy[2]) and "most harmful token: «" in by["grpo"]["lazy_displacement"], by["grpo"]
    grpo_html = Path(next(s["html"] for s in summaries if s["name"] == "grpo")).read_text()
    assert 'id="lazy_displacement"' in grpo_html and grpo_html.count("<mark>") >= 1
    assert "support each other more than across groups" in by["compose-compositional"]["mutual_support"]  # grouped by colour
    assert "support each other less than across groups" in by["compose-permuted"]["mutual_support"]
    comparison = summaries[-1]["comparison"]
    assert comparison == summaries[-2]["comparison"] and comparison in done.stdout
    assert comparison.startswith("compositional supports itself more within a meta.colour group than permuted"), comparison
    assert "compositional learned faster" in comparison, comparison
    rerun = subprocess.run([exe, "demo", "-o", str(tmp_path / "again"), "--only", "digits-noisy"], capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0 and "cached at" in rerun.stderr, rerun.stderr[-2000:]


def test_each_demo_audit_names_a_report_section_and_the_cli_offers_it():
    from click.testing import CliRunner

    from ckptforce.cli import main
    from ckptforce.demo import AUDITS
    from ckptforce.report.sections import SECTIONS

    keys = {s.key for s in SECTIONS}
    assert all(a.shows in keys for a in AUDITS), [a.shows for a in AUDITS if a.shows not in keys]
    help_text = CliRunner().invoke(main, ["demo", "--help"]).output
    assert all(a.name in help_text for a in AUDITS)
