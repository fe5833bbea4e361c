"""Checkpoint readers: one module per layout, registered here, and the detection that picks one.

``open_run(run_dir)`` asks each layout, strongest signal first, for the checkpoints it recognises in the
directory; the first layout that finds any wins. When none does, the folders a few levels below are searched
(``search.py``): one run there is used, with a note saying where it was found; several are an error that lists
them; none is an error that lists what the directory holds and the layouts that are known. The ordered result is a ``Run``; ``run.open(ref)`` gives a lazy
``Checkpoint`` (see ``base.py`` for the contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..discover import Candidate, CheckpointRef, Listing, order_candidates
from ..errors import RunNotFoundError, UnknownLayoutError
from .base import Checkpoint, Layout, LowRank, OptimizerState, TensorInfo
from .dcp import DcpLayout
from .deepspeed import DeepSpeedLayout
from .fsdp import FsdpLayout
from .hf import HfLayout
from .lightning import LightningLayout
from .peft import PeftLayout, adapter_start
from .safetensors_ import SafetensorsDirLayout
from .search import detect, find_below, found_note, several_message
from .torch_ import TorchFileLayout

#: Known layouts, strongest signal first (a DCP ``.metadata`` or an ``adapter_config.json`` is unambiguous;
#: a bare ``.pt`` file could be anything). The Trainer's FSDP and DeepSpeed folders come first: they hold a
#: DCP folder (FSDP) or a ``model.safetensors`` beside the ZeRO states (DeepSpeed) that others would claim.
LAYOUTS: dict[str, Layout] = {
    "fsdp": FsdpLayout(),
    "deepspeed": DeepSpeedLayout(),
    "dcp": DcpLayout(),
    "peft": PeftLayout(),
    "hf": HfLayout(),
    "lightning": LightningLayout(),
    "safetensors": SafetensorsDirLayout(),
    "torch": TorchFileLayout(),
}

__all__ = ["LAYOUTS", "Checkpoint", "CheckpointRef", "Layout", "LowRank", "OptimizerState", "Run", "TensorInfo", "open_run"]


@dataclass
class Run:
    """A run directory's checkpoints in step order, and how to open each."""

    listing: Listing
    trust_pickles: bool = False

    @property
    def root(self) -> Path:
        return self.listing.root

    @property
    def layout(self) -> str:
        return self.listing.layout

    @property
    def checkpoints(self) -> list[CheckpointRef]:
        return self.listing.checkpoints

    @property
    def notes(self) -> list[str]:
        return self.listing.notes

    def open(self, ref: CheckpointRef) -> Checkpoint:
        return LAYOUTS[ref.layout].open(ref, trust_pickles=self.trust_pickles)


def open_run(
    run_dir: str | Path,
    *,
    init: str | Path | None = None,
    layout: str | None = None,
    trust_pickles: bool = False,
    base_model: str | Path | None = None,
) -> Run:
    """Find the checkpoints of a run directory and settle their steps and order.

    ``init`` adds the model the run started from (a file or folder of any known layout, often outside the
    run directory) as the first checkpoint. ``layout`` forces one layout instead of detecting it. An adapter
    run starts at its base model (``base_model``, or the local folder its adapter_config.json names) with
    LoRA's B = 0, unless ``init`` names another start (``peft.adapter_start``).
    """
    root = Path(run_dir).expanduser()
    if not root.exists():
        raise RunNotFoundError(f"{root}: no such directory; give the folder your trainer saved its checkpoints into")
    if not root.is_dir():
        raise RunNotFoundError(f"{root}: is a file, not a run directory; give the folder that holds the checkpoints")
    entries = sorted(p.name for p in root.iterdir())
    if not entries:
        raise RunNotFoundError(f"{root}: the directory is empty; point at the folder your trainer saved checkpoints into")
    if layout is not None and layout not in LAYOUTS:
        raise UnknownLayoutError(f"unknown layout {layout!r}; known layouts: {', '.join(LAYOUTS)}")

    given, hit, notes = root, detect(root, LAYOUTS, layout), []
    if hit is None:
        below = find_below(root, LAYOUTS, layout)
        if len(below) > 1:
            raise UnknownLayoutError(several_message(root, below))
        if not below:
            raise UnknownLayoutError(_unknown_layout_message(root, entries, layout))
        if below[0].error is not None:
            raise below[0].error
        notes.append(found_note(root, below[0]))
        root, hit = below[0].folder, (below[0].layout, below[0].candidates)
    chosen, candidates = hit
    if init is not None:
        candidates = [_init_candidate(Path(init).expanduser()), *candidates]
    refs, order_notes = order_candidates(candidates)
    if chosen == "peft":
        refs, start_notes = adapter_start(refs, base_model=Path(base_model).expanduser() if base_model else None)
        order_notes += start_notes
    return Run(Listing(root, chosen, refs, notes + order_notes, given if given != root else None), trust_pickles=trust_pickles)


def _init_candidate(path: Path) -> Candidate:
    if not path.exists():
        raise RunNotFoundError(f"{path}: the --init model does not exist; give the file or folder of the model the run "
                               "started from")  # fmt: skip
    for layout in LAYOUTS.values():
        found = layout.probe(path)
        if found is not None:
            return Candidate(found.path, found.layout, found.record_step, found.record_name, is_init=True)
    raise UnknownLayoutError(f"{path}: the --init model is in no known layout; known layouts: {', '.join(LAYOUTS)}")


def _unknown_layout_message(root: Path, entries: list[str], forced: str | None = None) -> str:
    shown = ", ".join(entries[:8]) + (f", … ({len(entries)} entries)" if len(entries) > 8 else "")
    known = "; ".join(f"{name}: {layout.summary}" for name, layout in LAYOUTS.items())
    what = f"no checkpoints of layout {forced!r}" if forced else "no checkpoints of a known layout"
    fix = "drop --layout to detect the layout, or point at the folder that holds the checkpoints" if forced else (
        "point at the folder that holds the checkpoints, or save them as one of these layouts")  # fmt: skip
    return f"{root}: {what} (found: {shown}); {fix}. Known layouts — {known}"
