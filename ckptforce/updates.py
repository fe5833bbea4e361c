"""Update anatomy: Δθ_t = θ_{t+1} − θ_t between consecutive checkpoints, streamed tensor by tensor.

In: a ``Run`` (ordered checkpoints). Out: an ``Anatomy`` with, per interval and parameter tensor,

    update_norm  ‖Δθ_t‖₂                     param_norm  ‖θ_t‖₂            rel_update  ‖Δθ_t‖ / ‖θ_t‖
    update_cos   ⟨Δθ_{t−1}, Δθ_t⟩ / (‖Δθ_{t−1}‖ ‖Δθ_t‖)   (NaN for the first interval)
    zero_frac    share of entries with Δθ exactly 0   (bf16 rounding makes small updates vanish)
    nonfinite    NaN/Inf entries in θ_{t+1}

plus the learning rate of each interval (the trainer's log when there is one) and a summary of each saved
optimizer state. The loop runs tensor-major: one tensor is read from every checkpoint in turn, so each tensor
of each file is read once and memory holds three copies of one tensor (θ_t, θ_{t+1}, Δθ_{t−1}) whatever the
model size. Arithmetic is float32 whatever the stored dtype. LoRA updates stay factored:
Δ(BA) = [B₂, −B₁] [A₂; A₁], and ‖LR‖² = tr(LᵀL · RRᵀ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .discover import CheckpointRef
from .errors import CheckpointMismatchError
from .io import Checkpoint, LowRank, Run
from .io.base import describe_keys

#: Share of exactly-zero update entries in a 16-bit tensor above which the update is called quantised.
BF16_ZERO_WARN = 0.25
#: Resident memory the open checkpoints may keep mapped, together, while streaming.
RESIDENT_BUDGET = 128 * 2**20


@dataclass
class TensorStats:
    update_norm: float
    param_norm: float
    update_cos: float
    zero_frac: float
    nonfinite: int
    dtype: str
    dot_prev: float = math.nan  # ⟨Δθ_{t−1}, Δθ_t⟩, summed over tensors for the whole-model cosine

    @property
    def rel_update(self) -> float:
        return self.update_norm / self.param_norm if self.param_norm > 0 else math.nan


@dataclass
class Interval:
    step_from: int
    step_to: int
    lr: float = math.nan
    lr_source: str = ""
    tensors: dict[str, TensorStats] = field(default_factory=dict)
    update_cos: float = math.nan  # whole-model cosine with the previous interval's update

    @property
    def update_norm(self) -> float:
        return math.sqrt(sum(s.update_norm**2 for s in self.tensors.values()))

    @property
    def param_norm(self) -> float:
        return math.sqrt(sum(s.param_norm**2 for s in self.tensors.values()))

    @property
    def rel_update(self) -> float:
        return self.update_norm / self.param_norm if self.param_norm > 0 else math.nan


@dataclass
class OptimizerSummary:
    step: int  # the checkpoint's step
    kind: str
    optimizer_step: float
    lr: list[float]
    mapping: str
    exp_avg_norm: float = math.nan  # ‖m‖ over all tensors (Adam), or ‖momentum‖
    exp_avg_sq_mean: float = math.nan  # mean of v over all entries (Adam)


@dataclass
class CheckpointFacts:
    """What one checkpoint holds, from its headers (no tensor data read)."""

    dtypes: list[str]
    size_bytes: int
    param_count: int
    tensor_count: int
    tied: dict[str, str]

    @classmethod
    def of(cls, c: Checkpoint) -> "CheckpointFacts":
        names = c.names()
        dtypes = sorted({str(c.info(n).dtype).removeprefix("torch.") for n in names})
        return cls(dtypes, c.size_bytes(), c.param_count(), len(names), dict(c.aliases))


@dataclass
class Anatomy:
    checkpoints: list[CheckpointRef]
    intervals: list[Interval]
    tensor_names: list[str]
    facts: list[CheckpointFacts] = field(default_factory=list)
    optimizers: list[OptimizerSummary] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def delta_stats(before: torch.Tensor, after: torch.Tensor, prev: torch.Tensor | None) -> tuple[TensorStats, torch.Tensor]:
    """Statistics of Δ = after − before for one tensor (float32), and Δ itself for the next interval."""
    dtype = str(after.dtype).removeprefix("torch.")
    a, b = before.float(), after.float()
    delta = b - a  # same shape as the tensor
    # A finite sum means no NaN/Inf (cheap); only otherwise count them exactly.
    nonfinite = 0 if bool(torch.isfinite(b.sum())) else b.numel() - int(torch.count_nonzero(torch.isfinite(b)))
    norm = float(torch.linalg.vector_norm(delta))
    dot = cos = math.nan
    if prev is not None:
        dot = float(torch.dot(prev.ravel(), delta.ravel()))
        denom = float(torch.linalg.vector_norm(prev)) * norm
        cos = dot / denom if denom > 0 else math.nan
    stats = TensorStats(
        update_norm=norm,
        param_norm=float(torch.linalg.vector_norm(a)),
        update_cos=cos,
        zero_frac=(delta.numel() - int(torch.count_nonzero(delta))) / max(delta.numel(), 1),
        nonfinite=nonfinite,
        dtype=dtype,
        dot_prev=dot,
    )
    return stats, delta


def lowrank_delta(before: LowRank, after: LowRank) -> LowRank:
    """scale₂·L₂R₂ − scale₁·L₁R₁ as one factored product [s₂L₂, −s₁L₁] @ [R₂; R₁]  (rank r₁ + r₂)."""
    left = torch.cat([after.scale * after.left.float(), -before.scale * before.left.float()], dim=1)
    right = torch.cat([after.right.float(), before.right.float()], dim=0)
    return LowRank(left, right)


def lowrank_inner(x: LowRank, y: LowRank) -> float:
    """⟨s_x L_x R_x, s_y L_y R_y⟩_F = s_x s_y tr((L_xᵀ L_y)(R_y R_xᵀ)), never forming the dense matrices."""
    return x.scale * y.scale * float(torch.trace((x.left.float().T @ y.left.float()) @ (y.right.float() @ x.right.float().T)))


def lowrank_stats(before: LowRank, after: LowRank, prev: LowRank | None) -> tuple[TensorStats, LowRank]:
    delta = lowrank_delta(before, after)
    norm = math.sqrt(max(lowrank_inner(delta, delta), 0.0))
    dot = cos = math.nan
    if prev is not None:
        dot = lowrank_inner(prev, delta)
        denom = math.sqrt(max(lowrank_inner(prev, prev), 0.0)) * norm
        cos = dot / denom if denom > 0 else math.nan
    nonfinite = int((~torch.isfinite(after.left)).sum() + (~torch.isfinite(after.right)).sum())
    dtype = "lora:" + str(after.left.dtype).removeprefix("torch.")
    param_norm = math.sqrt(max(lowrank_inner(before, before), 0.0))
    return TensorStats(norm, param_norm, cos, math.nan, nonfinite, dtype, dot), delta


def update_anatomy(
    run: Run,
    *,
    optimizer: bool = True,
    progress: Callable[[int, int, str], None] | None = None,
) -> Anatomy:
    """Update statistics for every interval of the run; see the module docstring for the quantities."""
    refs = run.checkpoints
    ckpts = [run.open(r) for r in refs]
    for c in ckpts:  # all are open at once: share one budget so memory does not grow with the run
        c.resident_budget = max(8 * 2**20, RESIDENT_BUDGET // len(ckpts))
    try:
        names = _common_names(ckpts)
        intervals = [Interval(a.step, b.step) for a, b in zip(refs, refs[1:])]
        for i, name in enumerate(names):
            if progress is not None:
                progress(i, len(names), name)
            _stream_tensor(name, ckpts, intervals)
        if progress is not None:
            progress(len(names), len(names), "")
        optimizers = [s for c in ckpts if (s := summarise_optimizer(c)) is not None] if optimizer else []
        _fill_lr(ckpts, intervals, optimizers)
        for earlier, iv in zip(intervals, intervals[1:]):
            denom = earlier.update_norm * iv.update_norm
            dot = sum(s.dot_prev for s in iv.tensors.values())
            iv.update_cos = dot / denom if denom > 0 else math.nan
        anatomy = Anatomy(refs, intervals, names, [CheckpointFacts.of(c) for c in ckpts])
        anatomy.warnings = _warnings(anatomy)
        anatomy.optimizers = optimizers
        for c in ckpts:
            anatomy.warnings.extend(c.warnings)
        return anatomy
    finally:
        for c in ckpts:
            c.close()


def _common_names(ckpts: list[Checkpoint]) -> list[str]:
    """The tensor names, checked to be the same set with the same shapes in every checkpoint."""
    first = ckpts[0]
    names = first.names()
    for other in ckpts[1:]:
        theirs = set(other.names())
        missing, extra = [n for n in names if n not in theirs], sorted(theirs - set(names))
        if missing or extra:
            what = f"{describe_keys(missing)} missing" if missing else f"{describe_keys(extra)} added"
            raise CheckpointMismatchError(
                f"{first.path} and {other.path} hold different tensors ({what}); "
                "the checkpoints are not of one model — move the odd one out of the run directory"
            )
        for n in names:
            if first.info(n).shape != other.info(n).shape:
                raise CheckpointMismatchError(
                    f"tensor {n!r} has shape {list(first.info(n).shape)} in {first.path} but "
                    f"{list(other.info(n).shape)} in {other.path}; the checkpoints are not of one model — move the "
                    "odd one out of the run directory"
                )
    return names


def _stream_tensor(name: str, ckpts: list[Checkpoint], intervals: list[Interval]) -> None:
    """Read ``name`` from each checkpoint in order and fill its statistics for every interval."""
    factored = all(c.factors(name) is not None for c in ckpts) if ckpts[0].factors(name) is not None else False
    read = (lambda c: c.factors(name)) if factored else (lambda c: c.tensor(name))
    before, prev = read(ckpts[0]), None
    for k, interval in enumerate(intervals):
        after = read(ckpts[k + 1])
        stats, delta = (lowrank_stats if factored else delta_stats)(before, after, prev)
        interval.tensors[name] = stats
        before, prev = after, delta


def _fill_lr(ckpts: list[Checkpoint], intervals: list[Interval], optimizers: list[OptimizerSummary]) -> None:
    """lr per interval: mean of the trainer's logged lr over (step_from, step_to]; else the lr the saved
    optimizer state at step_from holds for its next step (first param group)."""
    log: dict[int, float] = {}
    for c in ckpts:
        log.update(dict(c.lr_log()))
    saved = {o.step: o.lr[0] for o in optimizers if o.lr}
    for iv in intervals:
        logged = [lr for s, lr in log.items() if iv.step_from < s <= iv.step_to]
        if logged:
            iv.lr, iv.lr_source = sum(logged) / len(logged), "trainer log"
        elif iv.step_from in saved:
            iv.lr, iv.lr_source = saved[iv.step_from], f"optimizer state at step {iv.step_from}"


def summarise_optimizer(c: Checkpoint) -> OptimizerSummary | None:
    state = c.optimizer()
    if state is None:
        return None
    steps = [float(s["step"]) for s in state.per_param.values() if "step" in s]
    m_sq = v_sum = 0.0
    count = 0
    for s in state.per_param.values():
        m = s.get("exp_avg", s.get("momentum_buffer"))
        if isinstance(m, torch.Tensor):
            m_sq += float(m.float().pow(2).sum())
        v = s.get("exp_avg_sq")
        if isinstance(v, torch.Tensor):
            v_sum += float(v.float().sum())
            count += v.numel()
    return OptimizerSummary(
        step=c.ref.step,
        kind=state.kind,
        optimizer_step=max(steps) if steps else math.nan,
        lr=[float(g.get("lr", math.nan)) for g in state.groups],
        mapping=state.mapping,
        exp_avg_norm=math.sqrt(m_sq) if m_sq else math.nan,
        exp_avg_sq_mean=v_sum / count if count else math.nan,
    )


def _warnings(anatomy: Anatomy) -> list[str]:
    out: list[str] = []
    for iv in anatomy.intervals:
        low = [(n, s) for n, s in iv.tensors.items() if s.dtype in ("bfloat16", "float16")]
        if low:
            zero = sum(s.zero_frac for _, s in low) / len(low)
            if zero > BF16_ZERO_WARN:
                out.append(
                    f"step {iv.step_from}→{iv.step_to}: {zero:.0%} of update entries are exactly zero in "
                    f"{low[0][1].dtype} tensors — the update is quantised by the stored dtype and its norm is "
                    "inflated; use fp32 master weights if the run saved them"
                )
        bad = [(n, s.nonfinite) for n, s in iv.tensors.items() if s.nonfinite]
        if bad:
            out.append(
                f"step {iv.step_to}: NaN/Inf weights in {describe_keys([f'{n} ({k})' for n, k in bad])}; "
                "the run diverged at or before this checkpoint"
            )
    return out
