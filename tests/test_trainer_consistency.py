"""The trainer is the oracle: ckptforce scores the sequences TRL trained on, and its losses are TRL's.

Real TRL runs (tests/fixtures/llm_runs.py) with a tokenizer that adds <bos>, Llama / Qwen2 shapes, text and
conversational data. For each run:
* the training rows ckptforce builds from the user's file are, id for id, the rows TRL's own ``_prepare_dataset``
  produced (BOS, EOS appended, the prompt/completion boundary, the chat template);
* ckptforce's per-example loss at every checkpoint equals ``trainer.compute_loss`` on a batch of that example;
* a probe's ``logp`` in the cube equals the checkpoint model's log-probability (``from_pretrained``) of the tokens
  TRL would build for it (with ``--probe-eos``; without, the same tokens less the EOS).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import xarray as xr
from click.testing import CliRunner

from ckptforce.cli import main
from ckptforce.pipeline import AnalysisConfig, prepare
from ckptforce.training_forces import example_losses
from fixtures import llm_runs

#: name -> (writer, architecture, conversational)
RUNS = {
    "sft-llama": (llm_runs.write_trl_sft_run, "llama", False),
    "sft-qwen2-chat": (llm_runs.write_trl_sft_run, "qwen2", True),
    "dpo-qwen2": (llm_runs.write_trl_dpo_run, "qwen2", False),
    "dpo-llama-chat": (llm_runs.write_trl_dpo_run, "llama", True),
}
REL = 1e-5


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """Each run written once per module, on first use: {name: (RunInfo, train file, probe file)}."""
    base = tmp_path_factory.mktemp("llm")
    cache: dict = {}

    def get(name):
        if name not in cache:
            writer, arch, chat = RUNS[name]
            info = writer(base / name, arch, conversational=chat)
            cache[name] = (info, *_files(info, base / f"{name}-data"))
        return cache[name]

    return get


def _files(info, folder: Path) -> tuple[Path, Path]:
    """The user's training file (the rows given to TRL, with ids) and a probe file asking for the same answers."""
    folder.mkdir()
    rows = info.extra["rows"]
    dpo = "chosen" in rows[0]
    header = [{"objective": "dpo", "beta": info.extra["beta"]}] if dpo else []
    train = folder / "train.jsonl"
    train.write_text("".join(json.dumps(x) + "\n" for x in header + [{"id": f"u{i}", **r} for i, r in enumerate(rows)]))
    roles = ("chosen", "rejected") if dpo else ("completion",)
    probes = [{"id": f"p{i}", "prompt": r["prompt"], "responses": {("chosen" if k == "completion" else k): r[k] for k in roles}}
              for i, r in enumerate(rows)]  # fmt: skip
    probe_file = folder / "probes.jsonl"
    probe_file.write_text("".join(json.dumps(x) + "\n" for x in probes))
    return train, probe_file


def _prepared(info, train, probes, **kw):
    init = info.extra.get("init")
    config = AnalysisConfig.for_run(info.root, probes, train=train, init=init, nodes=0, by_tensor=False, dtype="float64", **kw)
    return prepare(config)


def _trl_rows(info) -> list[dict[str, tuple[list[int], list[int]]]]:
    """Per example: role -> (prompt ids, response ids) exactly as TRL tokenized them for training."""
    out = []
    for r in info.extra["processed"]:
        if "chosen_ids" in r:
            out.append({"chosen": (r["prompt_ids"], r["chosen_ids"]), "rejected": (r["prompt_ids"], r["rejected_ids"])})
        else:
            n = sum(1 for x in r["labels"] if x == -100)
            out.append({"completion": (r["input_ids"][:n], r["input_ids"][n:])})
    return out


def _batch_rows(batch) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) of each row of a ckptforce TokenBatch."""
    out = []
    for b in range(len(batch)):
        ids = batch.input_ids[b][batch.attention_mask[b].bool()].tolist()
        start = int(batch.target_mask[b].nonzero()[0]) + 1
        out.append((ids[:start], ids[start:]))
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_training_rows_are_the_ids_trl_trained_on(llm, name):
    info, train, probes = llm(name)
    pt = _prepared(info, train, probes).training
    assert pt.tokenizer.bos_token_id is not None
    trl = _trl_rows(info)
    mine = _batch_rows(pt.batch)
    for b, (u, role) in enumerate(pt.batch.rows):
        want = trl[pt.owners[b]][role]
        assert mine[b] == (list(want[0]), list(want[1])), f"{name}: example u{u} {role}"
        assert want[0][0] == pt.tokenizer.bos_token_id  # the BOS the old tokenization left out


def _trl_trainer(name, info, ckpt: Path):
    """A TRL trainer of the same kind and settings, holding the checkpoint's model (and the run's reference)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(ckpt), local_files_only=True)
    load = lambda p: AutoModelForCausalLM.from_pretrained(str(p), attn_implementation="eager")  # noqa: E731
    # bf16=False: TRL ≥ 0.20 defaults to bf16 autocast (on CPUs too), whose logits are good to ~1e-3 only; the
    # comparison is of the loss the trainer defines, in the float32 ckptforce computes in.
    common = dict(output_dir=str(info.root.parent / "trl-eval"), report_to="none", use_cpu=True, max_length=64, dataset_num_proc=None, bf16=False)
    data = Dataset.from_list(info.extra["rows"])
    if name.startswith("dpo"):
        args = DPOConfig(beta=info.extra["beta"], **common)
        return DPOTrainer(model=load(ckpt), ref_model=load(info.extra["init"]), args=args, train_dataset=data, processing_class=tok)
    return SFTTrainer(model=load(ckpt), args=SFTConfig(**common), train_dataset=data, processing_class=tok)


@pytest.mark.parametrize("name", list(RUNS))
def test_example_loss_equals_trl_compute_loss(llm, name):
    info, train, probes = llm(name)
    p = _prepared(info, train, probes)
    for ref in p.run.checkpoints[1:]:
        with p.run.open(ref) as ckpt:
            mine = example_losses(p.training, p.model, p.model.params_from(ckpt, dtype=torch.float64))
        trainer = _trl_trainer(name, info, ref.path)
        trainer.model.eval()
        with torch.no_grad():
            theirs = torch.stack([trainer.compute_loss(trainer.model, trainer.data_collator([trainer.train_dataset[i]])).double()
                                  for i in range(len(trainer.train_dataset))])  # fmt: skip
        rel = ((mine - theirs).abs() / theirs.abs()).max().item()
        assert rel <= REL, f"{name} step {ref.step}: ckptforce {mine.tolist()} vs TRL {theirs.tolist()} (rel {rel:.2e})"


def _model_logp(ckpt: Path, prompt: list[int], response: list[int]) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), attn_implementation="eager", torch_dtype=torch.float64).eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])[:, 0]
    return float(logp[len(prompt) - 1 :].sum())


@pytest.mark.parametrize("name", ["sft-llama", "dpo-llama-chat"])
@pytest.mark.parametrize("probe_eos", [True, False])
def test_probe_logp_is_the_models_logp_of_trls_tokens(llm, tmp_path, name, probe_eos):
    info, train, probes = llm(name)
    out = tmp_path / "cube.h5"
    args = ["analyze", str(info.root), "--probes", str(probes), "-o", str(out), "-q", "--nodes", "0", "--no-by-tensor", "--dtype", "float64"]
    args += ["--init", str(info.extra["init"])] if "init" in info.extra else []
    result = CliRunner().invoke(main, args + (["--probe-eos"] if probe_eos else []))
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        logp = ds["logp"].load()
        tokenization = json.loads(ds.attrs["tokenization"])
    assert tokenization["bos_added"] is True and tokenization["probe_eos"] is probe_eos
    chat = RUNS[name][2]
    eos = llm_runs.bos_tokenizer().eos_token_id
    for i, rows in enumerate(_trl_rows(info)[:3]):
        for role, (prompt, response) in rows.items():
            if not probe_eos and not chat:
                assert response[-1] == eos
                response = response[:-1]  # TRL appended it; the probe is scored without
            want = _model_logp(info.checkpoints[-1], list(prompt), list(response))
            got = float(logp.sel(probe=f"p{i}", response="chosen" if role == "completion" else role).isel(checkpoint=-1))
            assert got == pytest.approx(want, rel=REL, abs=1e-9), f"{name} p{i} {role}"


def test_the_convention_is_recorded_warned_and_shown_in_the_report(llm, tmp_path):
    """--train with plain-text probes of a TRL SFT run: the cube records the convention, warns that probes are
    scored without the EOS the training completions carry, and the report's provenance says so."""
    from ckptforce.report.context import gather

    info, train, probes = llm("sft-llama")
    other = tmp_path / "tok"
    llm_runs.bos_tokenizer().save_pretrained(str(other))
    (other / "tokenizer_config.json").write_text((other / "tokenizer_config.json").read_text().replace('"model_max_length": 64', '"model_max_length": 65'))
    out = tmp_path / "cube.h5"
    args = ["analyze", str(info.root), "--probes", str(probes), "--train", str(train), "--tokenizer", str(other), "-o", str(out),
            "-q", "--nodes", "0", "--no-by-tensor"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    with xr.open_dataset(out, engine="h5netcdf") as ds:
        ds = ds.load()
    t = json.loads(ds.attrs["tokenization"])
    assert (t["bos_added"], t["probe_eos"], t["train_eos"], t["chat_template"]) == (True, False, True, "the tokenizer's")
    warnings = json.loads(ds.attrs["warnings"])
    assert any("probe responses are scored without it (pass --probe-eos" in w for w in warnings), warnings
    assert any("differs from the one saved with the run" in w for w in warnings), warnings
    shown = dict(gather(ds).provenance)["tokenization"]
    assert shown.startswith("as the trainer (TRL): BOS <bos> added; EOS <eos> appended to training responses; chat template: the tokenizer's (sha256 ")
