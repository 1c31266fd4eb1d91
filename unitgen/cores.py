"""How many CPUs this process may really use: affinity, then the cgroup's cpu.max."""

from __future__ import annotations

import math
import os
from pathlib import Path


def quota_cpus(cpu_max: str) -> int | None:
    """CPUs granted by a cgroup v2 cpu.max line ("max 100000" or "150000 100000")."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    quota, period = int(fields[0]), int(fields[1])
    return max(1, math.ceil(quota / period))


def cgroup_path(proc_cgroup: str) -> str | None:
    """The cgroup v2 path of this process from /proc/self/cgroup ("0::/path")."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def cgroup_cpus(root: Path = Path("/sys/fs/cgroup"), proc: Path = Path("/proc/self/cgroup")) -> int | None:
    """The tightest cpu.max quota on the way from this process's cgroup up to the root."""
    try:
        path = cgroup_path(proc.read_text())
    except OSError:
        return None
    if path is None:
        return None
    limits = []
    current = Path(path)
    while True:
        try:
            limit = quota_cpus((root / current.relative_to("/") / "cpu.max").read_text())
        except (OSError, ValueError):
            limit = None
        if limit is not None:
            limits.append(limit)
        if current == current.parent:
            break
        current = current.parent
    return min(limits) if limits else None


def usable_cpus() -> int:
    count = len(os.sched_getaffinity(0))
    quota = cgroup_cpus()
    return max(1, min(count, quota) if quota else count)
