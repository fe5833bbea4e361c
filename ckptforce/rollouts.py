"""GRPO rollouts sampled at a checkpoint, for runs whose rollouts were not saved (``ckptforce rollouts``).

For every prompt, G completions are sampled from the policy at one checkpoint, the way TRL's GRPOTrainer
generates them (``transformers`` ``generate``: multinomial sampling at ``temperature``, no top-k / top-p cut by
default, each completion cut after its first EOS, which it keeps — the trainer scores it), and scored with the
user's reward function called with TRL's signature::

    reward(prompts=[...], completions=[...], completion_ids=[...], **columns, trainer_state=None, log_extra=…,
           log_metric=…) -> list[float]

(``completions`` decoded without special tokens, one entry per completion — for a conversational prompt, one
assistant message each; every other column of the prompt file, ``id`` included, arrives as a list of the same
length, e.g. ``answer``; there is no trainer, so ``trainer_state`` is None and the loggers do nothing). The result is a ``--train`` file in TRL's
conventions (``prompt``, ``completions`` as token ids, ``rewards``) whose header records how it was made
(checkpoint, seed, reward function, sampling settings): the same seed gives the same file.

These are *fresh* rollouts of the checkpoint's policy, not the ones the trainer drew: forces computed from them
describe what such groups do, and an interval's unexplained change says how far that is from what it trained on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .atomic import write_atomic
from .errors import CkptforceError
from .io import open_run
from .model import bind, load_factory
from .probes import load_tokenizer
from .sequences import Convention, as_text, encode, is_messages
from .train_examples import _records


@dataclass(frozen=True)
class Sampling:
    """How completions are drawn (TRL's GRPOConfig names and defaults, except the length)."""

    num_generations: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no cut (transformers' own default is 50; TRL passes its top_k, default off)
    max_completion_length: int = 256
    seed: int = 0


def load_reward(spec: str) -> Callable[..., list[float]]:
    """``package.module:function`` -> the reward function (TRL's signature, module docstring)."""
    return load_factory(spec, flag="--reward", what="a function that returns one reward per completion")


def cut_at_eos(ids: list[int], eos: int | None, pad: int | None) -> list[int]:
    """A generated sequence up to and including its first EOS; without one, up to the first pad after the
    completion ends (generate pads finished rows), else all of it (it hit max_completion_length)."""
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    if pad is not None and pad != eos and pad in ids:
        return ids[: ids.index(pad)]
    return ids


def score(reward: Callable, spec: str, prompts: list, completions: list, completion_ids: list[list[int]], columns: dict[str, list]) -> list[float]:
    """Call ``reward`` as TRL does; one finite float per completion, or a one-line error naming ``spec``."""
    extras = {"trainer_state": None, "log_extra": lambda *a, **k: None, "log_metric": lambda *a, **k: None}  # TRL's, with no trainer
    try:
        out = reward(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns, **extras)
    except Exception as e:  # noqa: BLE001 - the user's function may fail in any way
        raise CkptforceError(f"--reward {spec}: the reward function failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "it is called as reward(prompts=..., completions=..., completion_ids=..., **columns)") from e  # fmt: skip
    values = [float("nan") if v is None else v for v in list(out)]
    if len(values) != len(completions):
        raise CkptforceError(f"--reward {spec}: returned {len(values)} values for {len(completions)} completions; return one per completion")
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError) as e:
        raise CkptforceError(f"--reward {spec}: returned a value that is not a number ({e}); return floats") from e
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise CkptforceError(f"--reward {spec}: returned NaN, None or inf for some completion; return a finite reward for each")
    return values


def sample_rollouts(run_dir, prompts, reward_spec: str, out, *, checkpoint: int | None = None, init=None, layout: str | None = None, sampling: Sampling = Sampling(),
                    tokenizer: str | None = None, special_tokens: bool = True, device: str = "cpu", trust_pickles: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> dict:  # fmt: skip
    """Sample ``sampling.num_generations`` completions per prompt of ``prompts`` at one checkpoint of ``run_dir``
    (the step ``checkpoint``; default the first, with ``init`` the run's start), score them with ``reward_spec``
    and write the ``--train`` file ``out`` (atomically). Returns its header."""
    prompts_path, out = Path(prompts), Path(out)
    reward = load_reward(reward_spec)
    rows = _prompt_rows(prompts_path)
    run = open_run(run_dir, init=init, layout=layout, trust_pickles=trust_pickles)
    steps = [c.step for c in run.checkpoints]
    if checkpoint is None:
        ckpt = run.checkpoints[0]
    elif checkpoint in steps:
        ckpt = run.checkpoints[steps.index(checkpoint)]
    else:
        raise CkptforceError(f"{run.root}: no checkpoint at step {checkpoint}; the run has steps {', '.join(map(str, steps))}")
    if run.root in out.resolve().parents:
        raise CkptforceError(f"{out}: is inside the run directory {run.root}; ckptforce never writes there, choose another path")
    with run.open(ckpt) as c:
        model = bind(c, run_root=run.root)
        params = model.params_from(c)
    module = model.module
    if not callable(getattr(module, "generate", None)):
        raise CkptforceError(f"{model.source}: sampling needs a Hugging Face causal LM (a model with generate); give rollouts as --train instead")
    module.load_state_dict(params, strict=False)
    module.to(device)
    folder = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    tok = load_tokenizer(Path(tokenizer) if tokenizer else None, [folder, run.root])
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    convention = Convention(special_tokens, True)
    written = []
    for i, (line, row) in enumerate(rows):
        where = f"{prompts_path}:{line}"
        prompt_ids = encode(tok, row["prompt"], {}, convention, where=where).prompt_ids
        ids = _generate(module, prompt_ids, sampling, eos, pad, seed=_seed(sampling.seed, row, i), device=device)
        texts = tok.batch_decode(ids, skip_special_tokens=True)
        if is_messages(row["prompt"]):  # TRL hands conversational completions over as one assistant message each
            texts = [[{"role": "assistant", "content": t}] for t in texts]
        columns = {k: [v] * len(ids) for k, v in row.items() if k not in ("prompt", "completion", "completion_ids")}
        rewards = score(reward, reward_spec, [row["prompt"]] * len(ids), texts, ids, columns)
        written.append({"id": str(row.get("id", f"p{line}")), "prompt": row["prompt"], "completions": ids, "rewards": rewards,
                        **{k: v for k, v in row.items() if k not in ("prompt", "id", "completions", "rewards")}})  # fmt: skip
        if progress:
            progress(i + 1, len(rows))
    header = {"objective": "grpo", "max_completion_length": sampling.max_completion_length,
              "sampled": {"run": str(run.root), "checkpoint": str(ckpt.path), "step": ckpt.step, "reward": reward_spec,
                          "prompts": str(prompts_path), "prompts_sha256": hashlib.sha256(prompts_path.read_bytes()).hexdigest(),
                          **asdict(sampling)}}  # fmt: skip
    text = "\n".join(json.dumps(r, ensure_ascii=False) for r in [header, *written]) + "\n"
    write_atomic(out, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return header


def _prompt_rows(path: Path) -> list[tuple[int, dict]]:
    rows = [(n, r) for n, r in _records(path) if not (isinstance(r, dict) and "objective" in r and "prompt" not in r)]
    for n, r in rows:
        if not isinstance(r, dict) or "prompt" not in r:
            raise CkptforceError(f"{path}:{n}: each line needs a 'prompt' (text or chat messages) to sample completions for")
        if not (isinstance(r["prompt"], str) or is_messages(r["prompt"])):
            raise CkptforceError(f"{path}:{n}: 'prompt' is {type(r['prompt']).__name__}; give text or chat messages")
    if not rows:
        raise CkptforceError(f"{path}: no prompts; write one JSON object with a 'prompt' per line")
    return rows


def _seed(base: int, row: dict, index: int) -> int:
    """A prompt's own seed: the base seed and the prompt's id (else its position), so a prompt's completions do not
    depend on the prompts before it."""
    key = f"{base}:{row.get('id', index)}:{as_text(row['prompt'])}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def _generate(module, prompt_ids: list[int], s: Sampling, eos: int | None, pad: int | None, *, seed: int, device: str) -> list[list[int]]:
    """``s.num_generations`` sampled completions of one prompt (ids, each cut after its EOS)."""
    x = torch.tensor([prompt_ids], device=device)
    kwargs = {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "max_new_tokens": s.max_completion_length,
              "num_return_sequences": s.num_generations, "eos_token_id": eos, "pad_token_id": pad, "attention_mask": torch.ones_like(x)}  # fmt: skip
    with torch.random.fork_rng(devices=[] if device == "cpu" else None), torch.no_grad():
        torch.manual_seed(seed)
        out = module.generate(x, **kwargs)
    return [cut_at_eos([int(t) for t in row[len(prompt_ids) :]], eos, pad) for row in out]
