"""Forces on probes as pure functions: (model function, params, batch, direction) in, tensors out.

No file I/O and no module state here: the model function comes from ``ckptforce.model`` (``BoundModel.logits``),
batches from ``ckptforce.probes``, parameters and directions from the checkpoints.

    observe(fn, θ, batch)                      log π per token and summed, y*, entropy, top-1, ‖A‖_F²
    delta_lin(fn, θ, batch, Δθ)                A·J·Δθ by one batched JVP (or double VJP)
    contributions_by_tensor(fn, θ, batch, Δθ)  the same split by parameter tensor (per-row gradients)
    delta_path(fn, θ, batch, Δθ, nodes=n)      ∫₀¹ A J(θ + sΔθ) Δθ ds by Gauss–Legendre quadrature
    interval_forces(fn, θ_t, θ_t+1, batch)     all of it for one checkpoint interval
    gradient_kernel(fn, θ, probes, train)      K[o,u] = ⟨∇θ log π(y_o|x_o), ∇θ L_u⟩, norms, cosine (ghost + per-row)
    tracin_kernel(fn, [(θ_t, η_t)], …)         Σ_t η_t K_t over checkpoints
    class_forces / sgd_prediction              full V×V A, K, G of a classifier and −η·A·K·G

A ``SplitLM(logits, hidden, W, b)`` is taken wherever a model function is: observe, delta_lin and the factored
split then apply the head z = h Wᵀ + b themselves at the response positions only, in chunks of positions ×
vocabulary (``head.head_stats``), so no (B, T, V) tensor is formed.
"""

from .linear import (
    LinearChange,
    PathChange,
    contributions_by_tensor,
    delta_lin,
    delta_path,
    dlogp_from_dlogits,
    gauss_legendre,
    jvp_logits,
    remainder_ratio,
)
from .head import HeadStats, SplitLM, head_stats
from .interval import DEFAULT_NODES, IntervalForces, interval_forces
from .kernels import (
    ClassForces,
    Kernel,
    Projection,
    TracIn,
    class_forces,
    gradient_kernel,
    logp_rows,
    nll_rows,
    sgd_prediction,
    tracin_kernel,
)
from .observe import Observed, observe, observe_logits

__all__ = [
    "DEFAULT_NODES", "IntervalForces", "interval_forces", "LinearChange", "Observed", "PathChange", "contributions_by_tensor", "delta_lin", "delta_path",
    "dlogp_from_dlogits", "gauss_legendre", "jvp_logits", "observe", "observe_logits", "remainder_ratio",
    "ClassForces", "Kernel", "Projection", "TracIn", "class_forces", "gradient_kernel", "logp_rows", "nll_rows",
    "sgd_prediction", "tracin_kernel", "HeadStats", "SplitLM", "head_stats",
]  # fmt: skip
