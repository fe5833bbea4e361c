"""PyTorch Lightning ``.ckpt`` files: ``state_dict``, ``global_step``, ``optimizer_states``.

A ``.ckpt`` is a ``torch.save`` dict, read like the plain files (``weights_only=True``, memory-mapped). The
step is Lightning's own ``global_step``; the optimizer state is the first of ``optimizer_states`` (its
positions follow ``self.parameters()``, the state-dict order). When every tensor name starts with ``model.``
(a LightningModule wrapping ``self.model``) that prefix is dropped. ``last.ckpt`` repeats the newest
checkpoint and is skipped when numbered checkpoints exist beside it.
"""

from __future__ import annotations

from pathlib import Path

from ..discover import Candidate
from .torch_ import TorchCheckpoint, TorchFileLayout


class LightningCheckpoint(TorchCheckpoint):
    layout = "lightning"
    strip_common = ("model.",)


class LightningLayout(TorchFileLayout):
    name = "lightning"
    summary = "PyTorch Lightning .ckpt files (epoch=0-step=100.ckpt) with state_dict and global_step"
    suffixes = (".ckpt",)
    checkpoint_class = LightningCheckpoint

    def find(self, root: Path) -> list[Candidate]:
        found = super().find(root)
        numbered = [c for c in found if not c.path.name.startswith("last")]
        return numbered or found
