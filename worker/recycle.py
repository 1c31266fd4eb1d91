"""Graceful recycling: an instance swaps itself for a fresh process, as `systemctl reload`
does (handover.py), after its request limit or when its memory passes the soft limit.

gunicorn and uvicorn restart a worker after --max-requests (plus a random jitter, so that
workers started together do not all recycle together); PM2's max_memory_restart kills
the process abruptly, mid-request. Here the old process hands its instance to a new one
and then drains, so no request fails and capacity never drops; the handover lock makes
the instances of one app recycle one at a time.

The kernel's MemoryMax= holds the instance's cgroup: during a swap, the old process and
the new one. So a process recycles once its resident memory plus a fresh process's
(this one's own at READY) passes RECYCLE_MEMORY_AT of MemoryMax=; the rest is room for
what the old one grows while the new one starts and the old one drains. Only a process
that grows faster than a swap takes reaches the hard limit.
"""

from __future__ import annotations

import logging
import os
import random

from unitgen_worker.contract import RECYCLE_MEMORY_AT, RECYCLE_RETRY

log = logging.getLogger("unitgen.worker")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_bytes() -> int:
    """This process's resident memory (what leaks show in, and what PM2 compares)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


class Recycle:
    """When this process is due to hand its instance to a fresh one, and why."""

    def __init__(self, max_requests: int = 0, jitter: int = 0, memory_max: int = 0,
                 rng: random.Random | None = None) -> None:
        self.max_requests = max_requests
        # Drawn once per process, as gunicorn does: randint(0, jitter) more requests.
        self.request_limit = max_requests + (rng or random).randint(0, jitter) if max_requests else 0
        self.memory_max = memory_max
        self.fresh = 0  # resident bytes of a fresh process: this one's at READY (ready())
        self.not_before = 0.0  # CLOCK_MONOTONIC: no memory recycle before (a swap failed)

    @property
    def wanted(self) -> bool:
        return bool(self.request_limit or self.memory_max)

    def ready(self, resident: int | None = None) -> None:
        """Notes what a fresh process takes: the new one will take about as much. Where
        two fresh processes do not fit in the share of MemoryMax=, a recycle could never
        help (each new process would recycle at once): memory recycling is off."""
        self.fresh = resident_bytes() if resident is None else resident
        if self.memory_max and 2 * self.fresh >= self.memory_max * RECYCLE_MEMORY_AT:
            log.warning("--memory-max %dM is too small to recycle this app (%d MiB at READY, two must fit in "
                        "%.0f%% of it): not recycling for memory", self.memory_max >> 20, self.fresh >> 20,
                        RECYCLE_MEMORY_AT * 100)
            self.memory_max = 0

    def due(self, served: int, now: float, resident: int | None = None) -> str | None:
        """Why this process should recycle now, or None."""
        if self.request_limit and served >= self.request_limit:
            return f"served {served} requests (limit {self.request_limit})"
        if self.memory_max and now >= self.not_before:
            resident = resident_bytes() if resident is None else resident
            if resident + self.fresh > self.memory_max * RECYCLE_MEMORY_AT:
                return (f"resident memory {resident >> 20} MiB, and {self.fresh >> 20} MiB for a new process, "
                        f"over {RECYCLE_MEMORY_AT:.0%} of MemoryMax={self.memory_max >> 20}M")
        return None

    def failed(self, served: int, now: float) -> None:
        """The swap failed (the old process serves on): try again later, not at once."""
        if self.request_limit:
            self.request_limit = served + max(self.max_requests, 1)
        self.not_before = now + RECYCLE_RETRY
