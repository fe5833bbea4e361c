"""What every recipe shares: an offline, quiet environment, the JSONL writer, and the build manifest."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}
_LOGGERS = ("transformers", "accelerate", "trl", "datasets", "lightning", "lightning.pytorch", "lightning.fabric",
            "lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")  # fmt: skip


@contextlib.contextmanager
def quiet(preimport: tuple[str, ...] = ()) -> Iterator[None]:
    """Offline, CPU-only, no telemetry, library loggers at ERROR and warnings off (restored afterwards).

    ``preimport``: modules imported first (lightning sets its logger levels when imported)."""
    for k, v in _ENV.items():
        os.environ.setdefault(k, v)
    import importlib

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in preimport:
            importlib.import_module(mod)
        saved = {name: logging.getLogger(name).level for name in _LOGGERS}
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one CPU thread: as fast as more on models this small, and the same numbers on every machine."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def fresh_dir(out) -> Path:
    """``out`` created, and refused when it already holds files: trainers would mix two builds in one folder."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; build into a new folder (or remove this one)")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_jsonl(path: Path, rows: Iterable[dict]) -> Path:
    """One JSON object per line, UTF-8, keys in the order given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_manifest(out: Path, recipe: str, config: dict, seconds: dict[str, float], files: dict[str, str]) -> Path:
    """``MANIFEST.json``: the recipe, its settings, the build time per stage and what is where."""
    import torch

    versions = {"torch": torch.__version__}
    for name in ("transformers", "trl", "lightning", "sklearn"):
        with contextlib.suppress(Exception):
            versions[name] = __import__(name).__version__
    manifest = {"recipe": recipe, "config": config, "seconds": seconds, "files": files, "versions": versions}
    path = Path(out) / "MANIFEST.json"
    path.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return path
