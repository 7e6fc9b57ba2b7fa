"""How many CPUs this process may really use, and a torch thread count that does not oversubscribe them.

``os.cpu_count()`` (and torch's default thread count) is the host's core count. In a container the process may
use fewer: its CPU affinity mask (``sched_getaffinity``, set by ``taskset``/cpusets) and its cgroup CPU quota, which
Kubernetes writes from ``resources.limits.cpu``: cgroup v2 ``cpu.max`` (``"<quota> <period>"`` in microseconds, or
``"max <period>"`` for no limit), or on nodes still on cgroup v1 the pair ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``
(quota ``-1``: no limit; Linux ``Documentation/scheduler/sched-bwc.rst``). A conversion running more threads than
that is throttled and gets slower, not faster.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

#: cgroup v2 files that may hold the process's quota: the cgroup namespace root (a container's own cgroup).
CPU_MAX_FILES = ("/sys/fs/cgroup/cpu.max",)
#: cgroup v1 CPU controller folders (a container's own cgroup is mounted at the root) holding ``cpu.cfs_quota_us``
#: and ``cpu.cfs_period_us``; read when no v2 ``cpu.max`` exists.
CFS_DIRS = ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct")


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
    """The quota as cgroup v2 ``cpu.max`` text: that file, else the v1 quota and period in the same form (a v1
    quota of ``-1`` becomes ``"max"``), else None."""
    for name in CPU_MAX_FILES:
        try:
            return Path(name).read_text()
        except OSError:
            continue
    for folder in CFS_DIRS:
        try:
            quota = Path(folder, "cpu.cfs_quota_us").read_text().strip()
            period = Path(folder, "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        return f"{'max' if quota.startswith('-') else quota} {period}"
    return None


def available_cpus() -> int:
    """:func:`usable_cpus` for this process (affinity mask and the cgroup v2 or v1 CPU quota)."""
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
