"""How many probe rows go through one forward / JVP / backward: from a memory budget, not a guess.

A chunk of R rows of width T (prompt + response tokens) costs, at the peak of a JVP or a factored split,

    R · T · (c_V · V + c_A · d · L) · bytes                  (the vocabulary-sized tensors and the activations)

with V the vocabulary, d the hidden size, L the layers; c_V = ``VOCAB_COPIES`` tensors of (T, V) per row are
alive at once (logits, their tangent or output gradient, softmax and log-softmax, the head's own tangent) and
c_A = ``ACTIVATION_COPIES`` hidden-sized tensors per layer and position (what autograd keeps for attention and
the MLP). ``rows_per_chunk`` takes the largest R that fits ``budget`` (at least 1: one row always runs), so
memory stays bounded whatever the response length and the vocabulary.
"""

from __future__ import annotations

import os

VOCAB_COPIES = 8
ACTIVATION_COPIES = 24
#: The budget when none is given: this share of the machine's memory (of the GPU's free memory on cuda) …
DEFAULT_SHARE = 0.25
#: … and never more than this many GiB on a CPU (the rest is for the checkpoints and the OS).
DEFAULT_CAP_GB = 8.0


def default_memory_gb(device: str = "cpu") -> float:
    """The budget for ``--memory`` when the user gives none: a quarter of RAM (≤ 8 GiB), or of the GPU's free memory."""
    if str(device).startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return DEFAULT_SHARE * 2 * free / 2**30  # half the free memory of the GPU
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 2.0
    return min(DEFAULT_CAP_GB, DEFAULT_SHARE * total / 2**30)


def rows_per_chunk(budget_gb: float, *, width: int, vocab: int | None, hidden: int | None = None, layers: int | None = None,
                   dtype_bytes: int = 4) -> int:  # fmt: skip
    """The largest number of rows whose peak fits ``budget_gb`` (≥ 1)."""
    per_position = VOCAB_COPIES * (vocab or 0) + ACTIVATION_COPIES * (hidden or 0) * (layers or 0)
    per_row = max(1, width) * max(1, per_position) * dtype_bytes
    return max(1, int(budget_gb * 2**30 // per_row))


def model_shape(module) -> tuple[int | None, int | None]:
    """(hidden size, layers) of a Hugging Face model's config, (None, None) for anything else."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None, None
    get = lambda *names: next((getattr(cfg, n) for n in names if isinstance(getattr(cfg, n, None), int)), None)  # noqa: E731
    return get("hidden_size", "n_embd", "d_model"), get("num_hidden_layers", "n_layer", "num_layers")


#: Cost of each piece of an interval in plain forwards over the same rows (bench/scale.py, GPT-2 small, CPU):
#: observing both ends, the JVP of Δ_lin, and one factored split (forward + two backwards + the contraction).
COST_OBSERVE, COST_JVP, COST_SPLIT = 2.0, 3.3, 4.0


def forwards_per_interval(by_tensor: bool, nodes: int) -> float:
    """The probe rows' work of one interval, in forwards (without --train): 2 + JVP + split + the path's nodes
    (a factored split at each node with the split by tensor, a JVP without)."""
    split = COST_SPLIT if by_tensor else 0.0
    return COST_OBSERVE + COST_JVP + split + nodes * (COST_SPLIT if by_tensor else COST_JVP)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
