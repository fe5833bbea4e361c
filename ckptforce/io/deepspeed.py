"""DeepSpeed ZeRO checkpoints: ``global_stepN/`` with per-rank model and optimizer states.

DeepSpeed's ``engine.save_checkpoint(save_dir)`` writes ``save_dir/global_stepN/`` (the tag), a ``latest`` file
naming the tag, and ``zero_to_fp32.py``; the Hugging Face Trainer calls it once per ``checkpoint-N/`` and puts
``trainer_state.json`` (the step) and, for ZeRO-1/2, the consolidated 16-bit ``model.safetensors`` beside it.
In the tag folder (``engine._save_checkpoint`` / ``_save_zero_checkpoint``):

* ``mp_rank_00_model_states.pt`` — ``module`` (the 16-bit weights and buffers), ``param_shapes`` (one
  ordered {name: shape} per param group: the order of the flat fp32 groups), ``shared_params`` (tied names),
  ``frozen_param_fragments``, ``buffer_names``, ``global_steps``;
* ``[bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt`` per data-parallel rank R — ``optimizer_state_dict``
  with ``zero_stage``, ``partition_count``, ``single_partition_of_fp32_groups`` (rank R's slice of each
  flat fp32 master group, padding removed) and ``base_optimizer_state`` (the torch optimizer's state of the
  same flat partitions: Adam's ``exp_avg`` / ``exp_avg_sq``).

ZeRO-1/2: rank slices concatenated in rank order give each group's flat vector, and parameters follow each
other in it in ``param_shapes`` order (``zero_to_fp32.py``'s reassembly). A tensor is read by slicing only the
ranks it spans, from memory-mapped files: the weights come back as the fp32 master weights, and the Adam
moments under the same names. ZeRO-3 partitions every parameter separately; it is refused with the command
that consolidates it.

The files are pickles holding DeepSpeed objects (a ``LossScaler``, ``ZeroStageEnum``, fragment addresses).
They are read with ``torch.load(weights_only=True)`` and inert stand-ins for the ``deepspeed.*`` classes
(no DeepSpeed code is imported or run); any other class in the file needs ``--trust-pickles``.
"""

from __future__ import annotations

import math
import re
from functools import cached_property
from pathlib import Path

import torch

from ..discover import Candidate, CheckpointRef
from ..errors import CheckpointReadError, PickleRefusedError
from .base import Checkpoint, LazyState, Layout, OptimizerState, TensorInfo, canonical_names
from .hf import STATE_FILE, config_beside, trainer_candidate, trainer_lr_log
from .torch_ import load_torch_file

MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"
_OPTIM = re.compile(r"^(?:bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def load_deepspeed_file(path: Path, *, trust_pickles: bool = False):
    """``torch.load(weights_only=True, mmap=True)`` with inert stand-ins for DeepSpeed's own classes."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a zip pickle: let the plain loader say what it is
        return load_torch_file(path, trust_pickles=trust_pickles)
    foreign = [g for g in found if not g.startswith("deepspeed.")]
    if foreign:
        return load_torch_file(path, trust_pickles=trust_pickles)  # refused (or fully unpickled when trusted)
    with torch.serialization.safe_globals([_stand_in(g) for g in found]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
            raise CheckpointReadError(f"{path}: not a readable DeepSpeed checkpoint file ({type(e).__name__}: {str(e)[:160]}); re-save it") from e


def _stand_in(qualified: str) -> type:
    """A class named like DeepSpeed's that only keeps what the pickle hands it (``ZeroStageEnum(2)`` -> args)."""
    module, _, name = qualified.rpartition(".")

    def init(self, *args, **kwargs):
        self.args = args

    cls = type(name, (), {"__init__": init, "__module__": module, "__int__": lambda self: int(self.args[0])})
    cls.__qualname__ = name
    return cls


def _as_int(v) -> int:
    return int(v) if not isinstance(v, (list, tuple)) else max(int(x) for x in v)


def tag_dir(path: Path) -> Path | None:
    """The ``global_stepN`` folder of a checkpoint: ``path`` itself, the tag named by ``latest``, or the only one."""
    if (path / MODEL_STATES).is_file() or (path / ZERO3_MODEL_STATES).is_file():
        return path
    latest = path / "latest"
    if latest.is_file():
        tag = path / latest.read_text().strip()
        if tag.is_dir():
            return tag
    tags = [p for p in path.glob("global_step*") if p.is_dir() and any(p.glob("*model_states.pt"))] if path.is_dir() else []
    return max(tags, key=lambda p: int(re.sub(r"\D", "", p.name) or 0)) if tags else None


class DeepSpeedCheckpoint(Checkpoint):
    layout = "deepspeed"

    def __init__(self, ref: CheckpointRef, *, trust_pickles: bool = False):
        super().__init__(ref)
        self._trust = trust_pickles
        self.tag = tag_dir(ref.path)
        run_zero_to_fp32 = (
            f"run `python {ref.path / 'zero_to_fp32.py'} {ref.path} OUT_DIR` (DeepSpeed's own script, saved beside the "
            "checkpoint) and point ckptforce at OUT_DIR"
        )
        if self.tag is None or not (self.tag / MODEL_STATES).is_file():
            stage3 = self.tag is not None and (self.tag / ZERO3_MODEL_STATES).is_file()
            why = "a ZeRO-3 checkpoint keeps every parameter partitioned across ranks, which ckptforce does not reassemble" if stage3 else f"no {MODEL_STATES}"
            raise CheckpointReadError(f"{self.tag or ref.path}: {why}; {run_zero_to_fp32}")
        self._optim_files = sorted((p for p in self.tag.iterdir() if _OPTIM.match(p.name)), key=lambda p: int(_OPTIM.match(p.name)[1]))
        states = load_deepspeed_file(self.tag / MODEL_STATES, trust_pickles=trust_pickles)
        self._module: dict = states.get("module") or {}
        self.recorded_step = states.get("global_steps")
        if not self._optim_files:
            raise CheckpointReadError(f"{self.tag}: no *_optim_states.pt files (the fp32 master weights); {run_zero_to_fp32}")
        ranks = [load_deepspeed_file(f, trust_pickles=trust_pickles)["optimizer_state_dict"] for f in self._optim_files]
        stage = _as_int(ranks[0].get("zero_stage", -1))
        world = _as_int(ranks[0].get("partition_count", 0))
        if stage not in (1, 2) or "single_partition_of_fp32_groups" not in ranks[0]:
            raise CheckpointReadError(f"{self._optim_files[0]}: ZeRO stage {stage} states, which ckptforce does not reassemble; {run_zero_to_fp32}")
        if world != len(ranks):
            raise CheckpointReadError(f"{self.tag}: {len(ranks)} *_optim_states.pt files for {world} ranks (partition_count); a rank's file is missing — copy it back")
        self._ranks = ranks
        self._where: dict[str, tuple[int, int, torch.Size]] = {}  # raw name -> (group, offset, shape)
        for g, shapes in enumerate(states.get("param_shapes") or []):
            offset, avail = 0, sum(r["single_partition_of_fp32_groups"][g].numel() for r in ranks)
            for raw, shape in shapes.items():
                self._where[raw] = (g, offset, torch.Size(shape))
                offset += math.prod(shape)
            align = 2 * world  # ZeRO-2 pads each group to 2·world_size elements (zero_to_fp32.py's check)
            if align * math.ceil(offset / align) != align * math.ceil(avail / align):
                raise CheckpointReadError(f"{self.tag}: param_shapes of group {g} hold {offset} values, the fp32 partitions {avail}; {run_zero_to_fp32}")
        shared = dict(states.get("shared_params") or {})
        frozen = dict(states.get("frozen_param_fragments") or {})
        buffers = set(states.get("buffer_names") or [])
        raw = [k for k in self._module if k not in shared and (k in self._where or k in buffers or k in frozen)]
        raw += [k for k in self._where if k not in raw]
        self._frozen = frozen
        canon = canonical_names(raw + list(shared))
        self._raw = {canon[r]: r for r in raw}
        self.aliases = {canon[a]: canon[t] for a, t in shared.items() if t in canon}

    # --- tensors ----------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._raw)

    def info(self, name: str) -> TensorInfo:
        raw = self._raw[name]
        if raw in self._where:
            return TensorInfo(tuple(self._where[raw][2]), torch.float32)
        t = self._frozen.get(raw, self._module.get(raw))
        return TensorInfo(tuple(t.shape), t.dtype)

    def tensor(self, name: str) -> torch.Tensor:
        raw = self._raw[name]
        if raw not in self._where:
            return self._frozen.get(raw, self._module.get(raw))
        return self._slice(raw, [r["single_partition_of_fp32_groups"] for r in self._ranks])

    def _slice(self, raw: str, flat: list) -> torch.Tensor:
        """The parameter's values from the rank slices of its group's flat vector (only the ranks it spans)."""
        g, offset, shape = self._where[raw]
        n, parts, start = math.prod(shape), [], 0
        for rank in flat:
            piece = rank[g]
            lo, hi = max(offset, start), min(offset + n, start + piece.numel())
            if lo < hi:
                parts.append(piece.reshape(-1)[lo - start : hi - start])
            start += piece.numel()
        return torch.cat(parts).reshape(shape).clone()

    def files(self) -> list[Path]:
        return [self.tag / MODEL_STATES, *self._optim_files]

    # --- what the trainer saved beside the weights --------------------------------------------------------
    @cached_property
    def config(self) -> dict:
        return config_beside(self.ref.path)

    def model_args(self) -> dict | None:
        return self.config or None

    def lr_log(self) -> list[tuple[int, float]]:
        return trainer_lr_log(self.ref.path)

    def optimizer(self) -> OptimizerState | None:
        """Adam's moments of the flat partitions, cut back into parameters as the fp32 weights are."""
        bases = [r.get("base_optimizer_state") for r in self._ranks]
        if any(b is None for b in bases):
            return None
        if isinstance(bases[0], dict):  # torch optimizer.state_dict() of the flat groups (the default)
            per_group = [[b["state"].get(g, {}) for g in range(len(b["param_groups"]))] for b in bases]
            groups = [{k: v for k, v in g.items() if k != "params"} for g in bases[0]["param_groups"]]
        else:  # elastic checkpoints: one lean state per group, no param_groups
            per_group, groups = [list(b) for b in bases], [{} for _ in bases[0]]
        lean = [[p.numel() for p in r["single_partition_of_fp32_groups"]] for r in self._ranks]
        by_raw = {raw: name for name, raw in self._raw.items()}
        per_param = {}
        for raw, (g, _, _) in self._where.items():
            keys = [k for k, v in per_group[0][g].items() if isinstance(v, torch.Tensor) and v.ndim > 0] + (["step"] if "step" in per_group[0][g] else [])

            def load(raw=raw, g=g, keys=keys):
                out = {k: self._slice(raw, [{g: s[g][k][: n[g]]} for s, n in zip(per_group, lean)]) for k in keys if k != "step"}
                if "step" in keys:
                    out["step"] = float(torch.as_tensor(per_group[0][g]["step"]))
                return out

            per_param[by_raw[raw]] = LazyState(keys, load)
        for g, group in enumerate(groups):
            group["names"] = [by_raw[raw] for raw, (gg, _, _) in self._where.items() if gg == g]
        return OptimizerState(self.tag, per_param, groups, f"ZeRO partitions cut by param_shapes ({len(self._ranks)} ranks)")  # type: ignore[arg-type]


class DeepSpeedLayout(Layout):
    name = "deepspeed"
    summary = "DeepSpeed ZeRO: global_stepN/ with mp_rank_00_model_states.pt and *_optim_states.pt (in checkpoint-N/ or alone)"

    def probe(self, path: Path) -> Candidate | None:
        if not path.is_dir():
            return None
        tag = tag_dir(path)
        if tag is None:
            return None
        if (path / STATE_FILE).is_file():
            return trainer_candidate(path, self.name)
        if tag == path and (path / MODEL_STATES).is_file():
            try:
                step = load_deepspeed_file(path / MODEL_STATES).get("global_steps")
            except (CheckpointReadError, PickleRefusedError):
                step = None
            if isinstance(step, int):
                return Candidate(path, self.name, step, f"{path.name}/{MODEL_STATES}:global_steps")
        return Candidate(path, self.name)

    def find(self, root: Path) -> list[Candidate]:
        found = [c for p in sorted(root.iterdir()) if (c := self.probe(p)) is not None]
        own = self.probe(root) if not found else None  # a save_dir's own ``latest`` names one of its tags
        return found + ([own] if own is not None else [])

    def open(self, ref: CheckpointRef, *, trust_pickles: bool = False) -> Checkpoint:
        return DeepSpeedCheckpoint(ref, trust_pickles=trust_pickles)
