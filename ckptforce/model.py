"""Model binding: a checkpoint's tensors -> a pure function ``logits(params, batch)``.

The module is built once (a skeleton holding the structure and buffers); every checkpoint is then evaluated
through ``torch.func.functional_call`` with its own parameter dict, so nothing is rebuilt per checkpoint and
forward-mode AD (``torch.func.jvp``) composes with it. Two sources:

* a Hugging Face model from the run's ``config.json`` (the default when there is one), offline, built with
  ``attn_implementation="eager"`` — SDPA / flash kernels implement neither forward-mode AD nor a second
  derivative (measured: both fail on CPU), eager attention does both;
* any PyTorch model through ``--model package.module:factory``; the factory is called with the model
  arguments saved in the checkpoint (nanoGPT ``model_args``, Lightning ``hyper_parameters``) when it takes
  an argument. Such models run under ``sdpa_kernel(MATH)`` so ``F.scaled_dot_product_attention`` inside
  them is differentiable both ways.

A PEFT adapter is bound over a local base model (``--base-model``): W = W_base + scale·BA.

``BoundModel.logits`` returns (B, T, V) for language models and (B, 1, V) for classifiers (one "position"),
so the force code treats both alike. For a Hugging Face causal LM whose logits are exactly lm_head(base(x))
(checked once), ``head()`` names W (and b) and ``body`` gives the hidden states (B, T, H) the head reads, so the
forces can apply the head at the response positions only (``forces.head.SplitLM``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from .discover import CheckpointRef
from .errors import ModelBindError, NonFiniteWeightsError
from .numerics import keep_float64
from .io import Checkpoint
from .io.base import describe_keys
from .io.hf import HfLayout


@dataclass
class BoundModel:
    """A model skeleton and how to evaluate it on a parameter dict."""

    module: nn.Module
    kind: str  # "lm" or "classifier"
    source: str  # "hf-config:<path>" or "factory:<spec>"
    attention: str  # how attention is evaluated: "eager", "sdpa (math kernel)", or "none"
    context: int | None = None  # longest sequence the model takes (n_positions), when known
    base: dict[str, torch.Tensor] = field(default_factory=dict)  # PEFT: the base weights under the adapter
    _takes_mask: bool = True
    _head: tuple | None = None  # (base prefix, head weight name, bias name) once found; () when the head does not split

    @property
    def vocab_size(self) -> int | None:
        """Rows of a language model's input embedding (the token ids it takes), when it has one."""
        if self.kind != "lm":
            return None
        get = getattr(self.module, "get_input_embeddings", None)
        emb = get() if callable(get) else next((m for m in self.module.modules() if isinstance(m, nn.Embedding)), None)
        return emb.num_embeddings if isinstance(emb, nn.Embedding) else None

    @property
    def param_names(self) -> list[str]:
        return [n for n, _ in self.module.named_parameters()]

    def to(self, device: str | torch.device, dtype: torch.dtype | None = None) -> "BoundModel":
        """Move the skeleton (its buffers matter) and the PEFT base weights; returns self."""
        self.module.to(device=device, dtype=dtype)
        self.base = {n: t.to(device=device, dtype=dtype or t.dtype) for n, t in self.base.items()}
        return self

    def logits(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """Logits of ``batch`` under ``params``: (B, T, V) for a language model, (B, 1, V) for a classifier.

        With float64 parameters nothing inside the model is rounded to float32 (``keep_float64``)."""
        wide = any(p.dtype == torch.float64 for p in params.values())
        with _math_attention(), keep_float64() if wide else contextlib.nullcontext():
            if self.kind == "classifier":
                out = functional_call(self.module, params, (batch.x,))
                return _as_logits(out).unsqueeze(1)  # (B, 1, V)
            kwargs = {"attention_mask": batch.attention_mask} if self._takes_mask else {}
            out = functional_call(self.module, params, (batch.input_ids,), kwargs)
            return _as_logits(out)  # (B, T, V)

    def head(self) -> tuple[str, str | None] | None:
        """(W's name, b's name) when this is a Hugging Face causal LM whose logits are exactly z = h Wᵀ + b of
        ``body``'s hidden states (checked once, on a short input): the forces then apply the head themselves at
        the response positions only (``forces.head.SplitLM``). None for every other model."""
        if self._head is None:
            self._head = _find_head(self) or ()
        return self._head[1:] if self._head else None

    def body(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """The hidden states (B, T, H) the head reads (after the final norm), called as ``logits`` is; needs ``head()``."""
        if not self.head():
            raise ModelBindError(f"{self.source}: the model's logits are not one linear head over its hidden states")
        return self._body(self._head[0], params, batch)

    def _body(self, prefix: str, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """The base model's last hidden state (B, T, H): what the head reads, after the final norm."""
        base = self.module.get_submodule(prefix)
        own = {n[len(prefix) + 1 :]: p for n, p in params.items() if n.startswith(prefix + ".")}
        wide = any(p.dtype == torch.float64 for p in params.values())
        with _math_attention(), keep_float64() if wide else contextlib.nullcontext():
            out = functional_call(base, own, (batch.input_ids,), {"attention_mask": batch.attention_mask, "use_cache": False})
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def last_hidden(self, params: dict[str, torch.Tensor], batch) -> torch.Tensor:
        """The last layer's hidden states (B, T, H) of ``batch`` under ``params``: ``hidden_states[-1]`` of a
        Hugging Face causal LM, the vectors its head turns into the logits (after the final norm), called
        exactly as ``logits`` is. A model that does not return ``hidden_states`` is a ModelBindError."""
        if self.kind != "lm":
            raise ModelBindError(f"{self.source}: a classifier has no response positions; hidden states are read for language models")
        wide = any(p.dtype == torch.float64 for p in params.values())
        with _math_attention(), keep_float64() if wide else contextlib.nullcontext():
            kwargs = {"attention_mask": batch.attention_mask} if self._takes_mask else {}
            try:
                out = functional_call(self.module, params, (batch.input_ids,), {**kwargs, "output_hidden_states": True})
            except TypeError as e:
                raise ModelBindError(f"{self.source}: the model takes no output_hidden_states ({_first_line(e)}); "
                                     "last-layer scores (CHES) need a Hugging Face causal LM") from e  # fmt: skip
        hidden = getattr(out, "hidden_states", None)
        if not hidden:
            raise ModelBindError(f"{self.source}: the model returns no hidden_states; last-layer scores (CHES) need a Hugging Face causal LM")
        return hidden[-1]  # (B, T, H)

    def params_from(self, ckpt: Checkpoint, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors as this module's parameter dict (floating tensors cast to ``dtype``)."""
        own = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        names = ckpt.names()
        if ckpt.layout == "peft":
            return self._peft_params(ckpt, own, device, dtype)
        unknown = [n for n in names if n not in own and n not in buffers]
        missing = [n for n in own if n not in names and n not in ckpt.aliases]
        if unknown or missing:
            what = f"{describe_keys(missing)} missing from the checkpoint" if missing else f"{describe_keys(unknown)} not in the model"
            raise ModelBindError(f"{ckpt.path}: its tensors do not fit the model from {self.source} ({what}); pass the right --model")
        out = {}
        for n in names:
            t = _finite(ckpt, n, ckpt.tensor(n))
            if own.get(n) is not None and tuple(own[n].shape) != tuple(t.shape):
                raise ModelBindError(
                    f"{ckpt.path}: tensor {n!r} has shape {list(t.shape)}, the model from {self.source} expects "
                    f"{list(own[n].shape)}; all checkpoints of a run must share one model: move the others out of "
                    "the run directory, or pass the right --model"
                )
            out[n] = t.to(device=device, dtype=dtype if t.dtype.is_floating_point else t.dtype)
        return out

    def _peft_params(self, ckpt: Checkpoint, own: dict, device, dtype) -> dict[str, torch.Tensor]:
        if not self.base:
            raise ModelBindError(f"{ckpt.path}: a LoRA adapter needs its base model; pass --base-model DIR")
        out = {n: t.to(device=device, dtype=dtype) for n, t in self.base.items()}
        for n in ckpt.names():
            if n not in out:
                raise ModelBindError(f"{ckpt.path}: the adapter changes {n!r}, which the base model does not have")
            low = ckpt.factors(n)
            if low is not None:  # scale·BA formed in the analysis dtype (float32 at least): float64 stays exact
                wide = torch.float64 if dtype == torch.float64 else torch.float32
                delta = low.scale * (low.left.to(device=device, dtype=wide) @ low.right.to(device=device, dtype=wide))
                out[n] = out[n] + _finite(ckpt, n, delta).to(device=device, dtype=dtype)
            else:  # a fully trained tensor (modules_to_save): the adapter keeps the whole copy
                out[n] = _finite(ckpt, n, ckpt.tensor(n)).to(device=device, dtype=dtype)
        return out


def _find_head(model: BoundModel) -> tuple[str, str, str | None] | None:
    """(base model prefix, W's name, b's name) of a Hugging Face causal LM whose logits are lm_head(base(x)), or
    None: not such a model, or its forward does more (logit soft-capping, scaling), found by comparing the two on
    a short input with the skeleton's own weights (the head's scaled up: large logits)."""
    module = model.module
    get_out = getattr(module, "get_output_embeddings", None)
    head = get_out() if model.kind == "lm" and model._takes_mask and callable(get_out) else None
    prefix = getattr(module, "base_model_prefix", "")
    if not isinstance(head, nn.Linear) or not prefix or not isinstance(getattr(module, prefix, None), nn.Module):
        return None
    names = {id(p): n for n, p in module.named_parameters()}  # the first name of a tied tensor
    weight = names.get(id(head.weight))
    bias = names.get(id(head.bias)) if head.bias is not None else None
    if weight is None or (head.bias is not None and bias is None):
        return None
    # the head's weight scaled up, so that logits are large (a soft cap, x ↦ c·tanh(x/c), is the identity near 0)
    params = {n: 100 * p if n == weight else p for n, p in module.named_parameters()}
    vocab = head.weight.shape[0]
    device = head.weight.device
    ids = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab]], device=device)
    probe = type("Probe", (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})()
    try:
        with torch.no_grad():
            full = model.logits(params, probe)
            h = model._body(prefix, params, probe)
            split = nn.functional.linear(h, params[weight], params[bias] if bias else None)
    except Exception:  # noqa: BLE001 - a base model that cannot be called alone: no split
        return None
    if full.shape != split.shape or not torch.allclose(full, split, rtol=1e-4, atol=1e-4 * float(full.abs().max())):
        return None
    return prefix, weight, bias


def _finite(ckpt: Checkpoint, name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` when it holds no NaN / Inf; else a NonFiniteWeightsError naming the checkpoint and tensor."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = t.numel() - int(torch.isfinite(t).sum())
        raise NonFiniteWeightsError(
            f"{ckpt.path}: tensor {name!r} holds {bad} NaN/Inf value(s) of {t.numel()}: the run diverged at or before "
            "this checkpoint and forces through it are undefined; analyze the checkpoints before it (copy them to "
            "another folder), and see where it diverged with ckptforce scan"
        )
    return t


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _as_logits(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ModelBindError(f"the model returned {type(out).__name__}; it must return logits (or an object with .logits)")


@contextlib.contextmanager
def _math_attention():
    """Run F.scaled_dot_product_attention with its math kernel: the only one with forward-mode AD."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.MATH]):
        yield


def bind_hf(config_dir: Path, *, base_model: Path | None = None) -> BoundModel:
    """A Hugging Face causal LM from ``config_dir/config.json``, built offline with eager attention."""
    try:
        import transformers
    except ImportError as e:
        raise ModelBindError("binding a Hugging Face model needs transformers: pip install 'ckptforce[hf]'") from e
    cfg_file = config_dir / "config.json"
    try:
        cfg = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
        with _quiet_transformers():
            module = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for an unknown config
        raise ModelBindError(f"{cfg_file}: cannot build the model offline ({type(e).__name__}: {_first_line(e)}); pass --model package.module:factory") from e
    module.eval().requires_grad_(False)
    context = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    bound = BoundModel(module, "lm", f"hf-config:{cfg_file}", "eager", context)
    if base_model is not None:
        bound.base = _read_base(base_model)
    return bound


def _read_base(path: Path) -> dict[str, torch.Tensor]:
    layout = HfLayout()
    if layout.probe(path) is None:
        raise ModelBindError(f"{path}: --base-model must be a Hugging Face model folder (config.json + model.safetensors)")
    with layout.open(CheckpointRef(path, "hf", 0, "init")) as base:
        return {n: base.tensor(n) for n in base.names()}


def load_factory(spec: str, *, flag: str = "--model", what: str = "a function that returns the nn.Module") -> Callable:
    """``package.module:function`` -> the function; the current directory is importable, as for python -m."""
    if ":" not in spec:
        raise ModelBindError(f"{flag} {spec!r}: write it as package.module:function ({what})")
    mod_name, fn_name = spec.split(":", 1)
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 - the user's module may fail in any way on import
        raise ModelBindError(f"{flag} {spec}: cannot import {mod_name} ({type(e).__name__}: {_first_line(e)}); check the name and that it is on PYTHONPATH") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ModelBindError(f"{flag} {spec}: {mod_name} has no function {fn_name!r}")
    return fn


def bind_factory(spec: str, *, kind: str = "lm", model_args: dict | None = None, context: int | None = None) -> BoundModel:
    """A user's model: ``factory(model_args)`` when it takes an argument, else ``factory()``."""
    fn = load_factory(spec)
    takes_args = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL) for p in inspect.signature(fn).parameters.values())
    try:
        module = fn(model_args or {}) if takes_args else fn()
    except Exception as e:  # noqa: BLE001
        raise ModelBindError(f"--model {spec}: the factory failed ({type(e).__name__}: {_first_line(e)})") from e
    if not isinstance(module, nn.Module):
        raise ModelBindError(f"--model {spec}: the factory returned {type(module).__name__}, not a torch.nn.Module")
    module.eval().requires_grad_(False)
    forward = inspect.signature(module.forward).parameters
    context = context or (model_args or {}).get("block_size") or (model_args or {}).get("n_positions")
    return BoundModel(module, kind, f"factory:{spec}", "sdpa (math kernel)", context, _takes_mask="attention_mask" in forward)


@contextlib.contextmanager
def _quiet_transformers():
    import transformers

    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def bind(ckpt: Checkpoint, *, model: str | None = None, kind: str = "lm", base_model: Path | None = None, run_root: Path | None = None) -> BoundModel:
    """The model for a run: ``--model`` when given; for a LoRA adapter, its base model (``--base-model``, or
    the local folder its adapter_config.json names); else the Hugging Face config beside the checkpoint."""
    if model:
        return bind_factory(model, kind=kind, model_args=ckpt.model_args())
    if ckpt.layout == "peft":
        named = (getattr(ckpt, "config", None) or {}).get("base_model_name_or_path")
        base = base_model or (Path(named) if named and Path(named, "config.json").is_file() else None)
        if base is None:
            raise ModelBindError(
                f"{ckpt.path}: a LoRA adapter needs its base model (adapter_config.json names {named!r}, "
                "not a local folder); pass --base-model DIR"
            )
        return bind_hf(Path(base), base_model=Path(base))
    for folder in (ckpt.path if ckpt.path.is_dir() else ckpt.path.parent, run_root):
        if folder is not None and (folder / "config.json").is_file():
            return bind_hf(folder)
    raise ModelBindError(f"{ckpt.path}: no config.json beside the checkpoint or at the run root; pass --model package.module:factory")
