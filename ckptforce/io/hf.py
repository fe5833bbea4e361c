"""Hugging Face Trainer / TRL output directories.

A run directory holds ``checkpoint-N/`` folders and, often, the final model saved at its root. Each holds
the weights as ``model.safetensors``, sharded ``model-0000x-of-0000y.safetensors`` with
``model.safetensors.index.json``, or ``pytorch_model.bin`` (also sharded, with ``pytorch_model.bin.index.json``);
``trainer_state.json`` (``global_step``, ``max_steps``, ``log_history`` with the learning rate) and
``optimizer.pt``. ``training_args.bin`` and ``rng_state.pth`` need full pickles and are never read.

The Trainer's ``optimizer.pt`` lists parameters by position: the weight-decay group first, then the rest,
each in ``model.named_parameters()`` order. That order is rebuilt exactly from ``config.json`` by building
the model on the meta device when ``transformers`` is installed, and checked against the saved shapes.
"""

from __future__ import annotations

import json
from functools import cached_property, lru_cache
from pathlib import Path

import torch

from ..discover import Candidate, CheckpointRef
from ..errors import CheckpointReadError
from .base import Checkpoint, Layout, OptimizerState, StateDictSource, TensorInfo, canonical_names
from .optim import DEFAULT_ORDERS, map_optimizer_state
from .safetensors_ import SafetensorsStore
from .torch_ import load_torch_file

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
STATE_FILE = "trainer_state.json"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"{path}: not valid JSON ({e}); restore the file or remove it") from e


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Hugging Face model folder, shards resolved through the index."""
    for name in WEIGHT_FILES:
        f = folder / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(read_json(f).get("weight_map", {}).values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing or not shards:
                raise CheckpointReadError(
                    f"{f}: lists shard files that are not there ({', '.join(missing[:3]) or 'none listed'}); "
                    "copy the missing shards or remove the index"
                )
            return [folder / s for s in shards]
        return [f]
    return []


class HfCheckpoint(Checkpoint):
    """One Hugging Face model folder (a ``checkpoint-N/`` or the run root)."""

    layout = "hf"

    def __init__(self, ref: CheckpointRef, *, trust_pickles: bool = False):
        super().__init__(ref)
        self.folder = ref.path
        self._files = weight_files(self.folder)
        self._trust = trust_pickles
        if self._files[0].suffix == ".safetensors":
            self._store: SafetensorsStore | None = SafetensorsStore(self._files)
            self._src = None
            self._raw = {c: r for r, c in canonical_names(list(self._store.where)).items()}
        else:
            self._store = None
            sd: dict = {}
            for f in self._files:
                sd.update(load_torch_file(f, trust_pickles=trust_pickles))
            self._src = StateDictSource.from_state_dict(sd)
            self.aliases = self._src.aliases
            self._raw = {c: c for c in self._src.tensors}

    def names(self) -> list[str]:
        return list(self._raw)

    def info(self, name: str) -> TensorInfo:
        if self._store is not None:
            return self._store.info[self._raw[name]]
        t = self._src.tensors[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        if self._store is not None:
            return self._store.get(self._raw[name])
        return self._src.tensors[name]

    def files(self) -> list[Path]:
        return list(self._files)


    # --- what the trainer saved beside the weights ---------------------------------------------------
    @cached_property
    def trainer_state(self) -> dict:
        f = self.folder / STATE_FILE
        return read_json(f) if f.is_file() else {}

    @cached_property
    def config(self) -> dict:
        f = self.folder / "config.json"
        return read_json(f) if f.is_file() else {}

    def model_args(self) -> dict | None:
        return self.config or None

    def lr_log(self) -> list[tuple[int, float]]:
        return trainer_lr_log(self.folder)

    def optimizer(self) -> OptimizerState | None:
        f = next((self.folder / n for n in ("optimizer.pt", "optimizer.bin") if (self.folder / n).is_file()), None)
        if f is None:
            return None
        osd = load_torch_file(f, trust_pickles=self._trust)
        names = self.names()
        info = {n: self.info(n) for n in names}
        orders = dict(DEFAULT_ORDERS)
        exact = trainer_parameter_order(json.dumps(self.config, sort_keys=True))
        if exact is not None:
            orders = {"Trainer decay/no-decay groups": lambda _n, _i: [n for n in exact if n in info], **orders}
        state, problem = map_optimizer_state(osd, names, info, source=f, orders=orders)
        if problem:
            self.warnings.append(problem)
        return state


@lru_cache(maxsize=8)
def trainer_parameter_order(config_json: str) -> tuple[str, ...] | None:
    """The order in which Hugging Face Trainer hands parameters to its optimizer, or None if unknown.

    Trainer.create_optimizer: [decay params in named_parameters order] + [the others], where the no-decay
    set is LayerNorm modules plus names matching bias/layernorm/rmsnorm/norm. The model is built from its
    config (given as JSON, so the result can be cached across checkpoints) on the meta device: no memory,
    no download.
    """
    config = json.loads(config_json)
    if not config.get("model_type"):
        return None
    try:
        import transformers
        from transformers.trainer_pt_utils import get_parameter_names
    except ImportError:
        return None
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
    except Exception:  # noqa: BLE001 - any model we cannot build leaves the order unknown
        try:
            with torch.device("meta"):
                model = transformers.AutoModel.from_config(cfg)
        except Exception:  # noqa: BLE001
            return None
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], patterns))
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    return tuple([n for n in named if n in decay] + [n for n in named if n not in decay])


class HfLayout(Layout):
    name = "hf"
    summary = "Hugging Face Trainer / TRL: checkpoint-N/ with model.safetensors (or shards, or pytorch_model.bin) and trainer_state.json"

    def probe(self, path: Path) -> Candidate | None:
        if not path.is_dir() or (path / "adapter_config.json").exists():
            return None
        if not any((path / n).is_file() for n in WEIGHT_FILES):
            return None
        return trainer_candidate(path, self.name)

    def find(self, root: Path) -> list[Candidate]:
        found = [c for p in sorted(root.iterdir()) if (c := self.probe(p)) is not None]
        final = self.probe(root)
        if final is not None and found:
            final = final_model_candidate(final, found)
        return found + ([final] if final is not None else [])

    def open(self, ref: CheckpointRef, *, trust_pickles: bool = False) -> Checkpoint:
        return HfCheckpoint(ref, trust_pickles=trust_pickles)


def trainer_candidate(path: Path, layout: str) -> Candidate:
    """A Trainer folder as a candidate, with ``trainer_state.json``'s ``global_step`` when it has one."""
    state = path / STATE_FILE
    if state.is_file():
        step = read_json(state).get("global_step")
        if isinstance(step, int):
            return Candidate(path, layout, step, f"{path.name}/{STATE_FILE}:global_step")
    return Candidate(path, layout)


def config_beside(folder: Path) -> dict:
    """The model's ``config.json`` in ``folder`` or the folder above it (a run root), {} when there is none."""
    for where in (folder, folder.parent):
        if (where / "config.json").is_file():
            return read_json(where / "config.json")
    return {}


def trainer_lr_log(folder: Path) -> list[tuple[int, float]]:
    """(step, learning rate) from ``trainer_state.json``'s ``log_history``, when the folder has one."""
    state = folder / STATE_FILE
    log = read_json(state).get("log_history", []) if state.is_file() else []
    return [(int(e["step"]), float(e["learning_rate"])) for e in log if "learning_rate" in e and "step" in e]


def final_model_candidate(final: Candidate, checkpoints: list[Candidate]) -> Candidate:
    """The model saved at the run root after training: its step is the run's ``max_steps`` when not recorded."""
    if final.record_step is not None:
        return Candidate(final.path, final.layout, final.record_step, final.record_name, is_final=True)
    last = max(checkpoints, key=lambda c: c.record_step if c.record_step is not None else -1)
    state = last.path / STATE_FILE
    max_steps = read_json(state).get("max_steps") if state.is_file() else None
    if isinstance(max_steps, int) and max_steps > 0:
        return Candidate(final.path, final.layout, max_steps, f"{last.path.name}/{STATE_FILE}:max_steps (final model)", is_final=True)
    return Candidate(final.path, final.layout, is_final=True)
