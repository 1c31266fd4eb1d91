"""What an instance counts and tells systemd from READY=1 until it exits.

RunState holds the counters; TrackRequests keeps them (MeasureRequests too, with
--metrics); ping() sends WATCHDOG=1 and STATUS= from the serving event loop. Once the
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitgen_worker.contract import DURATION_BUCKETS, FORCE_AFTER, QUIET, STATUS_CLASSES, STATUS_EVERY, Counters
from unitgen_worker.hung import WatchThreads
from unitgen_worker.sd import notify

if TYPE_CHECKING:
    from unitgen_worker.balance import Balancer

__all__ = ["FORCE_AFTER", "QUIET", "MeasureRequests", "Metrics", "RunState", "TrackRequests", "ping"]
log = logging.getLogger("unitgen.worker")


@dataclass
class RunState:
    """Mutable state of one running instance (the spec stays frozen elsewhere)."""

    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    served: int = 0
    in_flight: int = 0
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

    def in_flight_now(self) -> int:
        return self.in_flight

    def quiet(self) -> bool:
        """Nothing in flight and no request ended for QUIET seconds: a keep-alive client
        told to close may send its next request up to QUIET after its last response.
        Requests are not timed as they run (that costs every request; bench/overhead.md):
        the drain polls this, and a request that ended since the last look counts as
        activity now, which is later than it was, never sooner."""
        now = time.monotonic()
        if self.in_flight or self.served != self._served_seen:
            self._served_seen = self.served
            self.last_activity = now
        return not self.in_flight and now - self.last_activity >= QUIET


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


class TrackRequests:
    """ASGI middleware: counts requests and tells the balancer; a response whose client
    the balancer moves to a sibling says `Connection: close`.

    It runs for every request, so it does only what must be done per request (bench/
    overhead.md): the drain's `Connection: close` is one of uvicorn's default headers
    (WorkerServer._tell_clients_to_close), and stuck requests are found among uvicorn's tasks
    (hung.py), neither at a cost to each request.
    """

    def __init__(self, app: Any, state: RunState) -> None:
        self.app = app
        self.state = state

    @staticmethod
    def _moving(send: Any, balancer: Balancer) -> Callable[[dict], Awaitable[None]]:
        # Not a coroutine: it returns uvicorn's send() awaitable itself.
        def send_moving(message: dict) -> Awaitable[None]:
            if message["type"] == "http.response.start" and balancer.connections_to_close():
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            return send(message)
        return send_moving

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = self.state
        balancer = state.balancer
        if balancer is not None:
            if balancer.moving():
                send = self._moving(send, balancer)
            balancer.request_started()
        state.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1
            state.served += 1
            if balancer is not None:
                balancer.request_ended()


class MeasureRequests:
    """ASGI middleware for --metrics: each HTTP response's status class and duration.
    Outside TrackRequests, so a request's time includes the worker's own part."""

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
