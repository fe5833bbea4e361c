"""Shared fixtures: real runs written once per test session by the real trainers (tests/fixtures/trainers.py)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from fixtures import trainers

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, trainers.RunInfo]:
    """Every layout's run, written once: {name: RunInfo}. About 15 s on 2 cores."""
    base = tmp_path_factory.mktemp("runs")
    out: dict[str, trainers.RunInfo] = {}
    out["hf"] = trainers.write_hf_trainer_run(base / "hf")
    out["hf-bf16-sharded"] = trainers.write_hf_sharded_bf16_run(base / "hf-bf16-sharded", out["hf"].root)
    out["hf-bin"] = trainers.write_hf_bin_run(base / "hf-bin", out["hf"].root)
    out["trl"] = trainers.write_trl_run(base / "trl")
    out["peft"] = trainers.write_peft_run(base / "peft")
    out["lightning"] = trainers.write_lightning_run(base / "lightning")
    (base / "nanogpt").mkdir()
    out["nanogpt"] = trainers.write_nanogpt_run(base / "nanogpt" / "run")
    out["plain"] = trainers.write_plain_loop_run(base / "plain")
    out["safetensors"] = trainers.write_safetensors_dir_run(base / "safetensors")
    out["dcp"] = trainers.write_dcp_run(base / "dcp")
    return out


#: run name -> the layout ckptforce must detect.
EXPECTED_LAYOUT = {
    "hf": "hf", "hf-bf16-sharded": "hf", "hf-bin": "hf", "trl": "hf", "peft": "peft",
    "lightning": "lightning", "nanogpt": "torch", "plain": "torch", "safetensors": "safetensors", "dcp": "dcp",
}  # fmt: skip


def tree_digest(root: Path) -> str:
    """A hash of every file's path, size, mtime and bytes under root: equal before and after = untouched."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            st = p.stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def one_thread_module():
    """One intra-op thread for a module of tiny models: two threads on two shared cores spin-wait each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
