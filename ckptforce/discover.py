"""Checkpoint references and their order: names in, an ordered list of (checkpoint, step, source) out.

This is the bottom of the stack and uses the standard library only. The readers in ``ckptforce.io`` find
the candidate checkpoints of their layout and whatever step the trainer recorded; this module turns those
candidates into one ordered run:

* the step comes from the trainer's own record first (``trainer_state.json``, Lightning's ``global_step``,
  nanoGPT's ``iter_num``), then from the name (``checkpoint-500``, ``epoch=0-step=20.ckpt``,
  ``ckpt_000100.pt``), then from the natural order of the names;
* the source of every step is kept, so the cube can say where each number came from;
* two checkpoints that claim the same step are an error naming both; a checkpoint without a step among
  checkpoints with one (say, the base model saved beside a run's ``checkpoint-N/`` folders) is left out with a
  note naming it — its place would be a guess — unless ``--init`` names it, and then it starts the run; gaps in
  the spacing are reported.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import StepError

#: Where a step number came from, strongest first. ``init`` marks the model given with ``--init``.
STEP_SOURCES = ("init", "record", "name", "order")

_DIGITS = re.compile(r"(\d+)")
# Named step markers, strongest first; "epoch" is deliberately absent (epoch=3-step=120 is step 120).
_NAMED_STEP = [
    re.compile(p, re.IGNORECASE)
    for p in (
        r"(?:^|[^a-z])(?:global[_-]?)?steps?[=_-]?(\d+)",
        r"(?:^|[^a-z])checkpoint[=_-]?(\d+)",
        r"(?:^|[^a-z])iter(?:ation)?s?[=_-]?(\d+)",
        r"(?:^|[^a-z])ckpt[=_-]?(\d+)",
    )
]
_SHARD = re.compile(r"-\d+-of-\d+$")
# accelerate's save_state folders count saves, not steps: checkpoint_0, checkpoint_1, …
_SAVE_COUNTER = re.compile(r"^checkpoint_\d+$")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``step_9`` before ``step_10`` (digits compare as numbers)."""
    return tuple((0, int(tok), "") if tok.isdecimal() else (1, 0, tok.lower()) for tok in _DIGITS.split(name) if tok)


def step_from_name(name: str) -> int | None:
    """The step written in a file or directory name, or None.

    A named marker wins (``step``, ``checkpoint``, ``iter``, ``ckpt``); otherwise the last number in the
    name, if there is exactly one number, counts. ``epoch=0-step=20`` is 20; ``model-00001-of-00003`` is
    None (a shard index), and so is accelerate's ``checkpoint_3`` (it counts saves, not steps).
    """
    stem = Path(name).name
    for suffix in (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".tar"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    if _SHARD.search(stem) or _SAVE_COUNTER.match(stem):
        return None
    for pattern in _NAMED_STEP:
        hits = pattern.findall(stem)
        if hits:
            return int(hits[-1])
    numbers = _DIGITS.findall(stem)
    return int(numbers[0]) if len(numbers) == 1 else None


@dataclass(frozen=True)
class Candidate:
    """A checkpoint a reader found, before the run's steps are settled."""

    path: Path  # file or directory, as found
    layout: str  # key of the reader in ckptforce.io.LAYOUTS
    record_step: int | None = None  # the trainer's own record, when there is one
    record_name: str = ""  # where that record lives, e.g. "trainer_state.json:global_step"
    is_init: bool = False  # given with --init
    is_final: bool = False  # the final model saved beside the checkpoints (e.g. at a Trainer run's root)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run, with its settled step and where the step came from."""

    path: Path
    layout: str
    step: int
    step_source: str  # one of STEP_SOURCES
    step_detail: str = ""  # e.g. "trainer_state.json:global_step" or the name that was parsed
    adapter: Path | None = None  # the start of an adapter run: ``path`` is the base model, this the first adapter (LoRA B = 0)

    @property
    def label(self) -> str:
        return self.path.name or str(self.path)


@dataclass
class Listing:
    """The ordered checkpoints of a run and what was noticed while ordering them."""

    root: Path
    layout: str
    checkpoints: list[CheckpointRef]
    notes: list[str] = field(default_factory=list)  # warnings for the user, one line each
    given: Path | None = None  # the directory the user named, when the run was found below it

    @property
    def steps(self) -> list[int]:
        return [c.step for c in self.checkpoints]


def order_candidates(candidates: list[Candidate]) -> tuple[list[CheckpointRef], list[str]]:
    """Settle steps and order: record, then name, then natural order; the ``--init`` model goes first.

    Returns the ordered references and notes (gaps, mixed sources, checkpoints left out because they have no
    step while others do). A checkpoint that ``--init`` also names is listed once, as the start. Raises
    StepError when two checkpoints claim the same step.
    """
    notes: list[str] = []
    candidates = _drop_redundant_final(candidates, notes)
    init = [c for c in candidates if c.is_init]
    rest = sorted((c for c in candidates if not c.is_init), key=lambda c: natural_key(c.path.name))
    rest = _leave_out_stepless(_without_init(rest, init), notes)
    settled: list[CheckpointRef] = []
    if rest and all(_step_of(c) is not None for c in rest):
        for c in rest:
            if c.record_step is not None:
                settled.append(CheckpointRef(c.path, c.layout, c.record_step, "record", c.record_name))
            else:
                settled.append(CheckpointRef(c.path, c.layout, step_from_name(c.path.name), "name", c.path.name))
        settled.sort(key=lambda r: (r.step, natural_key(r.path.name)))
    else:
        if rest:
            unnamed = [c.path.name for c in rest if _step_of(c) is None]
            notes.append(
                f"no step recorded or written in the name of {', '.join(unnamed[:3])}"
                f"{' …' if len(unnamed) > 3 else ''}: steps are the natural order of the names (0, 1, 2, …)"
            )
        settled = [CheckpointRef(c.path, c.layout, i, "order", c.path.name) for i, c in enumerate(rest)]
    _check_duplicates(settled)
    if init:
        first = settled[0].step if settled else 1
        start = init[0].record_step if init[0].record_step is not None else 0
        if start >= first:
            start = 0 if first > 0 else first - 1
        settled.insert(0, CheckpointRef(init[0].path, init[0].layout, start, "init", "--init"))
    notes.extend(_spacing_notes([r.step for r in settled]))
    sources = {r.step_source for r in settled if r.step_source != "init"}
    if len(sources) > 1:
        notes.append(f"steps come from mixed sources ({', '.join(sorted(sources))}); check the step column")
    return settled, notes


def _drop_redundant_final(candidates: list[Candidate], notes: list[str]) -> list[Candidate]:
    """A final model at the run root is kept only when its step is known and no checkpoint has it."""
    finals = [c for c in candidates if c.is_final]
    if not finals:
        return candidates
    final, others = finals[0], [c for c in candidates if not c.is_final]
    taken = {c.record_step if c.record_step is not None else step_from_name(c.path.name) for c in others}
    if final.record_step is None:
        notes.append(f"the model at {final.path} has no recorded step and is not used; the checkpoints are")
        return others
    if final.record_step in taken:
        notes.append(f"the model at {final.path} is step {final.record_step}, which a checkpoint already holds; listed once")
        return others
    return candidates


def _step_of(c: Candidate) -> int | None:
    return c.record_step if c.record_step is not None else step_from_name(c.path.name)


def _without_init(candidates: list[Candidate], init: list[Candidate]) -> list[Candidate]:
    """The run's own checkpoints less the one ``--init`` names (a base model kept inside the run directory)."""
    if not init:
        return candidates
    start = init[0].path.resolve()
    return [c for c in candidates if c.path.resolve() != start]


def _leave_out_stepless(candidates: list[Candidate], notes: list[str]) -> list[Candidate]:
    """Some checkpoints carry a step and others do not: any place for the others would be a guess, and falling
    back to the natural order would throw the known steps away. The ones without a step are left out, each with a
    note that names it and says how to bring it in."""
    known = [c for c in candidates if _step_of(c) is not None]
    unknown = [c for c in candidates if _step_of(c) is None]
    if not known or not unknown:
        return candidates
    shown = ", ".join(f"{c.path.name}: {_step_of(c)}" for c in known[:3]) + (" …" if len(known) > 3 else "")
    for c in unknown:
        notes.append(
            f"{c.path}: left out — no step recorded or written in its name, while the other checkpoints have one "
            f"({shown}); if the run started from it, pass --init {c.path}; to use it as a checkpoint, rename it with "
            f"its step (e.g. step_1000{c.path.suffix})"
        )
    return known


def _check_duplicates(refs: list[CheckpointRef]) -> None:
    seen: dict[int, CheckpointRef] = {}
    for r in refs:
        if r.step in seen:
            other = seen[r.step]
            raise StepError(
                f"{other.path} and {r.path} both claim step {r.step} (from {other.step_detail or other.step_source}"
                f" and {r.step_detail or r.step_source}); move one of them out of the run directory"
            )
        seen[r.step] = r


def _spacing_notes(steps: list[int]) -> list[str]:
    """A note for each interval much longer than the usual one (a missing checkpoint, usually)."""
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    if len(gaps) < 2:
        return []
    typical = sorted(gaps)[len(gaps) // 2]
    return [
        f"gap in checkpoint spacing: step {a} → {b} (usual spacing {typical})"
        for a, b in zip(steps, steps[1:])
        if b - a > 1.5 * typical
    ]
