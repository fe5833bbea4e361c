"""Likelihood displacement of preference pairs: CHES against its definition, each pair's force on its own answers
against its slow twins, and a real TRL DPO run with one pair made to resemble its rejected answer.

* CHES (both forms) equals a loop over the Hugging Face model's ``output_hidden_states`` on the ids TRL trained
  on (float64). EOS convention (the authors' ``ches/ches.py``): the response tokens include the EOS TRL appends;
  the hidden states summed are those at the last prompt token … the token before the EOS (the ones whose logits
  score a response token); the hidden state at the EOS itself is left out; |y| counts the EOS.
* The own force by inner products equals autograd's ⟨∇θ log π(y_r|x), δθ⟩ per response (a pair, and a GRPO
  group through the JVP twin), and a central finite difference.
* On the run: the pair u2 (rejected = chosen said twice) displaces its chosen answer, and CHES ranks it first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ckptforce.cube import open_cube
from ckptforce.forces import delta_lin
from ckptforce.forces.attribution import example_forces
from ckptforce.forces.precondition import Preconditioner
from ckptforce.forces.objectives import response_weights
from ckptforce.numerics import keep_float64
from ckptforce.ranks import average_ranks, spearman, topk_overlap
from ckptforce.report import diagnostics_train as dt
from fixtures import llm_runs
from test_attribution import _rows, observe_rows
from test_forces import _gpt2, _params, batch  # noqa: F401 - the probe-batch fixture
from test_trainer_consistency import _files

pytestmark = pytest.mark.filterwarnings("ignore")


# --- the run: TRL's DPOTrainer, pair u2's rejected answer repeats its chosen one -------------------------


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    """(RunInfo, cube path, config kwargs): the run written once and analyzed once with --train (float32: a float64
    analysis takes a minute here; about 20 s on 2 cores)."""
    from ckptforce.pipeline import AnalysisConfig, analyze

    base = tmp_path_factory.mktemp("displacement")
    info = llm_runs.write_trl_dpo_run(base / "dpo", "qwen2", rows=llm_runs.displacing_dpo_rows())
    train, probes = _files(info, base / "data")
    # probe_eos: the probes' chosen rows are then the very rows trained on, so `force` on them is a twin of self_force
    kw = dict(train=train, init=info.extra["init"], nodes=0, by_tensor=False, probe_eos=True)
    return info, analyze(AnalysisConfig.for_run(info.root, probes, **kw), base / "cube.h5"), (probes, kw)


def _oracle_ches(model, prompt: list[int], chosen: list[int], rejected: list[int]) -> tuple[float, float]:
    """CHES and LN-CHES by the definition: a plain HF forward per response, hidden_states[-1], a loop over positions."""
    sums, lengths = [], []
    for resp in (chosen, rejected):
        with torch.no_grad(), keep_float64():  # HF's Qwen2 rounds its norms to float32 otherwise
            h = model(input_ids=torch.tensor([prompt + resp]), output_hidden_states=True).hidden_states[-1][0]  # (T, H)
        positions = range(len(prompt) - 1, len(prompt) + len(resp) - 1)  # last prompt token … the token before the EOS
        total = torch.zeros(h.shape[-1], dtype=torch.float64)
        for t in positions:
            total += h[t]
        sums.append(total)
        lengths.append(len(positions))
    s_pos, s_neg = sums
    m_pos, m_neg = s_pos / lengths[0], s_neg / lengths[1]
    return float(s_pos @ s_neg - s_pos @ s_pos), float(m_pos @ m_neg - m_pos @ m_pos)


def test_ches_equals_a_direct_computation_from_output_hidden_states(dpo):
    """float64: ckptforce's CHES of the rows it built from the user's file (BoundModel.last_hidden through
    functional_call) against the oracle on TRL's own ids; the cube's float32 values agree to float32."""
    from transformers import AutoModelForCausalLM

    from ckptforce.forces.ches import pair_ches
    from ckptforce.pipeline import AnalysisConfig, prepare

    info, cube_path, (probes, kw) = dpo
    ds = open_cube(cube_path)
    p = prepare(AnalysisConfig.for_run(info.root, probes, **{**kw, "dtype": "float64"}))
    folders = [info.extra["init"], *info.checkpoints]
    assert [r.path for r in p.run.checkpoints] == folders == [Path(x) for x in ds["checkpoint_path"].values]
    eos = llm_runs.bos_tokenizer().eos_token_id
    for c, folder in enumerate(folders):
        with p.run.open(p.run.checkpoints[c]) as ckpt:
            mine = pair_ches(p.model.last_hidden, p.model.params_from(ckpt, dtype=torch.float64), p.training.batch)
        model = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").double().eval()
        for u, row in enumerate(info.extra["processed"]):
            assert row["chosen_ids"][-1] == eos and row["rejected_ids"][-1] == eos, "TRL appends EOS: it is a response token"
            ches, ches_ln = _oracle_ches(model, list(row["prompt_ids"]), list(row["chosen_ids"]), list(row["rejected_ids"]))
            assert float(mine.ches[u]) == pytest.approx(ches, rel=1e-10, abs=1e-10), f"checkpoint {c}, pair u{u}"
            assert float(mine.ches_ln[u]) == pytest.approx(ches_ln, rel=1e-10, abs=1e-10), f"checkpoint {c}, pair u{u}"
            got = ds.sel(source=f"u{u}").isel(checkpoint=c)
            assert float(got["ches"]) == pytest.approx(ches, rel=1e-4, abs=1e-3) and float(got["ches_ln"]) == pytest.approx(ches_ln, rel=1e-4, abs=1e-4)


def test_the_pair_resembling_its_rejected_answer_is_found_by_ches_and_the_exact_force(dpo):
    ds = open_cube(dpo[1])
    pairs = [s for s, k in zip(ds["source"].values, ds["source_kind"].values) if k == "example"]
    odd = f"u{llm_runs.DISPLACING}"
    sf = ds["self_force"].sel(source=pairs)
    np.testing.assert_allclose(sf, ds["self_force_pos"].sel(source=pairs) + ds["self_force_neg"].sel(source=pairs), rtol=1e-12)
    chosen = sf.sel(own_response="chosen")  # (interval, source)
    for k in range(ds.sizes["interval"]):
        assert chosen.isel(interval=k).idxmin("source").item() == odd, "the exact force: u2 lowers its own chosen answer most"
        assert float(chosen.isel(interval=k).sel(source=odd)) < 0
        assert ds["ches"].isel(checkpoint=k).sel(source=pairs).idxmax("source").item() == odd, "CHES ranks u2 first"
        flags = ds["displaces_chosen"].isel(interval=k).sel(source=pairs)
        assert list(flags.values) == [float(s == odd) for s in pairs]
        assert float(ds["ches_topk"][k]) == 1 and float(ds["ches_topk_overlap"][k]) == 1.0
    assert np.isnan(ds["self_force"].sel(source="momentum")).all() and np.isnan(ds["ches"].sel(source="weight_decay")).all()
    # the twin: probe p_u asks for the rows u trained on, and its `force` from source u is a JVP over all probes
    own = chosen.rename(source="probe").assign_coords(probe=[f"p{s[1:]}" for s in pairs])
    on_probe = ds["force"].sel(response="chosen").sel(probe=own["probe"].values, source=pairs)
    diag = np.stack([np.diagonal(on_probe.isel(interval=k).values) for k in range(ds.sizes["interval"])])
    np.testing.assert_allclose(own.values, diag, rtol=1e-4, atol=1e-6)


def test_the_verdict_comes_from_the_cube_numbers(dpo):
    ds = open_cube(dpo[1])
    d = dt.displacement(ds)
    run = -ds["self_force"].sel(own_response="chosen", source=[f"u{i}" for i in range(8)]).sum("interval")
    ches = ds["ches"].isel(checkpoint=0).sel(source=[f"u{i}" for i in range(8)])
    assert d.numbers["displaced"] == 1 and d.numbers["pairs"] == 8
    assert d.numbers["spearman"] == pytest.approx(spearman(ches.values, run.values))
    assert d.verdict.startswith("1 of 8 pairs displace chosen") and f"Spearman {d.numbers['spearman']:.2f}" in d.verdict
    assert "most displaced: pair u2" in d.verdict and "CHES rank 1)" in d.verdict
    # change the cube's numbers: a second pair lowering its chosen answer more, CHES unchanged
    ds["self_force"].loc[{"source": "u5", "own_response": "chosen"}] = -5.0
    d2 = dt.displacement(ds)
    assert d2.verdict.startswith("2 of 8 pairs displace chosen") and "most displaced: pair u5 (−10.00 nats" in d2.verdict
    assert d2.numbers["topk"] == 2 and d2.numbers["topk_overlap"] == 0.5


def test_report_shows_the_section(dpo, tmp_path):
    from ckptforce.report import write_report

    (html,) = write_report(dpo[1], tmp_path / "report", pdf=False)
    text = html.read_text()
    assert 'id="displacement"' in text and "1 of 8 pairs displace chosen" in text


def test_a_cube_without_preference_pairs_says_what_would_give_the_section():
    import xarray as xr

    d = dt.displacement(xr.Dataset())
    assert d.missing and "dpo, ipo or simpo" in d.missing


# --- the own force: inner products against autograd, the JVP twin and a finite difference ----------------


def _brute_own(model, params, rows, weights, steps) -> torch.Tensor:
    """(2, R): ⟨∇θ log π(y_r|x), δθ_s⟩ with ∇θ log π(y_r|x) by autograd, one response at a time."""
    out = torch.zeros(2, len(rows), dtype=torch.float64)
    for r in range(len(rows)):
        leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
        (logp,) = observe_rows(model, leaves, rows.select([r]))
        grads = dict(zip(leaves, torch.autograd.grad(logp, list(leaves.values()))))
        for s, step in enumerate(steps):
            out[s, r] = sum((grads[n] * step[n]).sum() for n in step) if step is not None else 0.0
    return out


@pytest.mark.parametrize("shape", ["pair", "group"])
def test_own_force_equals_autograd_inner_products_and_a_finite_difference(shape, tmp_path, batch):  # noqa: F811
    model = _gpt2()
    params = _params(model)
    if shape == "pair":  # chosen alone in w > 0, rejected alone in w < 0: the inner-product path
        examples = [{"id": f"u{i}", "prompt_ids": [1 + i, 2], "responses": {"chosen": [3 + i, 4], "rejected": [3 + i, 4, 3 + i, 4]}} for i in range(2)]
    else:  # a GRPO group: two responses share a sign, the JVP twin
        examples = [{"id": f"u{i}", "prompt_ids": [1 + i, 2], "responses": {f"completion_{j}": [3 + i + j, 4] for j in range(3)}} for i in range(2)]
    rows = _rows(tmp_path, examples)
    owners = [i for i, _ in rows.rows]
    logp = observe_rows(model, params, rows).detach()
    if shape == "pair":
        ref = logp.view(2, 2) - torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=torch.float64)
        weights = response_weights("dpo", logp.view(2, 2), ref_logp=ref, beta=0.5).flatten()
    else:
        lengths = rows.target_mask.sum(1).double().view(2, 3)
        weights = response_weights("grpo", logp.view(2, 3), lengths=lengths, rewards=torch.tensor([[1.0, 1, 0], [0, 1, 0]])).flatten()
    g = torch.Generator().manual_seed(1)
    scale = {n: 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}  # an Adam-like P
    pre = Preconditioner("adam", scale, None, None)
    coeff = torch.tensor([0.01, 0.02], dtype=torch.float64)
    forces = example_forces(model.logits, params, batch, rows, owners, weights, coeff, pre, own=True)
    n_resp = 2 if shape == "pair" else 3
    for u in range(2):
        mine = rows.select([i for i, o in enumerate(owners) if o == u])
        w = weights[u * n_resp : (u + 1) * n_resp]
        steps = []
        for sign in (1, -1):  # δθ_s = −c P Σ_{r: sign} w_r ∇(−ℓ_r), built by autograd
            pick = [r for r in range(n_resp) if float(w[r]) * sign > 0]
            leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
            loss = -(w[pick] * observe_rows(model, leaves, mine.select(pick))).sum()
            grads = torch.autograd.grad(loss, list(leaves.values()))
            steps.append({n: -float(coeff[u]) * scale[n] * gr for n, gr in zip(leaves, grads)})
        want = _brute_own(model, params, mine, w, steps)
        torch.testing.assert_close(forces.own_pos[u], want[0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(forces.own_neg[u], want[1], rtol=1e-9, atol=1e-12)
        # A·J·δθ_u on the example's own rows (the JVP) is the same number
        total_step = {n: steps[0][n] + steps[1][n] for n in params}
        torch.testing.assert_close(forces.own_pos[u] + forces.own_neg[u], delta_lin(model.logits, params, mine, total_step).total.double(),
                                   rtol=1e-9, atol=1e-12)  # fmt: skip
        eps = 1e-4  # central difference of log π(y_r|x) along δθ_u
        moved = lambda s: observe_rows(model, {n: params[n] + s * eps * total_step[n] for n in params}, mine)  # noqa: E731
        fd = (moved(1) - moved(-1)) / (2 * eps)
        torch.testing.assert_close(forces.own_pos[u] + forces.own_neg[u], fd.double(), rtol=1e-6, atol=1e-9)
    assert forces.own_neg.abs().sum() > 0


# --- rank agreement ----------------------------------------------------------------------------------------


def test_spearman_and_topk_overlap():
    x = np.array([3.0, 1.0, 2.0, 2.0, np.nan, 5.0])
    y = np.array([30.0, 5.0, 10.0, 20.0, 1.0, np.nan])
    np.testing.assert_allclose(average_ranks(np.array([3.0, 1.0, 2.0, 2.0])), [4.0, 1.0, 2.5, 2.5])
    # by hand: ranks x (4, 1, 2.5, 2.5), y (4, 1, 2, 3) over the four finite pairs -> Pearson of the ranks
    rx, ry = np.array([4, 1, 2.5, 2.5]) - 2.5, np.array([4, 1, 2, 3]) - 2.5
    assert spearman(x, y) == pytest.approx((rx @ ry) / np.sqrt((rx @ rx) * (ry @ ry)))
    stats = pytest.importorskip("scipy.stats")
    a, b = np.random.default_rng(0).normal(size=(2, 40))
    b[::5] = b[1::5]  # ties
    assert spearman(a, b) == pytest.approx(stats.spearmanr(a, b).statistic)
    assert np.isnan(spearman([1.0, 2.0], [2.0, 1.0])) and np.isnan(spearman([1.0, 1, 1], [1.0, 2, 3]))
    assert topk_overlap([5.0, 4, 3, 2], [1.0, 4, 3, 2], 2) == 0.5 and topk_overlap([5.0, 4, 3], [5.0, 4, 3], 1) == 1.0
    assert np.isnan(topk_overlap([1.0], [np.nan], 1))


def test_cube_names_of_displacement_are_declared():
    from ckptforce import cube

    names = ["ches", "ches_ln", "self_force", "self_force_pos", "self_force_neg", "displaces_chosen", "ches_spearman",
             "ches_ln_spearman", "ches_topk_overlap", "ches_topk"]  # fmt: skip
    assert all(n in cube.VARS for n in names) and "own_response" in cube.DIMS
    assert json.dumps(list(cube.VARS["self_force"].dims)) == '["interval", "source", "own_response"]'


def test_the_report_and_the_rank_statistics_import_no_torch():
    import subprocess
    import sys

    code = "import sys, ckptforce.report.sections, ckptforce.ranks; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_a_model_without_hidden_states_is_a_one_line_error():
    from types import SimpleNamespace

    from torch import nn

    from ckptforce.errors import ModelBindError
    from ckptforce.model import BoundModel

    class Plain(nn.Module):  # a user's --model factory: logits only
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(8, 4), nn.Linear(4, 8)

        def forward(self, ids):
            return self.head(self.emb(ids))

    bound = BoundModel(Plain(), "lm", "factory:pkg.mod:build", "sdpa (math kernel)", _takes_mask=False)
    rows = SimpleNamespace(input_ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ModelBindError, match=r"factory:pkg.mod:build: the model takes no output_hidden_states .*need a Hugging Face causal LM$"):
        bound.last_hidden(_params(bound), rows)
