"""Reports: each diagnostic on a hand-made cube with a known answer; HTML escaping; the CLI; and one end to
end run on a real TRL run, rendered in headless Chromium (screenshot, images decoded, no console errors)
and as a PDF converted with pdftoppm (a page per section)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from ckptforce import cube
from ckptforce.cli import main
from ckptforce.report import diagnostics as dg
from ckptforce.report import diagnostics_train as dt
from ckptforce.report.context import gather
from ckptforce.report.html import render
from ckptforce.report.sections import SECTIONS
from conftest import tree_digest

pytestmark = pytest.mark.filterwarnings("ignore")

TYPES = ["chosen", "rejected", "other_trained", "other_untrained", "random", "argmax"]


def make_cube(logp: np.ndarray, *, responses=TYPES, steps=None, split=None, group=None, prompts=None, **data) -> xr.Dataset:
    """A cube from logp (checkpoint, probe, response); dlogp_obs is its diff; other variables as given."""
    c, p, _ = logp.shape
    steps = list(range(0, 10 * c, 10)) if steps is None else steps
    full = {"logp": logp, "dlogp_obs": np.diff(logp, axis=0), **data}
    index = {"checkpoint": list(range(c)), "interval": list(range(c - 1)), "probe": [f"p{i}" for i in range(p)], "response": list(responses)}
    if "update_norm" in data:
        index["tensor"] = [f"t{i}" for i in range(data["update_norm"].shape[1])]
    if "dlogp_lin_tensor" in data:
        index["tensor"] = [f"t{i}" for i in range(data["dlogp_lin_tensor"].shape[-1])]
    coords = {
        "step": steps, "step_from": steps[:-1], "step_to": steps[1:], "probe_split": split or ["train"] * p,
        "probe_group": group or [""] * p, "probe_prompt": prompts or [f"prompt {i}" for i in range(p)],
        "response_text": [[f"{r} {i}" for r in responses] for i in range(p)],
    }  # fmt: skip
    return cube.build(index=index, data=full, coords=coords, attrs={"run_dir": "/runs/x", "warnings": json.dumps(["a caveat"])})


def _linear(start: dict[str, float], end: dict[str, float], probes: int = 4, checkpoints: int = 3, responses=TYPES) -> np.ndarray:
    """logp moving linearly from start[type] to end[type], the same on every probe."""
    t = np.linspace(0, 1, checkpoints)[:, None, None]
    a = np.array([start.get(r, -5.0) for r in responses])[None, None, :]
    b = np.array([end.get(r, -5.0) for r in responses])[None, None, :]
    return np.broadcast_to(a + (b - a) * t, (checkpoints, probes, len(responses))).copy()


# --- diagnostics on hand-made cubes ---------------------------------------------------------------------


def test_trajectories_report_each_types_change():
    ds = make_cube(_linear({"chosen": -4, "rejected": -3}, {"chosen": -1, "rejected": -5}))
    d = dg.trajectories(ds)
    assert d.numbers["change_chosen"] == pytest.approx(3.0) and d.numbers["change_rejected"] == pytest.approx(-2.0)
    assert "chosen +3.00" in d.verdict and "rejected −2.00" in d.verdict
    mean = d.tables["mean"]
    assert set(mean["step"]) == {0, 10, 20} and (mean["n"] == 4).all()


def test_squeezing_index_and_verdict():
    ds = make_cube(_linear({"argmax": -3}, {"argmax": -1, "chosen": -6, "rejected": -8, "other_trained": -6, "other_untrained": -6, "random": -7}))
    d = dg.squeezing(ds)
    # types other than argmax fell by 1, 3, 1, 1, 2 (mean 1.6); y* rose by 2
    assert d.numbers["dlogp_argmax"] == pytest.approx(2.0)
    assert d.numbers["squeeze_index"] == pytest.approx(2.0 + 1.6)
    assert d.numbers["types_fell"] == 5
    assert d.verdict.startswith("squeezing: log π(y*) rose 2.00 nats while 5 of 5 response types fell")


def test_squeezing_names_a_collapse_and_its_absence():
    logp = _linear({"argmax": -3}, {"argmax": -1, "chosen": -6})
    c, p, r = logp.shape
    top1 = np.empty((c, p, r, 2))
    top1[0], top1[1], top1[2] = 0.3, 0.7, 0.97
    d = dg.squeezing(make_cube(logp, top1=top1))
    assert d.verdict.startswith("collapse:") and d.numbers["top1_end"] == pytest.approx(0.97)
    rose = dg.squeezing(make_cube(_linear({}, {"argmax": -4, "chosen": -4, "rejected": -4})))
    assert rose.verdict.startswith("no squeezing: log π(y*) rose")
    fell = dg.squeezing(make_cube(_linear({}, {"argmax": -6})))
    assert fell.verdict.startswith("no squeezing: log π(y*) changed −1.00")
    without = dg.squeezing(make_cube(_linear({}, {}, responses=["chosen", "rejected"]), responses=["chosen", "rejected"]))
    assert without.missing and "argmax" in without.missing


def test_hallucination_lift_per_interval_and_total():
    logp = _linear({"other_trained": -6, "other_untrained": -6}, {"other_trained": -4, "other_untrained": -5.5})
    d = dg.hallucination(make_cube(logp, split=["train", "train", "test", "test"]))
    assert d.numbers["lift"] == pytest.approx(1.5)
    per = d.tables["per_interval"]
    np.testing.assert_allclose(per["lift"], [0.75, 0.75])
    np.testing.assert_allclose(per["cumulative"], [0.75, 1.5])
    assert d.numbers["positive_intervals"] == 2 and d.verdict.startswith("hallucination signal")
    assert set(d.tables["per_split"]["split"]) == {"train", "test"}
    none = dg.hallucination(make_cube(_linear({"other_trained": -4}, {"other_trained": -6})))
    assert none.verdict.startswith("no hallucination signal: lift −2.00")
    absent = dg.hallucination(make_cube(_linear({}, {}, responses=["chosen", "other_trained"]), responses=["chosen", "other_trained"]))
    assert "other_untrained" in absent.missing


def test_forgetting_per_group():
    logp = _linear({}, {}, probes=4)
    logp[-1, :, 0] += [-1.0, -0.2, 0.3, -2.0]  # chosen: probes 0,1 in 'a', 2,3 in 'b'
    d = dg.forgetting(make_cube(logp, group=["a", "a", "b", "b"]), tau=0.5)
    groups = d.tables["groups"].set_index("group")
    assert groups.loc["a", "F_avg"] == pytest.approx(0.6) and groups.loc["a", "F_ratio"] == pytest.approx(0.5)
    assert groups.loc["b", "F_avg"] == pytest.approx(0.85) and groups.loc["b", "F_ratio"] == pytest.approx(0.5)
    assert d.numbers["forgot"] == 2
    assert d.verdict.startswith("forgetting: group 'b' lost 0.85 nats") and "2 of 4 probes" in d.verdict
    kept = dg.forgetting(make_cube(_linear({"chosen": -5}, {"chosen": -4})))
    assert kept.verdict.startswith("no forgetting")


def test_first_order_flags_poor_intervals_by_step():
    logp = _linear({"chosen": -5}, {"chosen": -3})
    obs = np.diff(logp, axis=0)
    d = dg.first_order(make_cube(logp, dlogp_lin=obs * 0.9, remainder_ratio=np.array([0.1, 0.7])))
    assert d.numbers["poor"] == 1 and d.numbers["max_ratio"] == pytest.approx(0.7)
    assert "poor on 1 of 2 intervals" in d.verdict and "steps 10→20" in d.verdict
    ok = dg.first_order(make_cube(logp, dlogp_lin=obs, remainder_ratio=np.array([0.1, 0.2])))
    assert ok.verdict.startswith("first-order prediction holds: remainder ratio ≤ 0.20 on all 2 intervals")
    assert "argmax" not in set(ok.tables["scatter"]["response"])


def test_tensor_split_names_the_leading_tensor():
    logp = _linear({}, {})
    split = np.zeros((2, 4, len(TYPES), 3))
    split[:, :, 0, :] = [0.1, -0.6, 0.3]  # chosen: t1 dominates (0.6 of 1.0 per interval)
    d = dg.tensor_split(make_cube(logp, dlogp_lin_tensor=split))
    assert d.numbers["lead"] == "t1" and d.numbers["lead_share"] == pytest.approx(0.6)
    assert d.tables["share"].loc["t1", "chosen"] == pytest.approx(-1.2)


def test_update_anatomy_relative_sizes_and_zigzag():
    logp = _linear({}, {})
    norm, param = np.array([[1.0, 0.1], [2.0, 0.1]]), np.array([[10.0, 10.0], [10.0, 10.0]])
    d = dg.update_anatomy(make_cube(logp, update_norm=norm, param_norm=param, update_cos=np.array([[np.nan, np.nan], [-0.8, -0.6]])))
    assert d.tables["relative"].loc["t0"].tolist() == pytest.approx([0.1, 0.2])
    np.testing.assert_allclose(d.tables["intervals"]["update_norm"], np.sqrt([1.01, 4.01]))
    assert d.numbers["mean_cos"] == pytest.approx(-0.7)
    assert "largest relative updates in t0" in d.verdict and "zig-zag" in d.verdict


def test_every_section_says_when_the_cube_lacks_what_it_needs():
    ds = make_cube(_linear({}, {}, responses=["chosen"]), responses=["chosen"])
    for s in SECTIONS:
        d = s.diagnostic(ds)
        assert bool(d.missing) != bool(d.verdict), s.key
    absent = {s.key for s in SECTIONS if s.diagnostic(ds).missing}
    assert {"squeezing", "hallucination", "first_order", "tensor_split", "update_anatomy", "force_attribution"} <= absent


# --- HTML / PDF / CLI -----------------------------------------------------------------------------------


def test_probe_text_is_escaped_in_the_html():
    evil = "<script>alert('pwned')</script> & <b>bold</b>"
    ds = make_cube(_linear({"chosen": -4}, {"chosen": -3}), prompts=[evil, "a", "b", "c"])
    html = render(gather(ds))
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(&#39;pwned&#39;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in html
    assert "a caveat" in html.split('id="summary"')[0], "warnings come first"


def test_report_cli_writes_both_and_refuses_bad_input(tmp_path):
    path = cube.save(make_cube(_linear({"argmax": -3}, {"argmax": -1}), update_norm=np.ones((2, 2)), param_norm=np.ones((2, 2))), tmp_path / "c.h5")
    result = CliRunner().invoke(main, ["report", str(path), "-o", str(tmp_path / "rep")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "rep" / "report.html").stat().st_size > 10_000 and (tmp_path / "rep" / "report.pdf").stat().st_size > 10_000
    assert not list((tmp_path / "rep").glob(".*partial"))
    only = CliRunner().invoke(main, ["report", str(path), "-o", str(tmp_path / "h"), "--html"])
    assert only.exit_code == 0 and [p.name for p in (tmp_path / "h").iterdir()] == ["report.html"]
    for args, words in [
        (["report", str(tmp_path / "nope.h5"), "-o", str(tmp_path / "r2")], "no such file"),
        (["report", str(path), "-o", str(tmp_path / "missing" / "deeper")], "no such directory"),
        (["report", str(tmp_path / "rep" / "report.html"), "-o", str(tmp_path / "r3")], "not a readable HDF5 cube"),
    ]:
        bad = CliRunner().invoke(main, args)
        assert bad.exit_code == 2, bad.output
        assert words in bad.output and "Traceback" not in bad.output and len(bad.output.strip().splitlines()) == 1


# --- end to end: audit a real TRL run, render in Chromium and pdftoppm ------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-quic"]  # fmt: skip
# A checker appended to a copy of the report (the report itself has no scripts): counts decoded images.
CHECKER = """<script>window.addEventListener("load", () => { const all = [...document.images];
const ok = all.filter(i => i.complete && i.naturalWidth > 0).length;
document.body.insertAdjacentHTML("beforeend", `<pre id="ckptforce-check">images ${ok}/${all.length}</pre>`); });</script>"""


@pytest.fixture(scope="module")
def audited(runs, tmp_path_factory) -> Path:
    info = runs["trl"]
    people, cities = ["alice", "bob", "carol", "dave"], ["paris", "rome", "oslo", "lima"]
    lines = [
        {"id": f"q{i}", "prompt": f"Q : where does {who} live ? A :" + (" <script>alert(1)</script>" if i == 0 else ""),
         "split": "train" if i < 3 else "test", "group": "people",
         "responses": {"chosen": f" {who} lives in {cities[i]} .", "rejected": f" {who} lives in {cities[i - 1]} .",
                       "other_trained": f" {people[i - 1]} lives in {cities[i - 1]} .", "other_untrained": f" {people[i - 2]} works in {cities[i - 2]} .",
                       "random": " in . where lives ?"}}
        for i, who in enumerate(people)
    ]  # fmt: skip
    probes = tmp_path_factory.mktemp("probes") / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path_factory.mktemp("audit") / "audit"
    before = tree_digest(info.root)
    result = CliRunner().invoke(main, ["audit", str(info.root), "--probes", str(probes), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert tree_digest(info.root) == before, "audit wrote into the run directory"
    return out


def test_audit_writes_cube_and_reports(audited):
    assert {p.name for p in audited.iterdir()} == {"cube.h5", "report.html", "report.pdf"}
    html = (audited / "report.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script" not in html.lower()
    assert "http://" not in html and "https://" not in html, "the report must work offline"
    for s in SECTIONS:
        assert f'id="{s.key}"' in html


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed (.ci/run installs it)")
def test_html_renders_in_headless_chromium(audited, tmp_path):
    page = tmp_path / "checked.html"
    page.write_text((audited / "report.html").read_text().replace("</body>", CHECKER + "</body>"))
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *profile, "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000",
                          "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)  # fmt: skip
    found = re.search(r"images (\d+)/(\d+)", dom.stdout)
    assert found, dom.stderr[-2000:]
    ok, total = map(int, found.groups())
    drawn = sum(1 for s in SECTIONS if s.figure is not None)
    assert total >= 4 and ok == total, f"{total - ok} broken images"
    assert total <= drawn
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert not console, console
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *profile, "--window-size=1280,3000", f"--screenshot={shot}", (audited / "report.html").as_uri()],
                   capture_output=True, timeout=120)  # fmt: skip
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (3000, 1280)
    assert pixels[..., :3].std() > 0.05, "the screenshot is blank"


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils not installed (.ci/run installs it)")
def test_pdf_converts_with_a_page_per_section(audited, tmp_path):
    subprocess.run(["pdftoppm", "-r", "30", "-png", str(audited / "report.pdf"), str(tmp_path / "page")], check=True, timeout=120)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == 1 + len(SECTIONS)
    from matplotlib.image import imread

    assert all(imread(p)[..., :3].std() > 0.01 for p in pages)


def test_force_attribution_budget_and_leading_example():
    logp = _linear({}, {}, probes=2, responses=["chosen", "rejected"])
    lin = np.full((2, 2, 2), 0.5)  # (interval, probe, response)
    src = ["u0", "u1", "momentum", "weight_decay"]
    pos = np.zeros((2, 2, 2, 4))
    neg = np.zeros((2, 2, 2, 4))
    pos[:, :, 0, 0], pos[:, :, 0, 1] = 0.1, 0.25  # chosen pulled by u0 and u1 (u1 more)
    neg[:, :, 1, 1] = -0.3  # rejected pushed by u1
    pos[..., 2:] = neg[..., 2:] = np.nan
    force = np.nan_to_num(pos) + np.nan_to_num(neg)
    force[..., 2] = 0.05  # momentum
    force[..., 3] = -0.01  # weight decay
    unexplained = lin - force.sum(-1)
    ds = make_cube(logp, responses=["chosen", "rejected"], dlogp_lin=lin, force=force, force_pos=pos, force_neg=neg, dlogp_unexplained=unexplained)
    ds = ds.assign_coords(source=src, source_kind=("source", ["example", "example", "momentum", "weight_decay"]))
    d = dt.force_attribution(ds)
    budget = d.tables["budget"].set_index("response")
    assert budget.loc["chosen", "positive"] == pytest.approx(0.7) and budget.loc["chosen", "negative"] == pytest.approx(0.0)
    assert budget.loc["rejected", "negative"] == pytest.approx(-0.6) and budget.loc["rejected", "momentum"] == pytest.approx(0.1)
    np.testing.assert_allclose(budget[["positive", "negative", "momentum", "weight_decay", "unexplained"]].sum(axis=1), budget["dlogp_lin"])
    assert d.numbers["explained"] == pytest.approx(0.7) and d.numbers["unexplained"] == pytest.approx(1.0 - 0.7 - 0.1 + 0.02)
    assert "strongest single force on it comes from example u1" in d.verdict
    assert list(d.tables["heatmap"].columns) == ["u1", "u0"], "examples only, largest first"
    assert set(d.tables["top"]["source"]) == {"u0", "u1"}


def test_g_statistics_verdict_reads_the_last_interval():
    logp = _linear({}, {}, probes=2, responses=["chosen", "rejected"])
    g = {"g_one_minus_p": np.array([[0.9, 0.7], [0.5, 0.3]]), "g_gap": np.array([[1.0, 0.8], [0.6, 0.4]]),
         "g_neg_rank": np.array([[3.0, 5.0], [40.0, 60.0]]), "dpo_weight": np.array([[0.5, 0.5], [0.2, 0.4]]),
         "dpo_margin": np.array([[0.0, 0.0], [1.0, 2.0]])}  # fmt: skip
    ds = make_cube(logp, responses=["chosen", "rejected"], **g).assign_coords(source=["u0", "u1"])
    d = dt.g_statistics(ds)
    assert d.numbers["g_one_minus_p"] == pytest.approx(0.4) and d.numbers["g_neg_rank"] == pytest.approx(50)
    assert "from 1 − π(y) = 0.80 to 0.40" in d.verdict and "σ(−βh) = 0.30" in d.verdict and "mean rank 50" in d.verdict


def test_learning_paths_zigzag_score_and_rival_peak():
    q = np.array([[[0.8, 0.1, 0.1], [0.2, 0.4, 0.4]],
                  [[0.1, 0.8, 0.1], [0.5, 0.25, 0.25]],
                  [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]]])  # (checkpoint, probe, class); label 0 for both  # fmt: skip
    logp = np.log(q[..., :1])
    ds = make_cube(logp, responses=["label"], group=["flipped", "clean"], logp_class=np.log(q))
    ds = ds.assign_coords(probe_label=("probe", [0, 0]), **{"class": [0, 1, 2]})
    d = dg.learning_paths(ds)
    probes = d.tables["probes"].set_index("probe")
    assert probes.loc["p0", "zigzag"] == pytest.approx(3.0 / 0.2) and probes.loc["p1", "zigzag"] == pytest.approx(1.0)
    assert probes.loc["p0", "peak_rival"] == pytest.approx(0.8) and probes.loc["p1", "p_label_end"] == pytest.approx(0.8)
    assert "flipped-label probes take longer, more winding paths" in d.verdict and "most winding is p0" in d.verdict
    two = make_cube(logp[:2], responses=["label"], logp_class=np.log(q[:2])).assign_coords(probe_label=("probe", [0, 0]))
    assert "three checkpoints" in dg.learning_paths(two).missing


def test_feature_adaptation_drift_and_head_energy():
    q0 = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])  # p_0 of two probes with labels 0 and 2
    logp_class = np.log(np.stack([q0, q0, q0]))
    drift = np.array([[0.0, 0.0], [1.0, 3.0], [2.0, 4.0]])
    norm = np.full((3, 2), 10.0)
    ds = make_cube(np.log(q0[None, :, :1].repeat(3, 0)), responses=["label"], logp_class=logp_class, feature_drift=drift,
                   feature_one_minus_cos=drift / 100, feature_norm=norm, feature_dot=norm * 9)  # fmt: skip
    ds = ds.assign_coords(probe_label=("probe", [0, 2])).assign_attrs(feature_layer="backbone")
    d = dg.feature_adaptation(ds)
    assert d.numbers["drift_end"] == pytest.approx(3.0) and d.numbers["relative_drift_end"] == pytest.approx(0.3)
    e0 = (np.linalg.norm([0.3, -0.2, -0.1]) + np.linalg.norm([-0.1, -0.1, 0.2])) / 2
    assert d.numbers["energy_start"] == pytest.approx(e0)
    assert d.verdict.startswith("features of backbone moved ‖z − z_0‖ = 3 by step 20 (30% of ‖z_0‖")
    assert "missing" not in d.verdict and d.tables["steps"]["drift"].tolist() == pytest.approx([0, 2, 3])
