"""How much of the probe rows goes through one forward / JVP / backward, and through the LM head at once: from a
memory budget, not a guess.

The budget (``--memory GB``) covers the analysis: first the parameters it holds — ``RESIDENT_COPIES`` copies of θ
(the model, θ_t, θ_{t+1}, Δθ, a node of the path) and ``RUNTIME_GB`` for the interpreter and libraries — then the work on the probe rows. A chunk of R rows of width T (prompt + response
tokens) costs, at the peak of a JVP or a factored split,

    R · T · (c_V · V + c_A · d · L + c_S · n_heads · T · L) · bytes

with V the vocabulary, d the hidden size, L the layers, n_heads the attention heads; c_V = ``VOCAB_COPIES``
tensors of (T, V) per row are alive at once (logits, their tangent or output gradient, softmax and log-softmax,
the head's own tangent), c_A = ``ACTIVATION_COPIES`` hidden-sized tensors per layer and position (what autograd
keeps for attention and the MLP, and the captured factors), c_S = ``ATTENTION_COPIES`` (T, T) score maps per head
and layer (eager attention). ``rows_per_chunk`` takes the largest R that fits (at least 1: one row always runs),
so memory stays bounded whatever the response length and the vocabulary.

A model whose head ckptforce applies itself (``forces.head.SplitLM``) has no vocabulary term per row: the head
runs on ``HEAD_SHARE`` of the budget, ``head_chunks`` positions × vocabulary entries at a time, ``HEAD_COPIES``
tensors of that size at once.
"""

from __future__ import annotations

import os

VOCAB_COPIES = 8
#: Measured on GPT-2 small (bench/scale.py's rows, 18 positions): one factored split's capture of 172 rows took
#: 4.7 GiB, 41 hidden-sized numbers per position and layer (each owning module's input, and its output gradient
#: for y and y*, beside what autograd keeps); the JVP and observe take less and share the figure.
ACTIVATION_COPIES = 44
ATTENTION_COPIES = 3
#: Parameter-sized tensors held during an interval: the model's own, θ_t, θ_{t+1}, Δθ, and θ at a node of the
#: path; and the GiB taken beside them and the rows: the interpreter, torch and the libraries (~0.5 with
#: transformers) and the workspace of a factored split that does not grow with its rows (measured on GPT-2 small:
#: 0.6 GiB beyond the head's share, whatever the chunk).
RESIDENT_COPIES = 5
RUNTIME_GB = 1.1
#: Share of the rows' budget given to the streamed LM head, and the (positions, vocabulary) tensors alive in it:
#: z − μ, e^{z−μ}, δz and the part of it being added, the elementwise product a sum over the vocabulary reduces, and a
#: half-precision product before it is widened (forces/head.py).
HEAD_SHARE = 0.25
HEAD_COPIES = 6
#: The head takes the whole vocabulary at once unless that leaves fewer positions than this per chunk.
MIN_HEAD_POSITIONS = 64
#: Share of the rows' budget for the per-row gradients and directions of the batched training forces; the probe
#: rows take half of their chunk size and the training rows a quarter of theirs beside it.
BATCHED_SHARE = 0.25
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
                   heads: int | None = None, dtype_bytes: int = 4) -> int:  # fmt: skip
    """The largest number of rows whose peak fits ``budget_gb`` (≥ 1); ``vocab=None`` for a streamed head."""
    width = max(1, width)
    per_position = VOCAB_COPIES * (vocab or 0) + ACTIVATION_COPIES * (hidden or 0) * (layers or 0) + ATTENTION_COPIES * (heads or 0) * width * (layers or 0)
    per_row = width * max(1, per_position) * dtype_bytes
    return max(1, int(budget_gb * 2**30 // per_row))


def rows_budget(budget_gb: float, *, parameters: int, dtype_bytes: int = 4) -> float:
    """GiB left for the probe rows once ``RESIDENT_COPIES`` copies of ``parameters`` numbers and the runtime are
    held; at least a quarter of the budget (a model bigger than the budget still runs, in small chunks)."""
    resident = RUNTIME_GB + RESIDENT_COPIES * parameters * dtype_bytes / 2**30
    return max(budget_gb - resident, budget_gb / 4)


def head_chunks(budget_gb: float, *, vocab: int, dtype_bytes: int = 4) -> tuple[int, int]:
    """(positions, vocabulary entries) per chunk of a streamed LM head within ``HEAD_SHARE`` of ``budget_gb``:
    the whole vocabulary while that leaves ``MIN_HEAD_POSITIONS`` positions, else slices of it."""
    cells = max(1, int(HEAD_SHARE * budget_gb * 2**30 // (HEAD_COPIES * max(4, dtype_bytes))))  # reductions: float32 at least
    vocab_chunk = max(1, min(vocab, cells // MIN_HEAD_POSITIONS))
    return max(1, cells // vocab_chunk), vocab_chunk


def batched_elements(rows_gb: float, params: dict) -> int:
    """Numbers the batched training forces (``forces/batched.py``: the directions' δW and a chunk of probe rows'
    per-row gradients of one linear layer) may hold at once: ``BATCHED_SHARE`` of the rows' budget."""
    dtype_bytes = next((t.element_size() for t in params.values() if t.is_floating_point()), 4)
    return max(2**16, int(BATCHED_SHARE * max(rows_gb, 0.25) * 2**30 // dtype_bytes))


def model_shape(module) -> tuple[int | None, int | None]:
    """(hidden size, layers) of a Hugging Face model's config, (None, None) for anything else."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None, None
    return _config_int(cfg, "hidden_size", "n_embd", "d_model"), _config_int(cfg, "num_hidden_layers", "n_layer", "num_layers")


def attention_heads(module) -> int | None:
    """Attention heads of a Hugging Face model's config, None for anything else."""
    cfg = getattr(module, "config", None)
    return None if cfg is None else _config_int(cfg, "num_attention_heads", "n_head", "num_heads")


def _config_int(cfg, *names: str) -> int | None:
    return next((getattr(cfg, n) for n in names if isinstance(getattr(cfg, n, None), int)), None)


#: Cost of each piece of an interval in plain forwards over the same rows (bench/scale.py, GPT-2 small, 2 CPU cores,
#: stop 22: 26.0 forwards per interval by default, 18.4 with --no-by-tensor, start-up included; per stage 1.0–1.3
#: per observe, 3.9 for the JVP, ~5.5 per factored split): observing both ends, the JVP of Δ_lin, and one factored
#: split (forward + two backwards + the contraction).
COST_OBSERVE, COST_JVP, COST_SPLIT = 2.5, 4.0, 5.5


def forwards_per_interval(by_tensor: bool, nodes: int) -> float:
    """The probe rows' work of one interval, in forwards (without --train): 2 + JVP + split + the path's nodes
    (a factored split at each node with the split by tensor, a JVP without)."""
    split = COST_SPLIT if by_tensor else 0.0
    return COST_OBSERVE + COST_JVP + split + nodes * (COST_SPLIT if by_tensor else COST_JVP)


#: The training examples' forces (``--train``) in the same unit: per interval a fixed part (the first example checked
#: against its JVP, the per-token split's two JVPs, the captures: three JVPs and a split) and a part per example.
#: Measured in ``analyze`` (bench/scale.py --train 256, GPT-2 small, 288 probe rows, 2 cores, stop 24): 191.7
#: forwards for the interval with 256 SFT examples, 0.62 per example beyond the probe rows' work and this fixed part.
#: ``--forces approximate`` (the same bench with ``--forces approximate``, stop 25, the probe factors captured again per
#: block at the default budget): 108.4 forwards, 0.29 per example once the exact check of 8 examples is counted.
COST_TRAIN_FIXED, COST_EXAMPLE = 3 * COST_JVP + COST_SPLIT, 0.7
COST_EXAMPLE_APPROX = 0.3


def training_forwards(examples: int, *, approximate: bool = False, checked: int = 0) -> float:
    """The training forces of one interval, in forwards over the probe rows: ``examples`` per interval, of which
    ``checked`` also get their exact forces when ``approximate``."""
    per = COST_EXAMPLE_APPROX if approximate else COST_EXAMPLE
    return COST_TRAIN_FIXED + examples * per + (checked * COST_EXAMPLE if approximate else 0.0)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
