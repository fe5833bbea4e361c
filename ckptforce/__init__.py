"""ckptforce: a static auditor of saved training runs.

Point it at a checkpoint directory written by a real trainer; it reconstructs each update from consecutive
checkpoints and explains how probe likelihoods moved (force analysis, Δ log π ≈ −η·A·K·G).

Public surface (the rest is implementation):

    from ckptforce import open_run, update_anatomy
    run = open_run("out/")                 # checkpoints in step order, lazily readable
    anatomy = update_anatomy(run)          # ‖Δθ‖, relative update, cosine, zero fraction per tensor
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from .errors import CkptforceError

try:
    __version__ = version("ckptforce")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["CkptforceError", "__version__", "open_run", "update_anatomy"]


def __getattr__(name: str):
    # Lazy, so that importing the torch-free stages (cube, report) never imports torch.
    if name == "open_run":
        from .io import open_run

        return open_run
    if name == "update_anatomy":
        from .updates import update_anatomy

        return update_anatomy
    raise AttributeError(f"module 'ckptforce' has no attribute {name!r}")
