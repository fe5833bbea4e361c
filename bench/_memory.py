"""Peak-memory and CPU readings shared by the benchmarks (each measurement runs in a fresh subprocess)."""

from __future__ import annotations

import os
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


def cpu_busy_s() -> float:
    """CPU seconds the whole machine has spent busy (all processes, plus steal), from /proc/stat; −1 if unknown."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return -1.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds used by this process's finished children."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime
