"""What an instance counts and tells systemd from READY=1 until it exits.

RunState holds the counters; TrackRequests keeps them and, once the drain has begun,
tells every client to close; ping() sends WATCHDOG=1 and STATUS= from the serving event
loop. The drain itself is one sequence, WorkerServer.shutdown() in server.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unitgen_worker.contract import DRAIN_SPREAD, FORCE_AFTER, QUIET, STATUS_EVERY, Counters
from unitgen_worker.hung import AsgiRequest, WatchThreads
from unitgen_worker.sd import notify

if TYPE_CHECKING:
    from unitgen_worker.balance import Balancer

__all__ = ["FORCE_AFTER", "QUIET", "RunState", "TrackRequests", "ping"]
log = logging.getLogger("unitgen.worker")


@dataclass
class RunState:
    """Mutable state of one running instance (the spec stays frozen elsewhere)."""

    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    served: int = 0
    in_flight: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    draining: bool = False
    drain_began: float = 0.0  # CLOCK_MONOTONIC
    recycling: bool = False  # every thread stuck: drain what is not, then exit EXIT_RECYCLE
    running: dict[int, AsgiRequest] = field(default_factory=dict)  # ASGI requests in flight, by number
    started_requests: int = 0  # numbers them: a key is never reused, as an id() could be
    balancer: Balancer | None = None  # from startup on
    threads: WatchThreads | None = None  # WSGI apps

    def counters(self) -> Counters:
        threads = self.threads
        return Counters(pid=os.getpid(), requests=self.served, in_flight=self.in_flight, draining=self.draining,
                        connections=self.balancer.open_connections() if self.balancer else 0,
                        busy=threads.busy() if threads else 0, threads=threads.threads if threads else 0)

    def status(self) -> str:
        """STATUS= for people; tools read the counters file (contract.Counters)."""
        return self.counters().status_text(self.started.strftime("%Y-%m-%d %H:%M:%S UTC"))

    def begin_drain(self) -> None:
        self.draining = True
        # Requests end without a look at the clock until now (TrackRequests): the drain
        # waits QUIET from here at least, for a keep-alive client's next request.
        self.drain_began = self.last_activity = time.monotonic()

    def tells_to_close(self, client: Any) -> bool:
        """Whether a response to this client (ASGI scope["client"]) now says
        `Connection: close`: while draining, from a moment of its own within DRAIN_SPREAD
        of the drain's start, so that the clients of a drained process do not all come
        back to the siblings (or its new process, cold) in the same millisecond."""
        if not self.draining:
            return False
        port = client[1] if isinstance(client, (list, tuple)) and len(client) == 2 and isinstance(client[1], int) else 0
        return time.monotonic() - self.drain_began >= DRAIN_SPREAD * (port * 2654435761 % 1000) / 1000

    def in_flight_now(self) -> int:
        return self.in_flight

    def quiet(self) -> bool:
        """Nothing in flight and nothing has happened for QUIET seconds, counted from the
        end of DRAIN_SPREAD at the earliest: a keep-alive client is told to close at its
        moment in the spread, and may send its next request up to QUIET after it. With
        no connection open, nobody is left to tell."""
        since = self.last_activity
        if self.draining and self.balancer is not None and self.balancer.open_connections():
            since = max(since, self.drain_began + DRAIN_SPREAD)
        return self.in_flight == 0 and time.monotonic() - since >= QUIET


class TrackRequests:
    """ASGI middleware: counts requests, tells the balancer, and adds `Connection: close`
    while draining or when the balancer moves this client to a sibling."""

    def __init__(self, app: Any, state: RunState, watch: bool = True) -> None:
        self.app = app
        self.state = state
        self.watch = watch  # keep ASGI requests for the --request-timeout watcher

    def _closing(self, scope: dict, send: Any) -> Callable[[dict], Awaitable[None]]:
        state, balancer = self.state, self.state.balancer

        # Not a coroutine: it returns uvicorn's send() awaitable itself.
        def send_closing(message: dict) -> Awaitable[None]:
            if message["type"] == "http.response.start" and (
                    state.tells_to_close(scope.get("client"))
                    or (balancer is not None and balancer.connections_to_close())):
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            return send(message)
        return send_closing

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = self.state
        balancer = state.balancer
        # Every response goes through the wrapper, even though it costs a few % of a
        # hello-world app's throughput (bench/overhead.md): a drain can begin while a
        # request runs, and its response must then say `Connection: close`, or the
        # client could send its next request as the connection is closed.
        send = self._closing(scope, send)

        # An ASGI app's requests are watched for --request-timeout here; a WSGI app's by
        # the thread that runs each (hung.WatchThreads).
        # Skipped when --request-timeout is 0, as is all that is not needed: this runs
        # for every request (bench/ holds one instance to within a few % of bare uvicorn).
        watched = state.threads is None and self.watch
        now = time.monotonic()
        if watched:
            key = state.started_requests = state.started_requests + 1
            state.running[key] = (now, asyncio.current_task(), scope)
        state.in_flight += 1
        state.last_activity = now
        if balancer is not None:
            balancer.request_started()
        try:
            await self.app(scope, receive, send)
        finally:
            state.in_flight -= 1
            state.served += 1
            if state.draining:
                state.last_activity = time.monotonic()
            if watched:
                del state.running[key]
            if balancer is not None:
                balancer.request_ended()


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
