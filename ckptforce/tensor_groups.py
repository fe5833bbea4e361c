"""Groups of parameter tensors for the split of Δ_lin / Δ_path (``analyze --split-by``): names in, group labels out.

    tensor   every parameter tensor on its own (the default; the cube's ``dlogp_lin_tensor``)
    layer    a module's tensors together: its weight and bias (``transformer.h.0.attn.c_attn``; ``lm_head``)
    block    a transformer block's tensors together: every name up to its first numeric part (``transformer.h.0``,
             ``model.layers.11``); tensors outside the blocks (embeddings, final norm, head) by module, as for layer

Grouped splits go to ``dlogp_lin_part`` / ``dlogp_path_part`` on the ``part`` dimension (the anatomy keeps
``tensor``); each is the sum of its tensors' contributions, so the parts still add up to Δ_lin.
"""

from __future__ import annotations

SPLITS = ("tensor", "layer", "block")


def group_of(name: str, by: str) -> str:
    """The group of tensor ``name`` under ``by`` (module docstring)."""
    if by not in SPLITS:
        raise ValueError(f"split {by!r}: use one of {', '.join(SPLITS)}")
    if by == "tensor":
        return name
    parts = name.split(".")
    module = ".".join(parts[:-1]) or name
    if by == "layer":
        return module
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return module


def groups(names: list[str], by: str) -> tuple[list[str], list[int]]:
    """(the group labels in order of first appearance, each name's index into them)."""
    labels: dict[str, int] = {}
    index = [labels.setdefault(group_of(n, by), len(labels)) for n in names]
    return list(labels), index
