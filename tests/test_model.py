"""Model binding on runs written by the real trainers: the observed log π at each checkpoint equals a direct
computation with the model loaded the trainer's own way (``from_pretrained``, PEFT's ``PeftModel``, the
training script's class), and bad model specs fail with one clear line."""

from __future__ import annotations

import json

import pytest
import torch

from ckptforce import open_run
from ckptforce.errors import ModelBindError
from ckptforce.forces import delta_lin, observe, remainder_ratio
from ckptforce.model import bind
from ckptforce.probes import load_probe_set, load_tokenizer, make_batch, tokenize

pytestmark = pytest.mark.filterwarnings("ignore")


def _id_probes(tmp_path, vocab: int, n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(0, vocab, (k,), generator=g).tolist()

    lines = [
        {"id": f"p{i}", "prompt_ids": ids(3 + i % 4), "responses": {"chosen": ids(2 + i % 5), "rejected": ids(4), "random": ids(1 + i % 3)}}
        for i in range(n)
    ]
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return make_batch(tokenize(load_probe_set(path)))


def _direct_logp(model_out_fn, batch) -> torch.Tensor:
    """Σ log π(response) per row, each row alone and unpadded, from a model the trainer's own way."""
    out = []
    for b in range(len(batch)):
        n = int(batch.attention_mask[b].sum())
        ids = batch.input_ids[b : b + 1, :n]
        with torch.no_grad():
            logp = torch.log_softmax(model_out_fn(ids)[0].float(), -1)  # (n, V)
        t = batch.target_mask[b, :n].nonzero().flatten()
        out.append(logp[t, ids[0, t + 1]].sum())
    return torch.stack(out)


def test_hf_trainer_run_observed_equals_from_pretrained(runs, tmp_path):
    from transformers import GPT2LMHeadModel

    info = runs["hf"]
    run = open_run(info.root)
    batch = _id_probes(tmp_path, vocab=64)
    for ref in run.checkpoints:
        with run.open(ref) as ckpt:
            model = bind(ckpt, run_root=run.root)
            assert model.attention == "eager" and model.context == 32
            obs = observe(model.logits, model.params_from(ckpt), batch)
        direct = GPT2LMHeadModel.from_pretrained(ref.path).eval()  # its default (SDPA) attention
        torch.testing.assert_close(obs.logp, _direct_logp(lambda ids: direct(ids).logits, batch), rtol=1e-5, atol=1e-5)


def test_first_order_prediction_on_a_real_interval(runs, tmp_path):
    """Between two real Trainer checkpoints A·J·Δθ predicts most of the observed change."""
    run = open_run(runs["hf"].root)
    batch = _id_probes(tmp_path, vocab=64, n=8)
    with run.open(run.checkpoints[1]) as a, run.open(run.checkpoints[2]) as b:
        model = bind(a, run_root=run.root)
        pa, pb = model.params_from(a), model.params_from(b)
    step = {n: pb[n] - pa[n] for n in pa}
    observed = observe(model.logits, pb, batch).logp - observe(model.logits, pa, batch).logp
    lin = delta_lin(model.logits, pa, batch, step)
    assert remainder_ratio(observed, lin.total) < 0.2
    assert lin.method == "jvp"


def test_trl_run_text_probes_with_the_runs_tokenizer(runs, tmp_path):
    from transformers import GPT2LMHeadModel

    info = runs["trl"]
    run = open_run(info.root)
    ref = run.checkpoints[-1]
    probes = tmp_path / "text.jsonl"
    probes.write_text(
        json.dumps({"id": "q1", "prompt": "Q: where does alice live ? A:", "responses": {"chosen": " alice lives in paris .", "rejected": " alice lives in rome ."}})
        + "\n"
    )
    tokenizer = load_tokenizer(None, [ref.path, run.root])
    tok = tokenize(load_probe_set(probes), tokenizer, max_length=32)
    batch = make_batch(tok, pad_id=tokenizer.pad_token_id or 0)
    with run.open(ref) as ckpt:
        model = bind(ckpt, run_root=run.root)
        obs = observe(model.logits, model.params_from(ckpt), batch)
    direct = GPT2LMHeadModel.from_pretrained(ref.path).eval()
    torch.testing.assert_close(obs.logp, _direct_logp(lambda ids: direct(ids).logits, batch), rtol=1e-5, atol=1e-5)
    assert tok.response_ids[0]["chosen"] == tokenizer(" alice lives in paris .", add_special_tokens=False)["input_ids"]


def test_peft_adapter_over_base_equals_peft_model(runs, tmp_path):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    info = runs["peft"]
    run = open_run(info.root)
    assert run.checkpoints[0].adapter is not None and len(run.checkpoints) == len(info.checkpoints) + 1
    batch = _id_probes(tmp_path, vocab=64)
    for ref in run.checkpoints:
        with run.open(ref) as ckpt:
            model = bind(ckpt, base_model=info.extra["base"])
            obs = observe(model.logits, model.params_from(ckpt), batch)
            found = bind(ckpt)  # the local base folder named in adapter_config.json
            torch.testing.assert_close(observe(found.logits, found.params_from(ckpt), batch).logp, obs.logp)
        base = GPT2LMHeadModel.from_pretrained(info.extra["base"]).eval()
        # the run's start (open_run puts the base model in front, B = 0) is the base model itself
        direct = base if ref.adapter is not None else PeftModel.from_pretrained(base, ref.path).eval()
        torch.testing.assert_close(obs.logp, _direct_logp(lambda ids: direct(input_ids=ids).logits, batch), rtol=1e-5, atol=1e-5)


def test_user_factory_on_nanogpt_run(runs, tmp_path, monkeypatch):
    from fixtures.trainers import nanogpt_model

    info = runs["nanogpt"]
    run = open_run(info.root)
    batch = _id_probes(tmp_path, vocab=64)
    ref = run.checkpoints[-1]
    with run.open(ref) as ckpt:
        model = bind(ckpt, model="fixtures.trainers:nanogpt_model")
        assert model.context == 32 and model.source == "factory:fixtures.trainers:nanogpt_model"
        obs = observe(model.logits, model.params_from(ckpt), batch)
    raw = torch.load(ref.path, weights_only=True)
    direct = nanogpt_model(raw["model_args"])
    direct.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in raw["model"].items()})
    direct.eval()
    torch.testing.assert_close(obs.logp, _direct_logp(lambda ids: direct(ids)[0], batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_colon_here", "write it as package.module:function"),
        ("not_a_module_xyz:make", "cannot import not_a_module_xyz"),
        ("fixtures.trainers:no_such_function", "has no function 'no_such_function'"),
        ("json:dumps", "returned str, not a torch.nn.Module"),
        ("fixtures.trainers:tiny_gpt2_config", r"the factory failed \(StrictDataclassFieldValidationError: Validation error for field 'vocab_size':\)$"),
    ],
)
def test_bad_model_spec(runs, spec, message):
    run = open_run(runs["nanogpt"].root)
    with run.open(run.checkpoints[0]) as ckpt, pytest.raises(ModelBindError, match=message):
        bind(ckpt, model=spec)


def test_checkpoint_that_does_not_fit_the_model(runs):
    plain = open_run(runs["plain"].root)
    hf = open_run(runs["hf"].root)
    with hf.open(hf.checkpoints[0]) as h, plain.open(plain.checkpoints[0]) as p:
        model = bind(h, run_root=hf.root)
        with pytest.raises(ModelBindError, match=r"do not fit the model from hf-config:.*missing from the checkpoint"):
            model.params_from(p)


def test_no_config_and_no_model_is_a_clear_error(runs):
    run = open_run(runs["plain"].root)
    with run.open(run.checkpoints[0]) as ckpt, pytest.raises(ModelBindError, match="no config.json .* pass --model"):
        bind(ckpt, run_root=run.root)


def test_peft_without_a_local_base_is_a_clear_error(runs, tmp_path):
    import shutil

    src = runs["peft"].checkpoints[0]
    run_dir = tmp_path / "run"
    shutil.copytree(src, run_dir / src.name)
    cfg = json.loads((run_dir / src.name / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "openai-community/gpt2"
    (run_dir / src.name / "adapter_config.json").write_text(json.dumps(cfg))
    run = open_run(run_dir)
    with run.open(run.checkpoints[0]) as ckpt, pytest.raises(ModelBindError, match=r"names 'openai-community/gpt2', not a local folder\); pass --base-model DIR"):
        bind(ckpt)
