"""``ckptforce rollouts``: GRPO groups sampled at a checkpoint with a user's reward function.

* The sampler draws from the checkpoint's own policy: with the same seed, its completions equal a hand-written
  loop of ``torch.multinomial`` over softmax(logits / T) of the checkpoint's weights (no top-k cut: transformers'
  default of 50 would otherwise apply), each cut after its EOS, which it keeps.
* The file is a --train file in TRL's conventions that ``load_training_set`` reads as GRPO, with the settings
  recorded; the same seed writes the same bytes; the reward function is called with TRL's signature and the
  prompt file's other columns.
* Bad input is a one-line error: a reward spec that does not import, a reward of the wrong length or not a number,
  an output inside the run directory, a prompt file without prompts.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from click.testing import CliRunner

from ckptforce.cli import main
from ckptforce.io import open_run
from ckptforce.model import bind
from ckptforce.rollouts import Sampling, _generate, cut_at_eos
from ckptforce.train_examples import load_training_set

REWARDS = '''
def lives(prompts, completions, completion_ids, city, trainer_state, log_metric, **_):
    assert len(prompts) == len(completions) == len(completion_ids) == len(city) and trainer_state is None
    log_metric("seen", 1.0)
    return [1.0 if "lives" in c.split() else 0.0 for c in completions]

def short(prompts, completions, **_):
    return [1.0]

def words(prompts, completions, **_):
    return ["many" for _ in completions]
'''


@pytest.fixture()
def prompts(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": "alice", "prompt": "Q: where does alice live ? A:", "city": "rome"}, {"prompt": "Q: where does bob live ? A:", "city": "oslo"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    yield path
    sys.modules.pop("my_rewards", None)


def test_the_sampler_draws_from_the_checkpoints_policy(runs):
    run = open_run(runs["trl"].root)
    with run.open(run.checkpoints[-1]) as ckpt:
        model = bind(ckpt, run_root=run.root)
        params = model.params_from(ckpt)
    module = model.module
    module.load_state_dict(params, strict=False)
    eos, pad, prompt = 2, 0, [1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    s = Sampling(num_generations=5, temperature=0.7, max_completion_length=6, seed=0)
    got = _generate(module, prompt, s, eos, pad, seed=123, device="cpu")
    torch.manual_seed(123)
    ids = torch.tensor([prompt] * 5)
    done = torch.zeros(5, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(6):
            probs = torch.softmax(module(ids).logits[:, -1].float() / 0.7, -1)
            nxt = torch.multinomial(probs, 1).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == eos
            if bool(done.all()):
                break
    want = [cut_at_eos(row[len(prompt) :].tolist(), eos, pad) for row in ids]
    assert got == want
    assert len({tuple(g) for g in got}) > 1  # sampled, not greedy


def test_cut_at_eos_keeps_the_eos_and_drops_the_padding():
    assert cut_at_eos([5, 6, 2, 0, 0], eos=2, pad=0) == [5, 6, 2]
    assert cut_at_eos([5, 6, 7], eos=2, pad=0) == [5, 6, 7]  # hit the length limit: no EOS scored
    assert cut_at_eos([5, 6, 2, 2], eos=2, pad=2) == [5, 6, 2]


def test_rollouts_write_a_grpo_train_file_that_records_how_it_was_made(runs, prompts, tmp_path):
    root = runs["trl"].root
    args = ["rollouts", str(root), "--prompts", str(prompts), "--reward", "my_rewards:lives", "-G", "4", "--max-completion-length", "8", "-q"]
    first = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a.jsonl")])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b.jsonl")])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    other = CliRunner().invoke(main, [*args, "--seed", "1", "-o", str(tmp_path / "c.jsonl")])
    assert other.exit_code == 0 and (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()
    lines = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["objective"] == "grpo" and header["max_completion_length"] == 8
    assert header["sampled"]["step"] == 2 and header["sampled"]["reward"] == "my_rewards:lives" and header["sampled"]["seed"] == 0
    assert [r["id"] for r in rows] == ["alice", "p2"] and rows[0]["city"] == "rome"
    assert all(len(r["completions"]) == 4 and len(r["rewards"]) == 4 and set(r["rewards"]) <= {0.0, 1.0} for r in rows)
    assert all(1 <= len(c) <= 8 for r in rows for c in r["completions"])
    tset = load_training_set(tmp_path / "a.jsonl")
    assert tset.objective == "grpo" and len(tset) == 2 and any("sampled by ckptforce rollouts at step 2" in n for n in tset.notes)
    assert not any(p.is_relative_to(root) and p.name.endswith(".jsonl") for p in root.rglob("*.jsonl"))  # nothing written into the run


@pytest.mark.parametrize(
    ("reward", "out_in_run", "message"),
    [
        ("my_rewards:short", False, "returned 1 values for 4 completions"),
        ("my_rewards:words", False, "is not a number"),
        ("no_such_module:f", False, "--reward no_such_module:f: cannot import no_such_module"),
        ("my_rewards", False, "write it as package.module:function"),
        ("my_rewards:lives", True, "is inside the run directory"),
    ],
)
def test_bad_input_is_a_one_line_error(runs, prompts, tmp_path, reward, out_in_run, message):
    out = runs["trl"].root / "rollouts.jsonl" if out_in_run else tmp_path / "r.jsonl"
    result = CliRunner().invoke(main, ["rollouts", str(runs["trl"].root), "--prompts", str(prompts), "--reward", reward, "-G", "4",
                                       "--max-completion-length", "4", "-q", "-o", str(out)])  # fmt: skip
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_a_prompt_file_without_prompts_is_refused(runs, tmp_path, prompts):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "where?"}\n')
    result = CliRunner().invoke(main, ["rollouts", str(runs["trl"].root), "--prompts", str(bad), "--reward", "my_rewards:lives", "-q", "-o", str(tmp_path / "r.jsonl")])
    assert result.exit_code != 0 and f"{bad}:1: each line needs a 'prompt'" in result.output
