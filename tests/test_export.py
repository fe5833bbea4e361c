"""Remedies as files (``ckptforce export``) on hand-made cubes with known answers: the Filter-KD targets against an
EMA written out by hand, the DPO filter against the pairs the cube says, provenance, atomic writes, and the errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ckptforce import cube
from ckptforce.cli import main
from ckptforce.errors import ExportError
from ckptforce.remedies import ema_targets
from ckptforce.remedies import DpoExtendConfig, DpoFilterConfig, filter_kd_targets, write_dpo_extend, write_dpo_filter, write_filter_kd
from ckptforce.remedies.common import file_sha256

ROOT = Path(__file__).resolve().parents[1]


def _class_cube(tmp_path, n_ckpt=5, n_probe=4, n_class=3, seed=0) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n_ckpt, n_probe, n_class)) * 2
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # (C, P, V) normalised log-probs
    ds = cube.build(
        index={"checkpoint": list(range(n_ckpt)), "probe": [f"ex{i}" for i in range(n_probe)], "class": list(range(n_class))},
        coords={"step": [10 * i for i in range(n_ckpt)], "probe_label": rng.integers(0, n_class, n_probe)},
        data={"logp_class": logp},
        attrs=cube.provenance(run_dir="/runs/noisy", history="ckptforce analyze /runs/noisy --probes train.npz -o c.h5"),
    )  # fmt: skip
    return cube.save(ds, tmp_path / "class.h5"), logp


def _oracle_ema(logp: np.ndarray, alpha: float) -> np.ndarray:
    """For loops: q_t = softmax(logp_t) per probe; q̄ = q_0, then q̄ = α q̄ + (1 − α) q_t."""
    n_ckpt, n_probe, n_class = logp.shape
    out = np.zeros((n_probe, n_class))
    for p in range(n_probe):
        q_bar = None
        for t in range(n_ckpt):
            e = [math.exp(v) for v in logp[t, p]]
            q = np.array([v / sum(e) for v in e])
            q_bar = q if q_bar is None else alpha * q_bar + (1 - alpha) * q
        out[p] = q_bar
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.95])
def test_filter_kd_targets_are_the_ema_of_logp_class(tmp_path, alpha):
    path, logp = _class_cube(tmp_path)
    out, arrays = write_filter_kd(path, tmp_path / "targets.npz", alpha)
    with np.load(out, allow_pickle=False) as z:
        assert list(z["ids"]) == ["ex0", "ex1", "ex2", "ex3"]
        np.testing.assert_allclose(z["targets"], _oracle_ema(logp, alpha), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(z["targets"].sum(1), 1.0, rtol=1e-6)
        assert list(z["steps"]) == [0, 10, 20, 30, 40]
        assert z["labels"].dtype == np.int64
        prov = json.loads(str(z["provenance"]))
    if alpha == 0.0:  # no past: the last prediction
        np.testing.assert_allclose(arrays["targets"], np.exp(logp[-1]), rtol=1e-6)
    assert prov["export"] == "filter-kd" and prov["cube"] == str(path.resolve())
    assert prov["cube_sha256"] == file_sha256(path) and prov["run_dir"] == "/runs/noisy"
    assert prov["settings"]["alpha"] == alpha and prov["settings"]["checkpoints"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class.h5", "targets.npz"], "a temporary file was left behind"


def test_filter_kd_write_is_atomic(tmp_path, monkeypatch):
    path, _ = _class_cube(tmp_path)
    target = tmp_path / "targets.npz"
    target.write_bytes(b"the previous export")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(ExportError, match="cannot write .*disk is full"):
        write_filter_kd(path, target)
    assert target.read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["class.h5", "targets.npz"]


def test_filter_kd_refuses_cubes_without_class_predictions(tmp_path):
    lm = cube.build(index={"checkpoint": [0, 1], "probe": ["q1"], "response": ["chosen"], "token": [0, 1]},
                    coords={"step": [0, 5]}, data={"logp_tok": np.zeros((2, 1, 1, 2)), "logp": np.zeros((2, 1, 1))})  # fmt: skip
    lm_path = cube.save(lm, tmp_path / "lm.h5")
    result = CliRunner().invoke(main, ["export", "filter-kd", str(lm_path), "-o", str(tmp_path / "t.npz")])
    assert result.exit_code == 2
    assert "a language-model cube without the next-token distributions: analyze the run with --topk K" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    bare = cube.save(cube.build(index={"checkpoint": [0]}, coords={"step": [0]}, data={}), tmp_path / "bare.h5")
    with pytest.raises(ExportError, match="no per-class predictions \\(logp_class\\); analyze the run with --probes set to the training"):
        write_filter_kd(bare, tmp_path / "t.npz")
    assert not (tmp_path / "t.npz").exists()


def test_token_filter_kd_equals_a_dense_ema_of_the_top_k_distributions(tmp_path):
    """A language-model cube (--topk 3, vocabulary of 7): the export's per-token targets are the top 3 of the dense
    EMA of each checkpoint's distribution, zero outside that checkpoint's top 3; positions past a response are -1."""
    rng = np.random.default_rng(3)
    c, n, w, k, v = 4, 2, 3, 3, 7
    full = rng.normal(size=(c, n, w, v)) * 2
    logp_full = full - np.log(np.exp(full).sum(-1, keepdims=True))
    order = np.argsort(-logp_full, -1)[..., :k]
    ids, logp = order.astype(float), np.take_along_axis(logp_full, order, -1)
    ids[:, 1, 2], logp[:, 1, 2] = np.nan, np.nan  # probe 1's response has two tokens
    with_y = lambda a: np.stack([a, a], axis=2)  # noqa: E731 - (C, N, response, W, K): chosen and y* share them
    ds = cube.build(index={"checkpoint": list(range(c)), "probe": ["a", "b"], "response": ["chosen", "argmax"], "token": list(range(w)),
                           "topk": list(range(k))}, coords={"step": [0, 5, 10, 15]},
                    data={"topk_token": with_y(ids), "topk_logp": with_y(logp)})  # fmt: skip
    path = cube.save(ds, tmp_path / "lm.h5")
    out = CliRunner().invoke(main, ["export", "filter-kd", str(path), "-o", str(tmp_path / "t.npz"), "--alpha", "0.7"])
    assert out.exit_code == 0 and "soft targets of 2 examples, the top 3 ids at each of up to 3 response tokens, EMA α = 0.7" in out.output
    sparse = np.zeros_like(logp_full)
    np.put_along_axis(sparse, order, np.exp(np.take_along_axis(logp_full, order, -1)), -1)
    dense = np.stack([ema_targets(sparse[:, i], 0.7) for i in range(n)])  # (N, W, V) by the classifier path's recursion
    with np.load(tmp_path / "t.npz") as z:
        assert z["lengths"].tolist() == [3, 2] and z["token_ids"][1, 2].tolist() == [-1, -1, -1] and np.isnan(z["rest"][1, 2])
        for i, j in [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]:
            want = np.argsort(-dense[i, j], kind="stable")[:k]
            assert z["token_ids"][i, j].tolist() == want.tolist()
            np.testing.assert_allclose(z["token_probs"][i, j], dense[i, j, want], rtol=1e-6)
            assert z["rest"][i, j] == pytest.approx(1 - dense[i, j, want].sum(), abs=1e-6)
        assert json.loads(str(z["provenance"]))["settings"]["top_k"] == 3


def test_filter_kd_cli(tmp_path):
    path, logp = _class_cube(tmp_path)
    result = CliRunner().invoke(main, ["export", "filter-kd", str(path), "-o", str(tmp_path / "t.npz"), "--alpha", "0.8"])
    assert result.exit_code == 0, result.output
    assert "soft targets of 4 examples over 3 classes, EMA α = 0.8 over 5 checkpoints" in result.output
    with np.load(tmp_path / "t.npz") as z:
        np.testing.assert_allclose(z["targets"], _oracle_ema(logp, 0.8), rtol=1e-6, atol=1e-7)
    bad = CliRunner().invoke(main, ["export", "filter-kd", str(path), "-o", str(tmp_path / "t.npz"), "--alpha", "1"])
    assert bad.exit_code == 2 and "--alpha 1.0: outside [0, 1)" in bad.output


def test_report_learning_paths_use_the_same_ema(tmp_path):
    from ckptforce.report.diagnostics import learning_paths

    path, logp = _class_cube(tmp_path)
    ds = cube.open_cube(path)
    table = learning_paths(ds).tables["probes"]
    q_bar = filter_kd_targets(ds, 0.95)["targets"]
    np.testing.assert_allclose(table["p_label_ema"], q_bar[np.arange(4), ds["probe_label"].values], rtol=1e-6)


# --- DPO filter -----------------------------------------------------------------------------------------

#: per pair: own force on (chosen, rejected) in each of two intervals, and CHES at the first checkpoint
PAIRS = {
    "p_good": ([(+0.4, -1.0), (+0.2, -0.5)], 1.0),  # chosen up, rejected down: kept
    "p_displace": ([(+0.1, -1.0), (-0.3, -0.2)], 2.0),  # Σ chosen = −0.2: dropped (displaces_chosen)
    "p_rise": ([(+0.3, +0.1), (+0.1, +0.05)], 0.5),  # Σ rejected = +0.15: dropped (rejected_rises)
    "p_unused": ([(np.nan, np.nan), (np.nan, np.nan)], 9.0),  # no interval used it: kept, highest CHES
}
#: per pair: the mean rank under π of its rejected tokens (g_neg_rank) as DPO starts
RANKS = {"p_good": 3.0, "p_displace": 2.0, "p_rise": 25.0, "p_unused": 40.0}
TRAIN = (
    '{"objective": "dpo", "beta": 0.1}\n'
    '{"id": "p_good", "prompt": "Q: a?", "chosen": " yes", "rejected": " no", "note": "kept as is",   "x": [1, 2]}\n'
    "\n"
    '{"id": "p_displace", "prompt": "Q: b?", "chosen": " yes", "rejected": " no"}\n'
    '{"id": "p_rise", "prompt": "Q: c?", "chosen": " é", "rejected": " no"}\r\n'
    '{"id": "p_unused", "prompt": "Q: d?", "chosen": " yes", "rejected": " no", "meta": {"k": 1}}\n'
    '{"id": "p_extra", "prompt": "Q: e?", "chosen": " yes", "rejected": " no"}'  # not in the cube, no final newline
)


def _dpo_cube(tmp_path, *, ches=True, self_force=True) -> Path:
    names = list(PAIRS)
    sources = [*names, "momentum", "weight_decay"]
    sf = np.full((2, len(sources), 2), np.nan)  # (interval, source, own_response)
    for j, (per_iv, _) in enumerate(PAIRS.values()):
        sf[:, j, :] = per_iv
    pos = np.abs(sf) + 0.5  # pull; push = total − pull (NaN stays NaN)
    data = {}
    if self_force:
        data.update(self_force=sf, self_force_pos=pos, self_force_neg=sf - pos)
        data["displaces_chosen"] = np.where(np.isnan(sf[:, :, 0]), np.nan, (sf[:, :, 0] < 0).astype(float))
    data["g_neg_rank"] = np.array([[RANKS.get(n, np.nan) for n in sources]] * 2)
    if ches:
        c = np.full((3, len(sources)), np.nan)
        c[:, : len(names)] = [v for _, v in PAIRS.values()]
        data.update(ches=c, ches_ln=c / 2)
    ds = cube.build(
        index={"checkpoint": [0, 1, 2], "interval": [0, 1], "source": sources, "own_response": ["chosen", "rejected"]},
        coords={"step": [0, 5, 10], "step_from": [0, 5], "step_to": [5, 10], "source_kind": ["example"] * len(names) + ["momentum", "weight_decay"]},
        data=data, attrs=cube.provenance(run_dir="/runs/dpo", config={"train_sha256": "0" * 64}),
    )  # fmt: skip
    return cube.save(ds, tmp_path / "dpo.h5")


def test_dpo_filter_drops_exactly_the_pairs_the_cube_says(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(TRAIN.encode())
    out, sidecar, records = write_dpo_filter(_dpo_cube(tmp_path), train, tmp_path / "filtered.jsonl")
    raw = TRAIN.encode().split(b"\n")
    want = b"\n".join([raw[0], raw[1], raw[2], raw[5], raw[6]])  # header, p_good, blank line, p_unused, p_extra
    assert out.read_bytes() == want
    by_id = {r["id"]: r for r in records}
    assert {i: r["action"] for i, r in by_id.items()} == {"p_good": "keep", "p_displace": "drop", "p_rise": "drop",
                                                          "p_unused": "keep", "p_extra": "keep"}  # fmt: skip
    assert [x["rule"] for x in by_id["p_displace"]["reasons"]] == ["displaces_chosen"]
    assert "lower its chosen answer by 0.2 nats over the run (pull +1.4, push -1.6: the push on its rejected answer squeezes" in by_id["p_displace"]["reasons"][0]["why"]
    assert by_id["p_displace"]["chosen"] == pytest.approx(-0.2) and by_id["p_displace"]["line"] == 4
    assert [x["rule"] for x in by_id["p_rise"]["reasons"]] == ["rejected_rises"] and by_id["p_rise"]["rejected"] == pytest.approx(0.15)
    assert by_id["p_unused"]["evidence"] == "no interval used it" and by_id["p_extra"]["evidence"] == "not in the cube"
    head = json.loads(sidecar.read_text().splitlines()[0])["provenance"]
    assert sidecar.name == "filtered.jsonl.reasons.jsonl" and head["export"] == "dpo-filter"
    assert head["cube_sha256"] == file_sha256(tmp_path / "dpo.h5") and head["settings"]["train_sha256"] == file_sha256(train)
    assert head["settings"]["train_matches_cube"] is False and head["settings"]["dropped"] == 2
    assert train.read_bytes() == TRAIN.encode(), "the training file was changed"


def test_dpo_filter_ches_top(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(TRAIN.encode())
    _, _, records = write_dpo_filter(_dpo_cube(tmp_path), train, tmp_path / "f.jsonl", DpoFilterConfig(ches_top=2))
    dropped = {r["id"]: [x["rule"] for x in r["reasons"]] for r in records if r["action"] == "drop"}
    assert dropped == {"p_unused": ["high_ches"], "p_displace": ["displaces_chosen", "high_ches"], "p_rise": ["rejected_rises"]}


def test_dpo_filter_cli_and_errors(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(TRAIN.encode())
    path = _dpo_cube(tmp_path)
    ok = CliRunner().invoke(main, ["export", "dpo-filter", str(path), "--train", str(train), "-o", str(tmp_path / "f.jsonl")])
    assert ok.exit_code == 0, ok.output
    assert "kept 3 of 5 pairs" in ok.output and "drop p_displace (line 4): its own updates lower" in ok.output

    def err(*args) -> str:
        r = CliRunner().invoke(main, ["export", "dpo-filter", *map(str, args)])
        assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "Traceback" not in r.output, r.output
        return r.output

    bare = cube.save(cube.build(index={"checkpoint": [0]}, coords={"step": [0]}, data={}), tmp_path / "bare.h5")
    assert "no per-pair displacement numbers (self_force, displaces_chosen, ches); analyze the preference run with --train" in err(
        bare, "--train", train, "-o", tmp_path / "g.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text('{"id": "p_good", "prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert "pair 'p_displace' of the cube is not in the file (3 of 4 missing); give the --train file the cube was analysed with" in err(
        path, "--train", other, "-o", tmp_path / "g.jsonl")
    assert "the same file as --train" in err(path, "--train", train, "-o", train)
    assert not (tmp_path / "g.jsonl").exists()


def test_dpo_filter_uses_displaces_chosen_alone(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(TRAIN.encode())
    ds = cube.open_cube(_dpo_cube(tmp_path, ches=False))
    slim = cube.save(ds.drop_vars(["self_force", "self_force_pos", "self_force_neg"]), tmp_path / "slim.h5")
    _, _, records = write_dpo_filter(slim, train, tmp_path / "f.jsonl")
    assert [r["id"] for r in records if r["action"] == "drop"] == []  # p_displace displaced in 1 of 2 intervals: not most
    assert {r["id"]: r["evidence"] for r in records}["p_displace"] == "cube"


def test_dpo_extend_writes_both_answers_of_the_pairs_in_valleys_or_squeezing(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_bytes(TRAIN.encode())
    out, sidecar, records = write_dpo_extend(_dpo_cube(tmp_path), train, tmp_path / "extend.jsonl")
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["p_displace:chosen", "p_displace:rejected", "p_rise:chosen", "p_rise:rejected",
                                       "p_unused:chosen", "p_unused:rejected"]  # fmt: skip
    assert rows[2] == {"id": "p_rise:chosen", "prompt": "Q: c?", "completion": " é"} and rows[3]["completion"] == " no"
    assert "objective" not in out.read_text()  # no header: TRL's SFTTrainer reads the file as it is
    by_id = {r["id"]: r for r in records}
    assert {i: [x["rule"] for x in r["reasons"]] for i, r in by_id.items()} == {
        "p_good": [], "p_displace": ["squeezes"], "p_rise": ["valley"], "p_unused": ["valley"], "p_extra": []}  # fmt: skip
    assert by_id["p_rise"]["rank"] == 25.0 and by_id["p_displace"]["push"] == pytest.approx(-1.6) and by_id["p_extra"]["rank"] is None
    head = json.loads(sidecar.read_text().splitlines()[0])["provenance"]
    assert head["export"] == "dpo-extend" and head["settings"]["extended"] == 3 and head["settings"]["valley_rank"] == 10.0
    _, _, strict = write_dpo_extend(_dpo_cube(tmp_path), train, tmp_path / "e2.jsonl", DpoExtendConfig(valley_rank=30))
    assert [r["id"] for r in strict if r["action"] == "extend"] == ["p_displace", "p_unused"]
    ok = CliRunner().invoke(main, ["export", "dpo-extend", str(tmp_path / "dpo.h5"), "--train", str(train), "-o", str(tmp_path / "e3.jsonl")])
    assert ok.exit_code == 0 and "both answers of 3 of 5 pairs" in ok.output and "extend p_rise (line 5): its rejected answer's tokens sit at mean rank 25" in ok.output
    same = CliRunner().invoke(main, ["export", "dpo-extend", str(tmp_path / "dpo.h5"), "--train", str(train), "-o", str(train)])
    assert same.exit_code != 0 and "the same file as --train" in same.output and train.read_bytes() == TRAIN.encode()


def test_help_explains():
    top = CliRunner().invoke(main, ["export", "--help"]).output
    assert "filter-kd" in top and "dpo-filter" in top
    fkd = CliRunner().invoke(main, ["export", "filter-kd", "--help"]).output
    assert "q̄_t = α·q̄_{t−1} + (1 − α)·q_t" in fkd and "--probes train.npz" in fkd
    dpo = CliRunner().invoke(main, ["export", "dpo-filter", "--help"]).output
    assert "byte for byte" in dpo and "OUT.reasons.jsonl" in dpo


def test_export_imports_no_torch():
    code = "import sys, ckptforce.remedies; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow  # about 2 min: the digits run analysed with every training example as a probe, then students trained
def test_bench_filter_kd_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "filter_kd.py"), "--seeds", "1", "--alpha", "0.95", "--out", str(tmp_path)],
                         check=True, capture_output=True, text=True, cwd=ROOT).stdout  # fmt: skip
    for line in ("noisy labels", "Filter-KD α = 0.95", "clean-test accuracy"):
        assert line in out, out
    with np.load(tmp_path / "targets-0.95.npz") as z:
        assert z["targets"].shape == (1300, 10) and json.loads(str(z["provenance"]))["settings"]["alpha"] == 0.95


def test_analyze_topk_on_a_trl_run_gives_the_filter_kd_export_its_distributions(runs, tmp_path):
    """analyze --topk on TRL's SFT run, with its training examples as probes: the first of the top k is the top-1 mass
    the cube already holds, the response's own token sits among them where it is likely, and the export reads them;
    a classifier run refuses --topk in one line."""
    import xarray as xr

    sys.path.insert(0, str(ROOT / "tests"))
    from fixtures.trainers import _sft_examples

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"u{i}", **r}) + "\n" for i, r in enumerate(_sft_examples())))
    out = tmp_path / "sft.h5"
    args = ["analyze", str(runs["trl"].root), "--probes", str(train), "--topk", "3", "--nodes", "0", "--no-by-tensor", "--dtype", "float64", "-q", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        ds = ds.load()
    first, top1 = ds["topk_logp"].isel(topk=0), ds["top1"]
    scored = top1.notnull() & (top1 > 0)
    np.testing.assert_allclose(np.exp(first.where(scored)).values, top1.where(scored).values, rtol=1e-9, equal_nan=True)
    assert bool((ds["topk_logp"].diff("topk").fillna(0) <= 1e-12).all())  # largest first
    likely = ds["logp_tok"] > np.log(0.5)  # a token above ½ is the argmax, so the first of the top k
    np.testing.assert_allclose(ds["logp_tok"].where(likely).values, first.where(likely).values, rtol=1e-9, equal_nan=True)
    done = CliRunner().invoke(main, ["export", "filter-kd", str(out), "-o", str(tmp_path / "t.npz")])
    assert done.exit_code == 0 and "soft targets of 16 examples, the top 3 ids" in done.output
    with np.load(tmp_path / "t.npz") as z:
        assert z["token_ids"].shape[0] == 16 and np.nanmax(z["rest"]) < 1 and (z["token_probs"].sum(-1) + np.nan_to_num(z["rest"]) <= 1 + 1e-5).all()
    np.savez(tmp_path / "probes.npz", x=np.zeros((2, 8), dtype=np.float32), y=np.array([0, 1]))
    refuse = CliRunner().invoke(main, ["analyze", str(runs["lightning"].root), "--probes", str(tmp_path / "probes.npz"), "--topk", "3",
                                       "--model", "fixtures.models:tiny_classifier", "-q", "-o", str(tmp_path / "c.h5")])  # fmt: skip
    assert refuse.exit_code != 0 and "--topk 3: for language models" in refuse.output and len(refuse.output.strip().splitlines()) == 1
