"""Recipe ``lm``: a tiny GPT-2 pretrained on a world of facts, then SFT (TRL SFTTrainer), then DPO (TRL DPOTrainer).

``build(out)`` writes, deterministically (seeded, CPU, one thread; about 10 s)::

    out/pretrain/                 the pretrained model (transformers.Trainer, random init from a GPT2Config) + tokenizer
    out/sft/checkpoint-N/         SFT from pretrain/: model, optimizer.pt, scheduler.pt, trainer_state.json, tokenizer
    out/dpo/checkpoint-N/         DPO from the last SFT checkpoint, reference model = that checkpoint; same files
    out/probes.jsonl              probe set: every response type of DESIGN §3, splits train / test, groups city / job
    out/train_sft.jsonl           exactly what SFT trained on (prompt + completion, id)
    out/train_dpo.jsonl           exactly what DPO trained on (prompt + chosen + rejected, id)
    out/pretrain.txt              the pretraining corpus, one sequence a line
    out/MANIFEST.json             settings, seconds per stage, library versions

Analyse with ``ckptforce analyze out/sft --init out/pretrain --probes out/probes.jsonl -o sft.h5`` and
``ckptforce analyze out/dpo --init out/sft/checkpoint-<last> --probes out/probes.jsonl -o dpo.h5``.

The world (``world.py``) and the settings below are chosen so the sign table of the LLM paper shows
(DESIGN §4), and they were tried on three pretraining seeds and two DPO data orders each:

* SFT starts from a model that knows the facts only as statements, so the answer format is learnt in SFT,
  and it stops before it is converged: the model recalls the fact but does not yet copy the person's name from the
  question, so log π(y*) ≈ −3.5 along the chosen answer and there is room for it to rise.
* The DPO rejected answer is a garbled, wrong, longer claim the SFT model never gives (log π ≈ −70).
* DPO takes SGD steps with momentum (lr 0.15, momentum 0.5; the momentum buffer is the optimizer state
  in the checkpoints). With AdamW (lr 2e-3, 3e-3) y* rose for some seeds and fell for others, because
  the facts lost confidence; SGD squeezed (y* ↑, chosen ↓) for every seed tried, and SGD's update −η·g is
  the one the force analysis is written for. Larger steps (plain SGD at lr 1–3, momentum 0.9 at lr 0.06)
  tip into a collapse instead (chosen falls by 18 to over 200 nats).

    python -m sample_runs.recipes.lm OUT
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import rl, world
from ._common import fresh_dir, one_thread, quiet, write_jsonl, write_manifest

SEED = 1234
#: the files this recipe's result depends on (the cache key of ``sample_runs.recipes.ensure``)
SOURCES = ("lm.py", "world.py", "rl.py", "_common.py")


@dataclass(frozen=True)
class LmConfig:
    n_embd: int = dataclasses.field(default=64, metadata={"help": "GPT-2 width"})
    n_layer: int = dataclasses.field(default=2, metadata={"help": "transformer blocks"})
    n_head: int = dataclasses.field(default=4, metadata={"help": "attention heads"})
    n_positions: int = dataclasses.field(default=32, metadata={"help": "context length (tokens)"})
    pretrain_steps: int = dataclasses.field(default=400, metadata={"help": "pretraining steps"})
    pretrain_lr: float = dataclasses.field(default=3e-3, metadata={"help": "pretraining peak lr (AdamW, cosine)"})
    pretrain_batch: int = dataclasses.field(default=32, metadata={"help": "pretraining sequences per step"})
    sft_steps: int = dataclasses.field(default=40, metadata={"help": "SFT steps"})
    sft_lr: float = dataclasses.field(default=1e-3, metadata={"help": "SFT lr (AdamW, constant)"})
    sft_batch: int = dataclasses.field(default=8, metadata={"help": "SFT examples per step"})
    sft_save: int = dataclasses.field(default=5, metadata={"help": "SFT save_steps"})
    dpo_steps: int = dataclasses.field(default=40, metadata={"help": "DPO steps"})
    dpo_lr: float = dataclasses.field(default=0.15, metadata={"help": "DPO lr (constant)"})
    dpo_batch: int = dataclasses.field(default=8, metadata={"help": "DPO pairs per step"})
    dpo_save: int = dataclasses.field(default=5, metadata={"help": "DPO save_steps"})
    dpo_beta: float = dataclasses.field(default=0.1, metadata={"help": "DPO beta"})
    dpo_optim: str = dataclasses.field(default="sgd", metadata={"help": "DPO optimizer (TrainingArguments.optim)"})
    dpo_optim_args: str | None = dataclasses.field(default="momentum=0.5", metadata={"help": "DPO TrainingArguments.optim_args"})
    grpo_steps: int = dataclasses.field(default=20, metadata={"help": "GRPO steps"})
    grpo_lr: float = dataclasses.field(default=0.05, metadata={"help": "GRPO lr (constant)"})
    grpo_groups: int = dataclasses.field(default=2, metadata={"help": "GRPO prompts (groups) per step"})
    grpo_generations: int = dataclasses.field(default=4, metadata={"help": "GRPO completions per prompt (num_generations)"})
    grpo_max_completion: int = dataclasses.field(default=12, metadata={"help": "GRPO max_completion_length (tokens)"})
    grpo_loss_type: str = dataclasses.field(default="dapo", metadata={"help": "GRPOConfig.loss_type (TRL's default)"})
    grpo_save: int = dataclasses.field(default=5, metadata={"help": "GRPO save_steps"})
    grpo_optim: str = dataclasses.field(default="sgd", metadata={"help": "GRPO optimizer (TrainingArguments.optim)"})
    grpo_optim_args: str | None = dataclasses.field(default=None, metadata={"help": "GRPO TrainingArguments.optim_args"})


CONFIG = LmConfig()


def tokenizer():
    """A word-level tokenizer over ``world.vocabulary()`` built with ``tokenizers`` (no hub access) that, like
    Llama's and Gemma's, adds ``<bos>`` to every text: every sequence the trainers see starts with it, and
    ckptforce must put it in front of the probes too."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(world.vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=CONFIG.n_positions)  # fmt: skip


def _args(kind: str, out: Path, **kw):
    """Trainer / SFTConfig / DPOConfig arguments shared by the three stages: CPU, seeded, quiet, no reports."""
    import trl
    from transformers import TrainingArguments

    cls = {"pretrain": TrainingArguments, "sft": trl.SFTConfig, "dpo": trl.DPOConfig, "grpo": trl.GRPOConfig}[kind]
    common = {"output_dir": str(out), "use_cpu": True, "report_to": "none", "disable_tqdm": True, "seed": SEED,
              "data_seed": SEED, "dataloader_num_workers": 0, "dataloader_pin_memory": False, "log_level": "error",
              "logging_steps": 1, "weight_decay": 0.0}  # fmt: skip
    common.update(kw)
    return cls(**common)


def _drop_printer(trainer) -> None:
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)


def pretrain(out: Path, cfg: LmConfig = CONFIG) -> Path:
    """Random-init GPT-2 trained on ``world.pretraining_corpus()`` by ``transformers.Trainer``; saved to ``out``."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, GPT2Config, GPT2LMHeadModel, Trainer, set_seed

    set_seed(SEED)
    tok = tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    model = GPT2LMHeadModel(config)
    lines = world.pretraining_corpus()
    ds = Dataset.from_dict({"input_ids": [tok(t + tok.eos_token)["input_ids"] for t in lines]})
    args = _args("pretrain", out / "_trainer", max_steps=cfg.pretrain_steps, learning_rate=cfg.pretrain_lr,
                 lr_scheduler_type="cosine", warmup_steps=20, per_device_train_batch_size=cfg.pretrain_batch,
                 save_strategy="no")  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))  # fmt: skip
    _drop_printer(trainer)
    trainer.train()
    trainer.save_model(str(out))  # model + config + tokenizer
    (out / "pretrain.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _rmtree(out / "_trainer")
    return out


def sft(out: Path, init: Path, cfg: LmConfig = CONFIG) -> Path:
    """TRL ``SFTTrainer`` from ``init`` on ``world.sft_examples()`` (loss on the completion only)."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, set_seed
    from trl import SFTTrainer

    set_seed(SEED)
    model = GPT2LMHeadModel.from_pretrained(str(init))
    rows = [{k: r[k] for k in ("prompt", "completion")} for r in world.sft_examples()]
    args = _args("sft", out, max_steps=cfg.sft_steps, learning_rate=cfg.sft_lr, lr_scheduler_type="constant",
                 per_device_train_batch_size=cfg.sft_batch, save_strategy="steps", save_steps=cfg.sft_save,
                 max_length=cfg.n_positions, dataset_num_proc=None)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer())
    _drop_printer(trainer)
    trainer.train()
    return out


def dpo(out: Path, init: Path, cfg: LmConfig = CONFIG) -> Path:
    """TRL ``DPOTrainer`` from ``init`` on ``world.dpo_examples()``; the reference model is ``init`` itself."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, set_seed
    from trl import DPOTrainer

    set_seed(SEED)
    model = GPT2LMHeadModel.from_pretrained(str(init))
    ref = GPT2LMHeadModel.from_pretrained(str(init))
    rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in world.dpo_examples()]
    args = _args("dpo", out, max_steps=cfg.dpo_steps, learning_rate=cfg.dpo_lr, lr_scheduler_type="constant",
                 per_device_train_batch_size=cfg.dpo_batch, save_strategy="steps", save_steps=cfg.dpo_save,
                 beta=cfg.dpo_beta, optim=cfg.dpo_optim, optim_args=cfg.dpo_optim_args, max_length=cfg.n_positions, dataset_num_proc=None)  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer())
    _drop_printer(trainer)
    trainer.train()
    return out


def grpo(out: Path, init: Path, cfg: LmConfig = CONFIG) -> Path:
    """TRL ``GRPOTrainer`` from ``init`` on the SFT questions with a rule-based reward (``rl.py``)."""
    return rl.grpo(out, init, cfg, seed=SEED, args_fn=_args, tokenizer=tokenizer, drop_printer=_drop_printer)


def last_checkpoint(run: Path) -> Path:
    """The ``checkpoint-N`` folder with the largest N."""
    return max(Path(run).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def write_data(out: Path) -> dict[str, str]:
    """The probe set and the training-example files (pure text, no training)."""
    out = Path(out)
    write_jsonl(out / "probes.jsonl", world.probes())
    write_jsonl(out / "train_sft.jsonl", world.sft_examples())
    write_jsonl(out / "train_dpo.jsonl", world.dpo_examples())
    return {"probes": "probes.jsonl", "train_sft": "train_sft.jsonl", "train_dpo": "train_dpo.jsonl"}


def build(out, cfg: LmConfig = CONFIG) -> Path:
    """Train pretrain → SFT → DPO into ``out`` (which must not hold a previous build); returns ``out``."""
    out = fresh_dir(out)
    seconds: dict[str, float] = {}
    with quiet(), one_thread():
        files = write_data(out)
        for stage, fn in (("pretrain", lambda: pretrain(out / "pretrain", cfg)),
                          ("sft", lambda: sft(out / "sft", out / "pretrain", cfg)),
                          ("dpo", lambda: dpo(out / "dpo", last_checkpoint(out / "sft"), cfg)),
                          ("grpo", lambda: grpo(out / "grpo", last_checkpoint(out / "sft"), cfg))):  # fmt: skip
            t0 = time.perf_counter()
            fn()
            seconds[stage] = round(time.perf_counter() - t0, 2)
    (out / "pretrain" / "pretrain.txt").replace(out / "pretrain.txt")
    files.update(pretrain="pretrain", sft="sft", dpo="dpo", grpo="grpo", train_grpo="train_grpo.jsonl",
                 dpo_init=str(last_checkpoint(out / "sft").relative_to(out)),
                 pretrain_corpus="pretrain.txt")  # fmt: skip
    write_manifest(out, "lm", dataclasses.asdict(cfg), seconds, files)
    return out


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sample_runs.recipes.lm OUT")
    print(build(sys.argv[1]))
