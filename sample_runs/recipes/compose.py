"""Recipe ``compose``: the same tiny GPT-2 trained on a compositional mapping and on a permuted one (TRL SFTTrainer).

The simplicity-bias experiment of the force analysis (Ren, arXiv 2509.19554; Ren et al., arXiv 2409.09626): an
input is a pair of factors, a colour and a shape (6 × 6 = 36 inputs, ``red circle :``), and an output is two
words. In the **compositional** mapping each output word is the word of one factor (colour ``red`` → ``ka``,
shape ``circle`` → ``ta``: ``red circle :`` → `` ka ta``); in the **permuted** mapping the same 36 outputs are
dealt out to the inputs by a random permutation, so the inputs and the set of outputs are the same and only the
shared structure is gone. Examples of one colour share the first output word in the first mapping and nothing in
the second: their forces on each other's targets align, so they support each other and are learned faster.

``build(out)`` writes, deterministically (seeded, CPU, one thread; a few seconds)::

    out/init/                            the random-init model both runs start from (+ tokenizer)
    out/compositional/checkpoint-N/      SFT on the compositional mapping: model, optimizer.pt, trainer_state.json
    out/permuted/checkpoint-N/           SFT on the permuted mapping, same model, init, data order and settings
    out/train_compositional.jsonl        exactly what each run trained on (prompt + completion, id), with the
    out/train_permuted.jsonl             factors of each example as ``meta`` (``meta.colour``, ``meta.shape``)
    out/MANIFEST.json                    settings, seconds per stage, library versions

The training files are also the probe files: analyse each run with its own file as both, grouped by a factor::

    ckptforce audit out/compositional --init out/init --probes out/train_compositional.jsonl \\
        --train out/train_compositional.jsonl --group-by meta.colour -o compositional/

    python -m sample_runs.recipes.compose OUT
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ._common import fresh_dir, one_thread, quiet, write_jsonl, write_manifest

SEED = 1234
#: the files this recipe's result depends on (the cache key of ``sample_runs.recipes.ensure``)
SOURCES = ("compose.py", "_common.py")

#: the two factors of an input, and the output word of each factor value in the compositional mapping
COLOURS = ["red", "blue", "green", "black", "white", "pink"]
SHAPES = ["circle", "square", "star", "heart", "moon", "cross"]
COLOUR_WORDS = ["ka", "lo", "mi", "nu", "po", "ru"]
SHAPE_WORDS = ["ta", "ve", "wi", "xo", "yu", "ze"]
SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]
#: the two mappings, in the order the demo audits them
MAPPINGS = ("compositional", "permuted")


@dataclass(frozen=True)
class ComposeConfig:
    values: int = dataclasses.field(default=6, metadata={"help": "values per factor (values² examples, at most 6)"})
    n_embd: int = dataclasses.field(default=32, metadata={"help": "GPT-2 width"})
    n_layer: int = dataclasses.field(default=1, metadata={"help": "transformer blocks"})
    n_head: int = dataclasses.field(default=2, metadata={"help": "attention heads"})
    steps: int = dataclasses.field(default=100, metadata={"help": "SFT steps of each run"})
    lr: float = dataclasses.field(default=5e-3, metadata={"help": "AdamW lr (constant)"})
    batch: int = dataclasses.field(default=36, metadata={"help": "examples per step (36 = values²: every example at every step)"})
    save: int = dataclasses.field(default=10, metadata={"help": "save_steps"})
    optim: str = dataclasses.field(default="adamw_torch", metadata={"help": "optimizer (TrainingArguments.optim)"})
    optim_args: str | None = dataclasses.field(default=None, metadata={"help": "TrainingArguments.optim_args"})


CONFIG = ComposeConfig()
N_POSITIONS = 8  # <bos> colour shape : word word <eos>


def vocabulary() -> list[str]:
    """Specials first (ids 0-3), then ':' and every factor and output word."""
    return SPECIALS + [":"] + COLOURS + SHAPES + COLOUR_WORDS + SHAPE_WORDS


def examples(mapping: str, values: int = CONFIG.values) -> list[dict]:
    """The values² (36) TRL prompt/completion rows of ``mapping`` (``compositional`` or ``permuted``), factors as ``meta``.

    Permuted: the compositional outputs, dealt to the inputs by a seeded random permutation (the same set)."""
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown mapping {mapping!r}; known: {', '.join(MAPPINGS)}")
    if not 2 <= values <= len(COLOURS):
        raise ValueError(f"values={values}: each factor has 2 to {len(COLOURS)} values; add words to COLOURS, SHAPES and their output words for more")
    pairs = [(c, s) for c in range(values) for s in range(values)]
    outputs = list(pairs)
    if mapping == "permuted":
        random.Random(SEED).shuffle(outputs)
    return [{"id": f"{COLOURS[c]}-{SHAPES[s]}", "prompt": f"{COLOURS[c]} {SHAPES[s]} :",
             "completion": f" {COLOUR_WORDS[oc]} {SHAPE_WORDS[os_]}", "meta": {"colour": COLOURS[c], "shape": SHAPES[s]}}
            for (c, s), (oc, os_) in zip(pairs, outputs)]  # fmt: skip


def tokenizer():
    """A word-level tokenizer over ``vocabulary()`` that adds ``<bos>`` to every text (as the ``lm`` recipe's)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>", model_max_length=N_POSITIONS)  # fmt: skip


def init_model(out: Path, cfg: ComposeConfig = CONFIG) -> Path:
    """A GPT-2 at random init from a ``GPT2Config`` (seeded), saved with the tokenizer: where both runs start."""
    from transformers import GPT2Config, GPT2LMHeadModel, set_seed

    set_seed(SEED)
    tok = tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_positions=N_POSITIONS, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def sft(out: Path, init: Path, mapping: str, cfg: ComposeConfig = CONFIG) -> Path:
    """TRL ``SFTTrainer`` from ``init`` on ``examples(mapping)`` (loss on the completion); same seed and order for both."""
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, set_seed
    from transformers.trainer_callback import PrinterCallback
    import trl

    set_seed(SEED)
    model = GPT2LMHeadModel.from_pretrained(str(init))
    rows = [{k: r[k] for k in ("prompt", "completion")} for r in examples(mapping, cfg.values)]
    args = trl.SFTConfig(output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, seed=SEED, data_seed=SEED,
                         dataloader_num_workers=0, dataloader_pin_memory=False, log_level="error", logging_steps=1,
                         weight_decay=0.0, max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant",
                         per_device_train_batch_size=cfg.batch, save_strategy="steps", save_steps=cfg.save,
                         optim=cfg.optim, optim_args=cfg.optim_args, max_length=N_POSITIONS, dataset_num_proc=None)  # fmt: skip
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer())
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    return out


def write_data(out: Path, cfg: ComposeConfig = CONFIG) -> dict[str, str]:
    """The two training files (also the probe files of their analyses)."""
    out = Path(out)
    return {f"train_{m}": write_jsonl(out / f"train_{m}.jsonl", examples(m, cfg.values)).name for m in MAPPINGS}


def build(out, cfg: ComposeConfig = CONFIG) -> Path:
    """Write the init model, then train it on each mapping into ``out``; returns ``out``."""
    out = fresh_dir(out)
    seconds: dict[str, float] = {}
    with quiet(), one_thread():
        files = write_data(out, cfg)
        stages = [("init", lambda: init_model(out / "init", cfg))]
        stages += [(m, lambda m=m: sft(out / m, out / "init", m, cfg)) for m in MAPPINGS]
        for stage, fn in stages:
            t0 = time.perf_counter()
            fn()
            seconds[stage] = round(time.perf_counter() - t0, 2)
    files.update(init="init", **{m: m for m in MAPPINGS})
    write_manifest(out, "compose", dataclasses.asdict(cfg), seconds, files)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sample_runs.recipes.compose OUT")
    print(build(sys.argv[1]))
