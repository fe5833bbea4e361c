"""Peak-memory readings shared by the benchmarks (each measurement runs in a fresh subprocess)."""

from __future__ import annotations

import resource
from pathlib import Path


def maxrss_kib() -> int:
    """Peak resident set size of this process (KiB on Linux; a child starts from its parent's peak)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def vmhwm_kib() -> int:
    """Peak RSS of this process's own address space (/proc VmHWM, KiB): a cross-check of ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return -1
