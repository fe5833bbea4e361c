"""The ``lm`` recipe's GRPO stage: TRL ``GRPOTrainer`` from the SFT model, a rule-based reward, offline generation.

The policy (the last SFT checkpoint) answers each SFT question ``num_generations`` times by sampling
(``transformers`` ``generate``, no vLLM); a completion earns reward 1 when it names the right city / job and 0
otherwise. At the start about a quarter of the samples are right and most groups are mixed, and the right and
wrong answers of a group share every token but one (``alice lives in rome .`` vs ``alice lives in lima .``):
the setting in which GRPO's negative gradient drags the correct answers down with the wrong ones (lazy
likelihood displacement, Deng et al., arXiv 2505.18830).

The rollouts are saved with the run twice, as users find them:

* ``grpo/completions/completions_NNNNN.parquet`` — TRL's own log (``log_completions=True``, one file a step:
  ``step``, ``prompt``, ``completion`` as decoded text, one column per reward function, ``advantage``);
* ``train_grpo.jsonl`` — the same groups in TRL's dataset conventions, exactly as trained: ``prompt`` (text),
  ``completions`` (the generated token ids, up to and including the EOS the trainer scored), ``rewards``,
  ``steps`` (the optimizer step that used the group), and a header with the objective, the groups per step and
  the loss type.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import world

#: Reward of a completion that names the asked-for value.
CORRECT = 1.0


def reward_value(prompts, completions, answer, **_) -> list[float]:
    """1.0 where the completion holds the asked-for city / job as a word, else 0.0 (TRL reward-function signature:
    the dataset's ``answer`` column arrives as a keyword)."""
    return [CORRECT if a in c.split() else 0.0 for c, a in zip(completions, answer)]


def _rows() -> list[dict]:
    f = world.facts()
    rows = []
    for r in world.sft_examples():
        kind, person = r["id"].split("-", 1)
        rows.append({"prompt": r["prompt"], "answer": f[person][kind], "id": r["id"]})
    return rows


def grpo(out: Path, init: Path, cfg, *, seed: int, args_fn, tokenizer, drop_printer) -> Path:
    """Train ``cfg.grpo_steps`` GRPO steps from ``init`` into ``out``; returns ``out``. Writes the exact rollouts
    to ``out/../train_grpo.jsonl`` (see the module docstring)."""
    import torch
    from datasets import Dataset
    from transformers import GPT2LMHeadModel, set_seed
    from trl import GRPOTrainer

    set_seed(seed)
    model = GPT2LMHeadModel.from_pretrained(str(init))
    tok = tokenizer()
    recorded: list[dict] = []

    class RecordingGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that also keeps each generation batch's token ids and rewards (its own log keeps text)."""

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            step = self.state.global_step + 1  # the optimizer step this generation batch is trained in
            for x, ids, r in zip(inputs, completion_ids_list, rewards.sum(1).tolist()):
                recorded.append({"id": x["id"], "prompt": x["prompt"], "ids": [int(i) for i in ids], "reward": r, "step": step})
            return rewards

    args = args_fn("grpo", out, max_steps=cfg.grpo_steps, learning_rate=cfg.grpo_lr, lr_scheduler_type="constant",
                   per_device_train_batch_size=cfg.grpo_groups * cfg.grpo_generations, num_generations=cfg.grpo_generations,
                   max_completion_length=cfg.grpo_max_completion, temperature=1.0, loss_type=cfg.grpo_loss_type,
                   save_strategy="steps", save_steps=cfg.grpo_save, log_completions=True, num_completions_to_print=0,
                   optim=cfg.grpo_optim, optim_args=cfg.grpo_optim_args)  # fmt: skip
    trainer = RecordingGRPOTrainer(model=model, reward_funcs=reward_value, args=args, train_dataset=Dataset.from_list(_rows()),
                                   processing_class=tok)  # fmt: skip
    drop_printer(trainer)
    with torch.random.fork_rng():
        trainer.train()
    _write_rollouts(out.parent / "train_grpo.jsonl", recorded, cfg)
    return out


def _write_rollouts(path: Path, recorded: list[dict], cfg) -> Path:
    """Group the recorded completions by (step, prompt) in generation order: one TRL group a line."""
    groups: dict[tuple[int, str, str], dict] = {}
    for r in recorded:
        key = (r["step"], r["id"], r["prompt"])
        g = groups.setdefault(key, {"id": f"s{r['step']}-{r['id']}", "prompt": r["prompt"], "completions": [], "rewards": [],
                                    "steps": [r["step"]], "question": r["id"]})  # fmt: skip
        g["completions"].append(r["ids"])
        g["rewards"].append(r["reward"])
    seen: dict[str, int] = {}
    lines = [json.dumps({"objective": "grpo", "batch_size": cfg.grpo_groups, "loss_type": cfg.grpo_loss_type,
                         "max_completion_length": cfg.grpo_max_completion})]  # fmt: skip
    for g in groups.values():
        # one prompt drawn twice in a step makes two groups of the same key: split them by generation order
        while len(g["completions"]) > cfg.grpo_generations:
            extra = {**g, "completions": g["completions"][cfg.grpo_generations :], "rewards": g["rewards"][cfg.grpo_generations :]}
            g["completions"], g["rewards"] = g["completions"][: cfg.grpo_generations], g["rewards"][: cfg.grpo_generations]
            lines.append(_line(g, seen))
            g = extra
        lines.append(_line(g, seen))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _line(g: dict, seen: dict[str, int]) -> str:
    n = seen[g["id"]] = seen.get(g["id"], 0) + 1
    return json.dumps({**g, "id": g["id"] if n == 1 else f"{g['id']}-{n}"})
