"""Direct, obviously correct readings of each layout's files with the plain loaders: the oracle the readers
are compared with. Each returns {canonical name: float64 tensor} with wrapper prefixes stripped and a tied
weight listed once under its first name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def _strip(sd: dict, prefixes=("module.", "_orig_mod.", "base_model.model.")) -> dict:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            k = k.removeprefix(p)
        out[k] = v
    return out


def _untie(sd: dict) -> dict:
    seen, out = set(), {}
    for k, v in sd.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        if key not in seen:
            seen.add(key)
            out[k] = v
    return out


def _f64(sd: dict) -> dict:
    return {k: v.double() for k, v in sd.items() if v.dtype.is_floating_point}


def hf(folder: Path) -> dict:
    if (folder / "model.safetensors").exists():
        return _f64(load_file(folder / "model.safetensors"))
    if (folder / "model.safetensors.index.json").exists():
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        sd = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(load_file(folder / shard))
        return _f64(sd)
    return _f64(_untie(torch.load(folder / "pytorch_model.bin", weights_only=True)))


def peft(folder: Path) -> dict:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    sd = _strip(load_file(folder / "adapter_model.safetensors"))
    scale = cfg["lora_alpha"] / (math.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    out = {}
    for k in sd:
        if ".lora_A." in k:
            module = k.split(".lora_A.")[0]
            delta = scale * sd[module + ".lora_B.weight"].double() @ sd[k].double()
            out[module + ".weight"] = delta.T if cfg.get("fan_in_fan_out") else delta
    return out


def lightning(path: Path) -> dict:
    return _f64(torch.load(path, weights_only=True)["state_dict"])


def torch_file(path: Path) -> dict:
    obj = torch.load(path, weights_only=True)
    sd = obj["model"] if "model" in obj else obj
    return _f64(_strip(_untie(sd)))


def safetensors_file(path: Path) -> dict:
    return _f64(load_file(path))


def dcp_states(states: dict) -> dict:
    return _f64({k.removeprefix("model."): v for k, v in states.items()})


def state(run_name: str, info, index: int) -> dict:
    """The direct reading of checkpoint ``index`` of a fixture run."""
    path = info.checkpoints[index]
    if run_name.startswith(("hf", "trl")):
        return hf(path)
    if run_name == "peft":
        return peft(path)
    if run_name == "lightning":
        return lightning(path)
    if run_name in ("nanogpt", "plain"):
        return torch_file(path)
    if run_name == "safetensors":
        return safetensors_file(path)
    if run_name == "dcp":
        return dcp_states(info.extra["states"][info.steps[index]])
    raise KeyError(run_name)
