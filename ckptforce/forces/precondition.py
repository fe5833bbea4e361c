"""The optimizer's view of one interval, read from the optimizer states saved at its two checkpoints
(attribution.py's module docstring has the maths): the elementwise preconditioner P_t, the momentum carry-over
and the weight-decay directions, and for an adapter run the factors' P mapped to the merged weight W."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Preconditioner:
    """The optimizer's view of one interval: P (per tensor, elementwise; None = identity) and extra directions."""

    kind: str  # sgd | sgd-momentum | adam | rmsprop
    scale: dict[str, torch.Tensor] | None  # P_t per tensor (elementwise), or None for the identity
    momentum: dict[str, torch.Tensor] | None  # the carry-over direction (already × −η …), or None
    decay: dict[str, torch.Tensor] | None  # the weight-decay direction, or None
    note: str = ""
    lora: dict[str, "LoraFactor"] | None = None  # adapted weights, stepped through their factors

    @property
    def frozen(self) -> set[str]:
        """Tensors P leaves where they are (all-zero scale, not stepped through LoRA factors): no step, no force."""
        return {n for n, t in (self.scale or {}).items() if n not in (self.lora or {}) and not bool(t.any())}

    def apply(self, grad: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = grad if self.scale is None else {n: g * self.scale[n] if n in self.scale else g for n, g in grad.items()}
        if self.lora:
            out = {n: self.lora[n].precondition(g) if n in self.lora else g for n, g in out.items()}
        return out


@dataclass
class LoraFactor:
    """An adapted weight W = W_base + s · left @ right at θ_t (left (m, r), right (r, n), in W's orientation),
    with the optimizer's names of its factors (stored transposed when ``transposed``: PEFT's fan_in_fan_out)
    and, once the optimizer state is read, their elementwise preconditioners P_left, P_right (W's orientation)."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float
    left_name: str
    right_name: str
    transposed: bool = False
    p_left: torch.Tensor | None = None
    p_right: torch.Tensor | None = None

    def stored(self, t: torch.Tensor) -> torch.Tensor:
        """A factor-shaped tensor between W's orientation and the optimizer's (a transpose, or nothing)."""
        return t.T if self.transposed else t

    def to_weight(self, d_left: torch.Tensor, d_right: torch.Tensor) -> torch.Tensor:
        """δW = s (δL R + L δR) (m, n): a step of the factors, to first order, as a step of W."""
        return self.scale * (d_left @ self.right + self.left @ d_right)

    def precondition(self, grad_w: torch.Tensor) -> torch.Tensor:
        """P_W ∇_W = s (P_L ⊙ s ∇_W Rᵀ) R + s L (P_R ⊙ s Lᵀ ∇_W): the factors' P seen from W (m, n)."""
        g_left, g_right = self.scale * grad_w @ self.right.T, self.scale * self.left.T @ grad_w
        return self.to_weight(g_left * self.p_left, g_right * self.p_right)


def _state_tensor(state: dict, key: str, like: torch.Tensor) -> torch.Tensor | None:
    """The saved state tensor shaped as ``like``, in float32 at least (Adam's v ≈ 1e-9 underflows float16)."""
    t = state.get(key)
    dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
    return None if t is None else torch.as_tensor(t).to(device=like.device, dtype=dtype).reshape(like.shape)


def preconditioner(params: dict, *, start=None, end=None, lr: float, n_steps: int = 1) -> Preconditioner:
    """The preconditioner and carry-over directions of an interval from the optimizer states saved at its
    start and end checkpoints (``OptimizerState`` or None). ``lr`` is the mean learning rate over the
    interval's ``n_steps`` optimizer steps. Without a saved end state: plain SGD (P = I), and a note.

    P and v̂ come from the END state (what the last step used: exact for a one-step interval); momentum needs
    the START state's first moment (m = 0 at step 0).
    """
    if end is None or end.kind in ("stateless", "unknown"):
        note = "no optimizer state at the end of the interval: plain SGD assumed (P = I)" if end is None else f"optimizer state of kind {end.kind}: plain SGD assumed"
        return Preconditioner("sgd", None, None, None, note)
    group_of = {n: g for g in end.groups for n in g.get("names", [])}
    scale, momentum, decay = {}, {}, {}
    notes, frozen = [], []
    key = {"adam": "exp_avg_sq", "rmsprop": "square_avg"}.get(end.kind)
    for name, p in params.items():
        state, group = end.per_param.get(name), group_of.get(name, {})
        if not state or (key and state.get(key) is None):
            # not in the optimizer (frozen, a buffer) or never given a gradient: the optimizer did not move it
            frozen.append(name)
            scale[name] = torch.zeros_like(p)
            continue
        prior = start.per_param.get(name) if start is not None else None
        wd = float(group.get("weight_decay", 0.0) or 0.0)
        if end.kind == "adam":
            b1, b2 = (float(b) for b in group.get("betas", (0.9, 0.999)))
            eps, t = float(group.get("eps", 1e-8)), float(torch.as_tensor(state.get("step", 1)))
            v_hat = _state_tensor(state, "exp_avg_sq", p) / (1 - b2**t)
            denom = v_hat.sqrt() + eps
            scale[name] = (1 - b1) / (1 - b1**t) / denom
            m0 = _state_tensor(prior, "exp_avg", p) if prior is not None else None
            if m0 is not None:
                geometric = sum(b1**j for j in range(1, n_steps + 1))
                momentum[name] = -lr * geometric * m0 / (1 - b1**t) / denom
            if wd:
                decay[name] = -lr * n_steps * wd * p
        elif end.kind == "rmsprop":
            eps = float(group.get("eps", 1e-8))
            scale[name] = 1 / (_state_tensor(state, "square_avg", p).sqrt() + eps)
            if wd:
                decay[name] = -lr * n_steps * wd * p * scale[name]
        elif end.kind == "sgd-momentum":
            mu = float(group.get("momentum", 0.0) or 0.0)
            b0 = _state_tensor(prior, "momentum_buffer", p) if prior is not None else None
            if b0 is not None and mu:
                momentum[name] = -lr * sum(mu**j for j in range(1, n_steps + 1)) * b0
            if wd:
                decay[name] = -lr * n_steps * wd * p
    if len(frozen) == len(params):
        return Preconditioner("sgd", None, None, None, "the optimizer state names none of the model's tensors: plain SGD assumed (P = I)")
    if frozen:
        notes.append(f"{len(frozen)} tensors have no optimizer state (e.g. {frozen[0]}): taken as not moved by the optimizer")
    if start is None and end.kind in ("adam", "sgd-momentum") and not _first_step(end):
        notes.append("no optimizer state at the start of the interval: the momentum carry-over is left in 'unexplained'")
    if end.kind == "adam" and any(float(g.get("weight_decay", 0) or 0) for g in end.groups):
        notes.append("weight decay taken as decoupled (AdamW); torch.optim.Adam's coupled L2 would land in 'unexplained'")
    return Preconditioner(end.kind, scale or None, momentum or None, decay or None, "; ".join(notes))


def lora_preconditioner(params: dict, trained: dict[str, LoraFactor | None], *, start=None, end=None, lr: float, n_steps: int = 1) -> Preconditioner:
    """``preconditioner`` for an adapter run: the optimizer state (over the factors' names) read for the factors
    of each adapted weight in ``trained`` and mapped to W (module docstring); tensors trained whole (``None``
    in ``trained``: modules_to_save) as usual; every other tensor of ``params`` (the base) frozen. Without a
    saved state, SGD on the factors (P_L = P_R = 1)."""
    stored: dict[str, torch.Tensor] = {}
    for name, f in trained.items():
        if f is None:
            stored[name] = params[name]
        else:
            stored[f.left_name], stored[f.right_name] = f.stored(f.left), f.stored(f.right)
    inner = preconditioner(stored, start=start, end=end, lr=lr, n_steps=n_steps)
    scale = {n: torch.zeros_like(p) for n, p in params.items() if n not in trained}
    lora, momentum, decay = {}, {}, {}
    for name, f in trained.items():
        if f is None:
            scale[name] = inner.scale[name] if inner.scale else torch.ones_like(params[name])
            for src, dst in ((inner.momentum, momentum), (inner.decay, decay)):
                if src and name in src:
                    dst[name] = src[name]
            continue
        p_left, p_right = (f.stored(inner.scale[k]) if inner.scale else torch.ones_like(t) for k, t in ((f.left_name, f.left), (f.right_name, f.right)))
        lora[name] = f = LoraFactor(f.left, f.right, f.scale, f.left_name, f.right_name, f.transposed, p_left, p_right)
        for src, dst in ((inner.momentum, momentum), (inner.decay, decay)):
            if src and (f.left_name in src or f.right_name in src):
                d_left, d_right = (f.stored(src[k]) if k in src else torch.zeros_like(t) for k, t in ((f.left_name, f.left), (f.right_name, f.right)))
                dst[name] = f.to_weight(d_left, d_right)
    note = "; ".join(x for x in [inner.note, "LoRA: the optimizer's steps on the factors A, B mapped to W = W_base + s·BA to first order "
                                 "(δW = s(δB·A + B·δA); the second-order s·δB·δA is in 'unexplained')"] if x)  # fmt: skip
    return Preconditioner(f"{inner.kind} on LoRA factors", scale, momentum or None, decay or None, note, lora)


def _first_step(state) -> bool:
    """True when the end state is after the optimizer's first step (so the start's moments were zero)."""
    steps = [float(torch.as_tensor(s.get("step", 0))) for s in state.per_param.values() if s and "step" in s]
    return bool(steps) and max(steps) <= 1
