"""How many CPUs this process may really use, and a torch thread count that does not oversubscribe them.

``os.cpu_count()`` (and torch's default thread count) is the host's core count. In a container the process may
use fewer: its CPU affinity mask (``sched_getaffinity``, set by ``taskset``/cpusets) and its cgroup v2 CPU quota
(``cpu.max``: ``"<quota> <period>"`` in microseconds, or ``"max <period>"`` for no limit; Kubernetes writes it from
``resources.limits.cpu``). A conversion running more threads than that is throttled and gets slower, not faster.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: cgroup v2 files that may hold the process's quota: the cgroup namespace root (a container's own cgroup).
CPU_MAX_FILES = ("/sys/fs/cgroup/cpu.max",)


def usable_cpus(affinity: int, cpu_max: str | None) -> int:
    """CPUs usable by a process: its affinity count, lowered to the cgroup v2 quota rounded up.

    Args:
        affinity: number of CPUs in the affinity mask (``len(os.sched_getaffinity(0))``).
        cpu_max: contents of a cgroup v2 ``cpu.max`` file (``"150000 100000"`` = 1.5 CPUs -> 2; ``"max 100000"`` =
            no quota), or None when there is none. Unreadable contents count as no quota.

    Returns an int >= 1.
    """
    n = max(1, int(affinity))
    parts = (cpu_max or "").split()
    if len(parts) == 2 and parts[0] != "max":
        try:
            quota, period = int(parts[0]), int(parts[1])
        except ValueError:
            return n
        if quota > 0 and period > 0:
            n = min(n, max(1, math.ceil(quota / period)))
    return n


def _read_cpu_max() -> str | None:
    for name in CPU_MAX_FILES:
        try:
            return Path(name).read_text()
        except OSError:
            continue
    return None


def available_cpus() -> int:
    """:func:`usable_cpus` for this process (affinity mask and cgroup v2 ``cpu.max``)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    return usable_cpus(affinity, _read_cpu_max())


def limit_threads() -> int:
    """Lower torch's intra-op thread count to :func:`available_cpus` (never raise it); returns the count in use.

    A lower count set by the user (``OMP_NUM_THREADS``, ``torch.set_num_threads``) is kept.
    """
    import torch

    n = min(torch.get_num_threads(), available_cpus())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
