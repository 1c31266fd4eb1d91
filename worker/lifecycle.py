"""What an instance counts and tells systemd from READY=1 until it exits.

RunState holds the counters, the requests among them read from uvicorn's own (no
middleware on the way of each request: bench/overhead.md); TakeRoom tells the balancer
of an instance with a capacity as each request starts and ends; MeasureRequests times
them with --metrics. ping() sends WATCHDOG=1 and STATUS= from the serving event loop. Once the
drain has begun, every response says `Connection: close` through uvicorn's default
headers (WorkerServer._tell_clients_to_close). The drain itself is one sequence,
WorkerServer.shutdown() in server.py.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitgen_worker.contract import DURATION_BUCKETS, FORCE_AFTER, QUIET, STATUS_CLASSES, STATUS_EVERY, Counters
from unitgen_worker.hung import WatchThreads
from unitgen_worker.sd import notify

if TYPE_CHECKING:
    from unitgen_worker.balance import Balancer

__all__ = ["FORCE_AFTER", "QUIET", "MeasureRequests", "Metrics", "RunState", "TakeRoom", "ping"]
log = logging.getLogger("unitgen.worker")


@dataclass
class RunState:
    """Mutable state of one running instance (the spec stays frozen elsewhere)."""

    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    # uvicorn's server_state: it counts each response as it completes (total_requests)
    # and holds a task for each request and WebSocket in flight (tasks), on 0.17.6 to 0.54.
    uvicorn: Any = None
    room_taken: int = 0  # requests inside TakeRoom (an instance with a capacity)
    last_activity: float = field(default_factory=time.monotonic)  # as last seen by quiet()
    draining: bool = False
    drain_began: float = 0.0  # CLOCK_MONOTONIC
    recycling: bool = False  # every thread stuck: drain what is not, then exit EXIT_RECYCLE
    balancer: Balancer | None = None  # from startup on
    threads: WatchThreads | None = None  # WSGI apps
    swaps: int = 0  # taken over from the process this one replaced (handover.py)
    recycles: int = 0
    metrics: Metrics | None = None  # --metrics
    _served_seen: int = -1  # served when quiet() last looked

    @property
    def served(self) -> int:
        return self.uvicorn.total_requests if self.uvicorn is not None else 0

    @property
    def in_flight(self) -> int:
        return len(self.uvicorn.tasks) if self.uvicorn is not None else 0

    def counters(self) -> Counters:
        threads, metrics = self.threads, self.metrics
        return Counters(pid=os.getpid(), requests=self.served, in_flight=self.in_flight, draining=self.draining,
                        connections=self.balancer.open_connections() if self.balancer else 0,
                        busy=threads.busy() if threads else 0, threads=threads.threads if threads else 0,
                        swaps=self.swaps, recycles=self.recycles,
                        **(metrics.counters() if metrics is not None else {}))

    def status(self) -> str:
        """STATUS= for people; tools read the counters file (contract.Counters)."""
        return self.counters().status_text(self.started.strftime("%Y-%m-%d %H:%M:%S UTC"))

    def begin_drain(self) -> None:
        self.draining = True
        self.drain_began = self.last_activity = time.monotonic()

    def room_taken_now(self) -> int:
        return self.room_taken

    def quiet(self) -> bool:
        """Nothing in flight and no request ended for QUIET seconds: a keep-alive client
        told to close may send its next request up to QUIET after its last response.
        Requests are not timed as they run (that costs every request; bench/overhead.md):
        the drain polls this, and a request that ended since the last look counts as
        activity now, which is later than it was, never sooner."""
        now = time.monotonic()
        in_flight, served = self.in_flight, self.served
        if in_flight or served != self._served_seen:
            self._served_seen = served
            self.last_activity = now
        return not in_flight and now - self.last_activity >= QUIET


class Metrics:
    """--metrics: HTTP responses by status class and a duration histogram (contract)."""

    def __init__(self) -> None:
        self.responses = [0] * len(STATUS_CLASSES)
        self.unanswered = 0
        self.durations = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0

    def counters(self) -> dict[str, Any]:
        return {"responses": tuple(self.responses), "unanswered": self.unanswered,
                "durations": tuple(self.durations), "duration_sum": self.duration_sum}


class TakeRoom:
    """ASGI middleware for an instance with a capacity (a WSGI app's threads, or
    --max-concurrency): tells the balancer as each request takes room and gives it back,
    so that a full instance stops accepting at once and starts again as soon as it has
    room. Other instances go without it: it runs for every request (bench/overhead.md).
    """

    def __init__(self, app: Any, state: RunState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        state = self.state
        balancer = state.balancer
        if scope["type"] not in ("http", "websocket") or balancer is None:
            await self.app(scope, receive, send)
            return
        balancer.request_started()
        state.room_taken += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.room_taken -= 1
            balancer.request_ended()


class MeasureRequests:
    """ASGI middleware for --metrics: each HTTP response's status class and duration.
    Outside TakeRoom, so a request's time includes the worker's own part."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        def send_measured(message: dict) -> Awaitable[None]:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message.get("status", 0)
            return send(message)

        began = time.monotonic()
        try:
            await self.app(scope, receive, send_measured)
        finally:
            took = time.monotonic() - began
            metrics = self.metrics
            metrics.durations[bisect.bisect_left(DURATION_BUCKETS, took)] += 1
            metrics.duration_sum += took
            if 100 <= status < 600:
                metrics.responses[status // 100 - 1] += 1
            else:
                metrics.unanswered += 1


async def ping(state: RunState, watchdog_interval: float | None, counters_path: Path | None = None) -> None:
    """WATCHDOG=1 every watchdog_interval seconds (None: never); STATUS= and the counters
    file (counters_path, None: none) every second.

    Runs as a task on the serving event loop until cancelled, on purpose: a loop that is
    blocked stops pinging, and systemd kills it (SIGABRT) and restarts the instance.
    """
    failing = False
    next_ping = next_status = time.monotonic()
    while True:
        now = time.monotonic()
        if watchdog_interval and now >= next_ping:
            notify("WATCHDOG=1")
            next_ping = now + watchdog_interval
        if now >= next_status:
            notify(f"STATUS={state.status()}")
            if counters_path is not None:
                try:
                    state.counters().publish(counters_path)
                    failing = False
                except OSError as err:  # a full or read-only /run must not stop the pings
                    if not failing:
                        log.warning("cannot write %s: %s", counters_path, err)
                    failing = True
            next_status = now + STATUS_EVERY
        due = min(next_ping, next_status) if watchdog_interval else next_status
        await asyncio.sleep(due - time.monotonic())
