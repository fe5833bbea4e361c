"""Hidden features of a named layer at a checkpoint (DESIGN §4 item 9, feature adaptation).

In: the bound model, θ, a batch, the dotted name of a submodule. Out: z (B, D) per row — the layer's output
for a classifier row, or its mean over the response positions of a sequence row (the positions whose next
token is scored). The drift statistics against the features z_0 at the first checkpoint:

    ‖z_t − z_0‖,   1 − cos(z_t, z_0),   z_t·z_0,   ‖z_t‖            (per row)
"""

from __future__ import annotations

import difflib

import torch
from torch import nn

from ..errors import CkptforceError


def find_layer(module: nn.Module, name: str) -> nn.Module:
    """The submodule ``name``; a one-line error lists the closest names when there is none."""
    names = dict(module.named_modules())
    if name not in names:
        close = difflib.get_close_matches(name, [n for n in names if n], n=3, cutoff=0.3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; the model has e.g. {', '.join(list(names)[1:6])}"
        raise CkptforceError(f"--feature-layer {name!r}: the model has no such submodule{hint}")
    return names[name]


def features(model, params: dict, batch, layer: str) -> torch.Tensor:
    """z (B, D): the output of ``layer`` for each row (a sequence row: mean over its response positions)."""
    target = find_layer(model.module, layer)
    seen: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model.logits(params, batch)
    finally:
        handle.remove()
    if not seen:
        raise CkptforceError(f"--feature-layer {layer!r}: the layer is never called in the model's forward; name another")
    z = seen[-1].detach()
    if z.dim() == 2:
        return z.double()  # (B, D)
    if z.dim() == 3:  # (B, T, D): mean over the positions that predict response tokens
        m = batch.target_mask.to(z.dtype).unsqueeze(-1)  # (B, T, 1)
        return ((z * m).sum(1) / m.sum(1).clamp_min(1)).double()
    return z.flatten(1).double()


def drift(z: torch.Tensor, z0: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per row (B,): ``norm`` ‖z‖, ``drift`` ‖z − z0‖, ``one_minus_cos`` 1 − cos(z, z0), ``dot`` z·z0."""
    dot = (z * z0).sum(-1)
    norm, norm0 = z.norm(dim=-1), z0.norm(dim=-1)
    cos = torch.where(norm * norm0 > 0, dot / (norm * norm0).clamp_min(1e-300), torch.ones_like(dot))
    return {"norm": norm, "drift": (z - z0).norm(dim=-1), "one_minus_cos": 1 - cos, "dot": dot}


__all__ = ["drift", "features", "find_layer"]
