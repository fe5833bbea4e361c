"""Training-example files (``--train``) in, validated examples and a teacher-forced batch of their responses out.

JSONL, or what ``datasets`` writes (a JSON array, parquet, arrow, a ``save_to_disk`` folder: ``datafiles.py``), in
TRL's dataset conventions (``schemas/train_set.schema.json`` is the authority), text, chat messages or token ids,
tokenized as the trainer did (``sequences.py``); fields of the user's own (``meta``, extra columns) are kept as the
example's labels (``labels.py``)::

    {"objective": "dpo", "beta": 0.1}                                   optional header line
    {"id": "u1", "prompt": "Q: where does alice live ? A:", "chosen": " alice lives in paris .",
     "rejected": " alice lives in rome .", "steps": [3, 11]}
    {"id": "u2", "prompt": [{"role": "user", "content": "where does bob live?"}],
     "completion": [{"role": "assistant", "content": "bob lives in oslo."}]}
    {"id": "u3", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

* ``load_training_set(path, objective=None, columns=None)`` -> ``TrainingSet`` (``columns`` renames the file's
  columns to TRL's names, ``{"prompt": "question"}``): the objective from ``objective`` (the
  command line), else the header, else the trainer's record (``infer_objective``), else the examples' shape;
* ``TrainingSet.as_probe_set()`` -> a ``ProbeSet`` whose "responses" are the example's roles (``completion``;
  ``chosen``/``rejected``; ``completion_0``…), so tokenising and batching reuse probes.py exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from . import datafiles, labels
from .errors import ProbeFileError, ProbeFileNotFoundError
from .forces.objectives import GRPO_DEFAULT_LOSS, OBJECTIVES, PREFERENCE
from .probes import LmProbe, ProbeSet

SCHEMA_NAME = "train_set.schema.json"
#: Which example shape each objective trains on.
SHAPE = {"sft": "completion", "ce": "completion", "unlearn": "completion", "kd": "completion",
         "dpo": "preference", "ipo": "preference", "simpo": "preference", "grpo": "group"}  # fmt: skip


class TrainFileError(ProbeFileError):
    """A training-examples file that cannot be used as it is."""


@dataclass
class TrainExample:
    id: str
    prompt: str | list[dict] | None  # text or chat messages; None with prompt_ids, and for messages / text rows
    prompt_ids: list[int] | None
    responses: dict[str, str | list]  # role -> text, ids or messages: completion | chosen, rejected | completion_i
    rewards: list[float] | None = None
    steps: list[int] | None = None
    line: int = 0
    labels: dict[str, str] = field(default_factory=dict)  # the example's own fields: meta.*, extra columns


@dataclass
class TrainingSet:
    path: Path
    objective: str
    examples: list[TrainExample]
    beta: float | None = None
    gamma: float | None = None
    batch_size: int | None = None
    loss_type: str | None = None  # GRPO: GRPOConfig.loss_type (None: TRL's default)
    max_completion_length: int | None = None  # GRPO: GRPOConfig.max_completion_length
    objective_source: str = "examples"  # command line | header | trainer record | examples
    notes: list[str] = field(default_factory=list)
    columns: set[str] = field(default_factory=set)  # every field name the file holds, before --*-column renaming

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def labels(self) -> dict[str, list[str]]:
        """The examples' own labels as columns: {label: one text per example, "" where one lacks it}."""
        return labels.table([e.labels for e in self.examples])

    @property
    def has_steps(self) -> bool:
        return any(e.steps is not None for e in self.examples)

    def as_probe_set(self) -> ProbeSet:
        """The examples as probes (roles as response types), for ``probes.tokenize`` / ``make_batch``."""
        return ProbeSet(self.path, [LmProbe(e.id, e.prompt, e.prompt_ids, e.responses, line=e.line) for e in self.examples])


def _schema_path() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "schemas" / SCHEMA_NAME, here / "schemas" / SCHEMA_NAME):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{SCHEMA_NAME} not found beside the package; reinstall ckptforce from its source tree")


@lru_cache(maxsize=1)
def _validators():
    import jsonschema

    schema = json.loads(_schema_path().read_text(encoding="utf-8"))
    defs = schema["$defs"]
    make = lambda sub: jsonschema.Draft202012Validator({**sub, "$defs": defs})  # noqa: E731
    fields = {k: make(v) for k, v in defs["example"]["properties"].items()}
    return make(defs["header"]), make(defs["example"]), fields


def _own_fields(obj: dict, where: str) -> dict[str, str]:
    """The example's labels (``meta``, extra columns); a misspelt known field is refused."""
    fields = _validators()[2]
    if problem := labels.meta_problem(obj):
        raise TrainFileError(f"{where}: {problem}")
    _, own, typos = labels.split_line(obj, fields, lambda name, value: fields[name].is_valid(value))
    if typos:
        raise TrainFileError(f"{where}: {labels.typo_message(typos, fields)}")
    if bad := labels.unstorable(own):
        raise TrainFileError(f"{where}: {bad} that the cube (HDF5) cannot store; remove it")
    return own


def _problem(validator, obj: dict) -> str | None:
    errors = list(validator.iter_errors(obj))
    if not errors:
        return None
    e = min(errors, key=lambda e: (len(e.path), e.validator != "additionalProperties"))
    where = ".".join(str(p) for p in e.path)
    if e.validator == "additionalProperties":
        known = ", ".join(validator.schema["properties"])
        return f"unknown field(s) {e.message.split('(')[-1].rstrip(')')} (known: {known})"
    if e.validator in ("oneOf", "allOf", "not"):
        return ("give the prompt (text or messages) or prompt_ids, and exactly one of: completion; chosen + rejected; "
                "completions + rewards — or a whole conversation or text alone: messages, or text")  # fmt: skip
    return f"{where + ': ' if where else ''}{e.message}"


def load_training_set(path, objective: str | None = None, *, record: str | None = None, columns: dict[str, str] | None = None) -> TrainingSet:
    """Read and validate a training-examples file. ``objective`` (from the command line) wins over the file's
    header, which wins over ``record`` (the trainer's, see ``infer_objective``), which wins over the shape."""
    path = Path(path)
    if not datafiles.exists(path):
        what = "is a directory, not a training-examples file" if path.is_dir() else "no such file"
        raise ProbeFileNotFoundError(f"{path}: {what}; give the JSONL file of training examples (--train)")
    header_v, example_v, _ = _validators()
    header: dict = {}
    examples: list[TrainExample] = []
    seen: dict[str, int] = {}
    names: set[str] = set()
    for number, obj in _records(path):
        where = f"{path}:{number}"
        if not isinstance(obj, dict):
            raise TrainFileError(f"{where}: the line is not a JSON object; write one example object per line")
        names.update(obj)
        obj = datafiles.rename(obj, columns or {}, where)
        if "objective" in obj:
            if examples or header:
                raise TrainFileError(f"{where}: a header (objective …) may only be the first line; move it to the top")
            if problem := _problem(header_v, obj):
                raise TrainFileError(f"{where}: header: {problem}")
            header = obj
            continue
        own = _own_fields(obj, where)
        if problem := _problem(example_v, obj):
            raise TrainFileError(f"{where}: {problem}")
        uid = obj.get("id", f"u{number}")
        if uid in seen:
            raise TrainFileError(f"{where}: id: '{uid}' is already used on line {seen[uid]}; give every example a unique id")
        seen[uid] = number
        if "messages" in obj or "text" in obj:  # language modeling: every token after the first is trained on
            responses = {"completion": obj.get("messages", obj.get("text"))}
        elif "completions" in obj:
            if len(obj["completions"]) != len(obj["rewards"]):
                raise TrainFileError(f"{where}: {len(obj['completions'])} completions but {len(obj['rewards'])} rewards; give one reward per completion")
            responses = {f"completion_{i}": r for i, r in enumerate(obj["completions"])}
        else:
            responses = {k: obj[k] for k in ("completion", "chosen", "rejected") if k in obj}
        examples.append(TrainExample(uid, obj.get("prompt"), obj.get("prompt_ids"), responses, obj.get("rewards"), obj.get("steps"), number, own))
    if not examples:
        raise TrainFileError(f"{path}: no training examples; write one JSON object per line (prompt + completion, or prompt + chosen + rejected)")
    shapes = {"completion" if "completion" in e.responses else "preference" if "chosen" in e.responses else "group" for e in examples}
    if len(shapes) > 1:
        raise TrainFileError(f"{path}: examples of different shapes ({', '.join(sorted(shapes))}); one objective per file")
    shape = shapes.pop()
    default = {"completion": "sft", "preference": "dpo", "group": "grpo"}[shape]
    chosen, source = next(((o, s) for o, s in ((objective, "command line"), (header.get("objective"), "header"), (record, "trainer record")) if o), (default, "examples"))
    if chosen not in OBJECTIVES:
        raise TrainFileError(f"{path}: objective {chosen!r} is not known; use one of {', '.join(OBJECTIVES)}")
    if SHAPE[chosen] != shape:
        raise TrainFileError(f"{path}: objective {chosen} ({source}) trains on {SHAPE[chosen]} examples, the file holds {shape} examples; "
                             "fix the objective or the file")  # fmt: skip
    if any(e.steps is not None for e in examples) and not all(e.steps is not None for e in examples):
        raise TrainFileError(f"{path}: 'steps' is given for some examples only; give it for all or none")
    notes = [] if chosen not in PREFERENCE or "beta" in header else [f"β not given for {chosen}: TRL's default is used"]
    if chosen == "grpo" and "loss_type" not in header:
        notes.append(f"GRPO loss_type not given (header): TRL's default, {GRPO_DEFAULT_LOSS}, is used")
    if sampled := header.get("sampled"):
        notes.append(f"the GRPO rollouts were sampled by ckptforce rollouts at step {sampled.get('step', '?')} with --reward "
                     f"{sampled.get('reward', '?')} (seed {sampled.get('seed', '?')}), not drawn by the trainer: the forces describe "
                     "groups like the ones it trained on")  # fmt: skip
    return TrainingSet(path, chosen, examples, header.get("beta"), header.get("gamma"), header.get("batch_size"), header.get("loss_type"),
                       header.get("max_completion_length"), source, notes, names)  # fmt: skip


def _records(path: Path):
    """(line or row number, parsed object) of every non-blank line of a JSONL file, or every row of a table."""
    if not datafiles.is_lines(path):
        yield from enumerate(datafiles.read_rows(path), start=1)
        return
    try:
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except UnicodeDecodeError as e:
        raise TrainFileError(f"{path}: not UTF-8 text; save the file as UTF-8") from e
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            yield number, json.loads(raw)
        except json.JSONDecodeError as e:
            raise TrainFileError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); write one JSON object per line") from e


def infer_objective(log_history: list[dict]) -> str | None:
    """The objective a trainer's ``log_history`` shows: TRL's DPO logs ``rewards/margins``; GRPO logs
    ``reward`` with ``completions/…``; plain causal-LM training logs only ``loss``. None when unsure."""
    keys = {k for entry in log_history for k in entry}
    if "rewards/margins" in keys:
        return "dpo"
    if any(k.startswith("completions/") for k in keys) and "reward" in keys:
        return "grpo"
    return None
