"""Atomic writes: a temporary file beside the target, then ``os.replace`` — never half a file under the final name.

Used for every output ckptforce writes (cube parts, the cube, the reports). A failed write removes its
temporary file and raises one line that says what to do (a full disk keeps what was already written).
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Callable

from .errors import CkptforceError


def write_fix(e: OSError) -> str:
    """What to do about a failed write."""
    if e.errno == errno.ENOSPC:
        return "the disk is full: free some space and rerun the same command (parts already written are kept)"
    return "check the disk and the directory's permissions, or choose another -o"


def write_atomic(path: str | Path, write: Callable[[str], None], *, error: type[CkptforceError] = CkptforceError) -> Path:
    """Call ``write(tmp)`` on a temporary path beside ``path``, then move it into place; ``error`` on OSError."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    except OSError as e:
        raise error(f"{path}: cannot write ({e.strerror or e}); {write_fix(e)}") from e
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise error(f"{path}: cannot write ({e.strerror or e}); {write_fix(e)}") from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
