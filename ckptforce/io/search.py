"""A run directory with no checkpoints of its own: the one run a few levels below it, or the list to pick from.

A Lightning training folder keeps its checkpoints in ``checkpoints/`` (beside ``lightning_logs/``) or, by
Lightning's default, in ``lightning_logs/version_N/checkpoints/``; a project folder holds a trainer's
``output_dir``. ``find_below(root, layouts)`` walks breadth-first at most ``MAX_DEPTH`` levels down (and
``MAX_FOLDERS`` folders), skipping hidden folders and symbolic links, and stops descending at a folder where a
layout finds checkpoints: that folder is one run. The caller uses a run only when it is the only one; several
are listed, never chosen between. A folder whose files cannot be read counts as a run too (it may be the one
meant), so a damaged checkpoint is reported rather than passed over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..discover import Candidate
from ..errors import CkptforceError

#: How many folder levels below the given directory are searched.
MAX_DEPTH = 3
#: At most this many folders are looked into (a data or cache folder can hold thousands).
MAX_FOLDERS = 400


@dataclass
class Found:
    """A folder below the given directory where one layout found checkpoints (or could not read them)."""

    folder: Path
    layout: str = ""
    candidates: list[Candidate] = field(default_factory=list)
    error: CkptforceError | None = None

    def describe(self, root: Path) -> str:
        where = self.folder.relative_to(root)
        if self.error is not None:
            return f"{where} (unreadable: {str(self.error)[:80]})"
        n = len(self.candidates)
        return f"{where} ({self.layout}, {n} checkpoint{'s' if n != 1 else ''})"


def detect(folder: Path, layouts: dict, forced: str | None = None) -> tuple[str, list[Candidate]] | None:
    """The first layout (strongest signal first) that finds checkpoints directly in ``folder``, or None."""
    for name in [forced] if forced else layouts:
        candidates = layouts[name].find(folder)
        if candidates:
            return name, candidates
    return None


def find_below(root: Path, layouts: dict, forced: str | None = None) -> list[Found]:
    """Runs in the folders below ``root`` (not ``root`` itself), shallowest first."""
    found: list[Found] = []
    level, looked = [root], 0
    for _ in range(MAX_DEPTH):
        deeper = []
        for folder in level:
            for child in _subfolders(folder):
                looked += 1
                if looked > MAX_FOLDERS:
                    return found
                try:
                    hit = detect(child, layouts, forced)
                except CkptforceError as e:
                    found.append(Found(child, error=e))
                    continue
                if hit is not None:
                    found.append(Found(child, *hit))
                else:
                    deeper.append(child)
        level = deeper
    return found


def _subfolders(folder: Path) -> list[Path]:
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return []
    return [c for c in children if c.is_dir() and not c.is_symlink() and not c.name.startswith((".", "__"))]


def found_note(root: Path, run: Found) -> str:
    """The note that says where the run was found."""
    return (f"{root} holds no checkpoints of its own; using the {run.layout} run found in "
            f"{run.folder.relative_to(root)} ({len(run.candidates)} checkpoints)")  # fmt: skip


def several_message(root: Path, runs: list[Found]) -> str:
    """The error for several runs below ``root``: each listed, and how to pick one."""
    shown = "; ".join(r.describe(root) for r in runs[:6]) + (f"; … ({len(runs)} in all)" if len(runs) > 6 else "")
    return (f"{root}: no checkpoints of its own, and {len(runs)} runs below it: {shown}; give the one to audit as "
            f"RUN_DIR, e.g. {runs[0].folder}")  # fmt: skip
