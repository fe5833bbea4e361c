"""PEFT / LoRA adapter checkpoints: ``adapter_model.safetensors`` + ``adapter_config.json``.

A LoRA adapter adds ``ΔW = scale · B @ A`` to a base weight W (B: (out, r), A: (r, in); scale = alpha / r, or
alpha / √r with rsLoRA; transposed when ``fan_in_fan_out``, as for GPT-2's Conv1D). Each adapted weight is
listed under the base weight's name (``transformer.h.0.attn.c_attn.weight``) and kept factored
(``factors``), so the update between two checkpoints, scale · (B₂A₂ − B₁A₁), never needs a dense matrix.
Other saved tensors (``modules_to_save``) are listed as they are: full copies of the module's weights.

The run's start: PEFT initialises B = 0 (``init_lora_weights`` true or "gaussian"), so before the first step
W = W_base exactly. ``adapter_start`` puts the base model in front of the adapter checkpoints as step 0, opened
as the first adapter with B = 0 (its A stands in for the unsaved initial A, which only the first interval's
factor preconditioner uses).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ..discover import Candidate, CheckpointRef
from ..errors import CheckpointReadError
from .base import Checkpoint, LowRank, OptimizerState, TensorInfo, canonical_names, strip_prefixes
from .hf import HfLayout, read_json, weight_files, trainer_candidate, trainer_lr_log
from .optim import DEFAULT_ORDERS, map_optimizer_state
from .safetensors_ import SafetensorsStore
from .torch_ import load_torch_file

_LORA = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class PeftCheckpoint(Checkpoint):
    layout = "peft"

    def __init__(self, ref: CheckpointRef, *, trust_pickles: bool = False):
        super().__init__(ref)
        self._trust = trust_pickles
        # the run's start (ref.adapter set): ref.path is the base model, the adapter's layout is the first one's
        self.is_start = ref.adapter is not None
        folder = ref.adapter or ref.path
        self.config = read_json(folder / "adapter_config.json")
        st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
        if st.is_file():
            self._files = [st]
            store = SafetensorsStore([st])
            self._get = store.get
            raw_info = dict(store.info)
        elif pt.is_file():
            self._files = [pt]
            sd = load_torch_file(pt, trust_pickles=trust_pickles)
            self._get = sd.__getitem__
            raw_info = {k: TensorInfo(tuple(v.shape), v.dtype) for k, v in sd.items()}
        else:
            raise CheckpointReadError(f"{folder}: adapter_config.json without adapter_model.safetensors or .bin")
        canon = canonical_names(list(raw_info))  # raw -> canonical
        self._pairs: dict[str, dict[str, str]] = {}  # weight name -> {"A": raw, "B": raw}
        self._dense: dict[str, str] = {}  # canonical -> raw, for non-LoRA tensors
        for raw, name in canon.items():
            m = _LORA.match(name)
            if m:
                self._pairs.setdefault(m["module"] + ".weight", {})[m["which"]] = raw
            else:
                self._dense[name] = raw
        broken = [n for n, p in self._pairs.items() if set(p) != {"A", "B"}]
        if broken:
            raise CheckpointReadError(f"{st if st.is_file() else pt}: LoRA factor missing for {broken[0]} (needs both lora_A and lora_B)")
        self._raw_info = raw_info

    def names(self) -> list[str]:
        return list(self._pairs) + list(self._dense)

    def info(self, name: str) -> TensorInfo:
        if name in self._dense:
            return self._raw_info[self._dense[name]]
        a, b = (self._raw_info[self._pairs[name][k]] for k in "AB")
        shape = (b.shape[0], a.shape[1])
        return TensorInfo(shape[::-1] if self.config.get("fan_in_fan_out") else shape, a.dtype)

    def factors(self, name: str) -> LowRank | None:
        if name not in self._pairs:
            return None
        a = self._get(self._pairs[name]["A"])  # (r, in)
        b = self._get(self._pairs[name]["B"])  # (out, r)
        if self.is_start:
            b = torch.zeros_like(b)
        scale = self.scale(name)
        if self.config.get("fan_in_fan_out"):
            return LowRank(a.T, b.T, scale)  # (in, r) @ (r, out)
        return LowRank(b, a, scale)  # (out, r) @ (r, in)

    def tensor(self, name: str) -> torch.Tensor:
        if name in self._dense:
            return self._base_tensor(name) if self.is_start else self._get(self._dense[name])
        return self.factors(name).dense()

    def _base_tensor(self, name: str) -> torch.Tensor:
        """A fully trained tensor (modules_to_save) at the run's start: the base model's own."""
        from .hf import HfCheckpoint

        with HfCheckpoint(dataclasses.replace(self.ref, layout="hf", adapter=None), trust_pickles=self._trust) as base:
            if name not in base.names():
                raise CheckpointReadError(f"{self.ref.path}: the base model has no {name!r}, which the adapter trains; give --init")
            return base.tensor(name)

    def scale(self, name: str) -> float:
        """alpha / r (or alpha / √r with rsLoRA), with rank_pattern / alpha_pattern overrides."""
        module = name.removesuffix(".weight")
        r = _pattern_value(self.config.get("rank_pattern") or {}, module, self.config.get("r", 8))
        alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def files(self) -> list[Path]:
        return weight_files(self.ref.path) if self.is_start else list(self._files)

    def lr_log(self) -> list[tuple[int, float]]:
        return [] if self.is_start else trainer_lr_log(self.ref.path)

    # --- the adapter's optimizer state -------------------------------------------------------------------
    def factor_names(self) -> dict[str, tuple[str, str]]:
        """{adapted weight: (its lora_A name, its lora_B name)}, the names the optimizer state is keyed by."""
        canon = canonical_names(list(self._raw_info))
        return {w: (canon[p["A"]], canon[p["B"]]) for w, p in self._pairs.items()}

    def trained(self) -> dict[str, tuple[LowRank, str, str, bool] | None]:
        """What the adapter trains: {weight name: (its factors in W's orientation, the optimizer's name of the
        left factor, of the right one, whether both are stored transposed)} — left/right are B/A, or Aᵀ/Bᵀ
        with ``fan_in_fan_out`` — and None for a fully trained tensor (modules_to_save). The optimizer's steps
        on the factors are mapped to W through these."""
        out: dict = {n: None for n in self._dense}
        fif = bool(self.config.get("fan_in_fan_out"))
        for w, (a, b) in self.factor_names().items():
            out[w] = (self.factors(w), a, b, True) if fif else (self.factors(w), b, a, False)
        return out

    def optimizer(self) -> OptimizerState | None:
        """The Trainer's ``optimizer.pt`` of the adapter, mapped to ``…lora_A.weight`` / ``…lora_B.weight`` names.

        Positions follow the trainable parameters of the PeftModel (decay group, then the rest), rebuilt on the
        meta device from the base model's config and ``adapter_config.json`` when peft is installed; every
        position is checked against the saved factor's shape."""
        f = next((self.ref.path / n for n in ("optimizer.pt", "optimizer.bin") if (self.ref.path / n).is_file()), None)
        if f is None or self.is_start:
            return None
        osd = load_torch_file(f, trust_pickles=self._trust)
        canon = canonical_names(list(self._raw_info))
        info = {canon[r]: i for r, i in self._raw_info.items()}
        orders = dict(DEFAULT_ORDERS)
        base = _local_base_config(self.config)
        exact = peft_parameter_order(json.dumps(base, sort_keys=True), json.dumps(self.config, sort_keys=True)) if base else None
        if exact is not None:
            orders = {"PeftModel's trainable parameters, Trainer decay/no-decay groups": lambda _n, _i: [n for n in exact if n in info], **orders}
        state, problem = map_optimizer_state(osd, list(info), info, source=f, orders=orders)
        if problem:
            self.warnings.append(problem)
        return state


#: ``init_lora_weights`` values under which B = 0 at the start, so the base model is the run's first state.
ZERO_B_INITS = (True, "gaussian", None)


def adapter_start(refs: list[CheckpointRef], *, base_model: Path | None = None) -> tuple[list[CheckpointRef], list[str]]:
    """The adapter checkpoints ``refs`` (step order) with the run's start in front, and a note.

    An ``--init`` that names a plain model (the base) becomes the adapter's start with B = 0; without
    ``--init``, the base model (``base_model``, else the local folder adapter_config.json names) is added as
    step 0 when PEFT initialised B = 0 and no adapter was saved at step 0."""
    if not refs:
        return refs, []
    first = refs[0]
    if first.step_source == "init":
        if first.layout == "peft" or len(refs) < 2:
            return refs, []
        start = dataclasses.replace(first, layout="peft", adapter=refs[1].path)
        return [start, *refs[1:]], [f"the run starts at {first.path} (--init) with the adapter's B = 0, step {first.step}"]
    if first.step == 0:
        return refs, []
    config = read_json(first.path / "adapter_config.json")
    named = config.get("base_model_name_or_path")
    base = base_model or (Path(named) if named else None)
    if base is None or not (base / "config.json").is_file():
        return refs, [f"the base model {named!r} is not a local folder: the run starts at its first checkpoint (step {first.step}); "
                      "pass --base-model DIR to start at the base model"]  # fmt: skip
    init = config.get("init_lora_weights", True)
    if init not in ZERO_B_INITS:
        return refs, [f"the adapter was initialised with init_lora_weights={init!r} (B ≠ 0 or a changed base): the run starts "
                      f"at its first checkpoint (step {first.step}); give the starting adapter with --init"]  # fmt: skip
    start = CheckpointRef(base, "peft", 0, "init", "base model (LoRA B = 0)", adapter=first.path)
    return [start, *refs], [f"the run starts at the base model {base} (step 0, LoRA's B = 0 as PEFT initialises it)"]


def _local_base_config(adapter_config: dict) -> dict | None:
    named = adapter_config.get("base_model_name_or_path")
    path = Path(named, "config.json") if named else None
    return read_json(path) if path is not None and path.is_file() else None


_ADAPTER_NAME = re.compile(r"\.(lora_[A-Za-z_]+|modules_to_save)\.[^.]+\.")


@lru_cache(maxsize=8)
def peft_parameter_order(base_config_json: str, adapter_config_json: str) -> tuple[str, ...] | None:
    """The order in which the Trainer hands a PeftModel's trainable parameters to its optimizer, under the
    names of the saved adapter (``….lora_A.weight``: wrapper prefix and adapter name dropped), or None.

    The base model is built from its config on the meta device and wrapped by peft with the adapter's config:
    no memory, no download; the Trainer's decay group (not bias / norm) first, then the rest."""
    try:
        import peft
        import transformers
        from transformers.trainer_pt_utils import get_parameter_names
    except ImportError:
        return None
    try:
        config = json.loads(adapter_config_json)
        cls = peft.PEFT_TYPE_TO_CONFIG_MAPPING[config["peft_type"]]
        fields = set(cls.__dataclass_fields__)
        kept = {k: v for k, v in config.items() if k in fields and k not in ("peft_type", "revision", "base_model_name_or_path")}
        adapter = cls(**{**kept, "inference_mode": False})  # saved adapters say inference_mode: training had it off
        cfg = transformers.AutoConfig.for_model(**json.loads(base_config_json))
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(cfg), adapter)
    except Exception:  # noqa: BLE001 - any model or adapter we cannot build leaves the order unknown
        return None
    patterns = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
    decay = set(get_parameter_names(model, [torch.nn.LayerNorm], patterns))
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    ordered = [n for n in named if n in decay] + [n for n in named if n not in decay]
    return tuple(strip_prefixes(_ADAPTER_NAME.sub(lambda m: f".{m[1]}.", n)) for n in ordered)


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank/alpha pattern lookup: a key matches when the module name ends with it (or it is a regex)."""
    for key, value in patterns.items():
        if module == key or module.endswith("." + key) or re.fullmatch(key, module):
            return value
    return default


class PeftLayout(HfLayout):
    """Found like the Trainer's folders (checkpoint-N/ and the run root), opened as adapters."""

    name = "peft"
    summary = "PEFT / LoRA adapters: checkpoint-N/ with adapter_model.safetensors and adapter_config.json"

    def probe(self, path: Path) -> Candidate | None:
        if not (path.is_dir() and (path / "adapter_config.json").is_file()):
            return None
        if not any((path / f).is_file() for f in ("adapter_model.safetensors", "adapter_model.bin")):
            return None
        return trainer_candidate(path, self.name)

    def open(self, ref: CheckpointRef, *, trust_pickles: bool = False) -> Checkpoint:
        return PeftCheckpoint(ref, trust_pickles=trust_pickles)
