"""An instance's life after READY=1: watchdog pings, STATUS= counters, and the drain.

Everything here runs on the serving event loop. That is the point of the watchdog: a
loop that is blocked stops pinging, and systemd kills and restarts the instance.

The drain fails no request, keep-alive included. On SIGTERM the instance
1. tells systemd STOPPING=1 and closes its own copy of the listening socket (systemd
   and the sibling instances keep theirs, so new connections go to them);
2. answers every request from then on with `Connection: close`, so each client moves
   to a sibling after its next response instead of finding its connection closed
   while its next request is on the wire;
3. waits until nothing is in flight and nothing has happened for QUIET seconds;
4. only then lets uvicorn close what is left (idle connections nobody is using).
At the drain timeout, long-lived connections (WebSocket, streams) are closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from unitgen_worker.sd import notify

log = logging.getLogger("unitgen.worker")
QUIET = 0.5  # seconds with no request activity before idle connections are closed
TICK = 0.1  # how often the supervisor looks around
FORCE_AFTER = 2.0  # seconds after closing connections at the drain timeout before exiting anyway


@dataclass
class RunState:
    """Mutable state of one running instance (the spec stays frozen elsewhere)."""

    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    served: int = 0
    in_flight: int = 0
    last_activity: float = field(default_factory=time.monotonic)
    stop_requested: bool = False  # set by the signal handler, acted on by supervise()
    draining: bool = False

    def status(self) -> str:
        phase = "draining" if self.draining else "serving"
        since = self.started.strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{phase}: {self.served} requests, {self.in_flight} in flight, up since {since}"


class TrackRequests:
    """ASGI middleware: counts requests and adds `Connection: close` while draining."""

    def __init__(self, app: Any, state: RunState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state = self.state

        async def send_closing_when_draining(message: dict) -> None:
            if message["type"] == "http.response.start" and state.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        state.in_flight += 1
        state.last_activity = time.monotonic()
        try:
            await self.app(scope, receive, send_closing_when_draining)
        finally:
            state.in_flight -= 1
            state.served += 1
            state.last_activity = time.monotonic()


def _begin_drain(server: Any, state: RunState) -> None:
    state.draining = True
    notify(f"STOPPING=1\nSTATUS={state.status()}")
    log.info("draining: %d requests in flight", state.in_flight)
    # Close only this process's copy of the listening socket: never shutdown(), which
    # would stop it for systemd and every sibling too.
    for listener in getattr(server, "servers", []):
        listener.close()


def _close_connections(server: Any) -> int:
    connections = list(server.server_state.connections)
    for connection in connections:
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.close()
    return len(connections)


class Supervisor:
    """Runs from READY=1 until the drain is over; then uvicorn shuts down."""

    def __init__(self, server: Any, state: RunState, *, drain_timeout: float, watchdog_interval: float | None) -> None:
        self.server = server
        self.state = state
        self.drain_timeout = drain_timeout
        self.watchdog_interval = watchdog_interval
        self.next_ping = self.next_status = 0.0
        self.deadline: float | None = None
        self.force_at: float | None = None

    async def run(self) -> None:
        while True:
            try:
                if self.tick(time.monotonic()):
                    return
            except Exception:  # noqa: BLE001 - a dead supervisor would never drain
                log.exception("supervisor tick failed")
            await asyncio.sleep(TICK)

    def tick(self, now: float) -> bool:
        """One look around; True once the drain is over."""
        server, state = self.server, self.state
        if self.watchdog_interval and now >= self.next_ping:
            notify("WATCHDOG=1")
            self.next_ping = now + self.watchdog_interval
        if now >= self.next_status:
            notify(f"STATUS={state.status()}")
            self.next_status = now + 1.0
        if state.stop_requested and not state.draining:
            _begin_drain(server, state)
            self.deadline = now + self.drain_timeout
        if not state.draining:
            return False
        if state.in_flight == 0 and now - state.last_activity >= QUIET:
            log.info("drained: %d requests served", state.served)
            server.should_exit = True
            return True
        if self.force_at is None and self.deadline is not None and now >= self.deadline:
            closed = _close_connections(server)
            log.warning("drain timeout (%.0f s): closed %d connections, %d requests unfinished",
                        self.drain_timeout, closed, state.in_flight)
            server.should_exit = True
            self.force_at = now + FORCE_AFTER
        if self.force_at is not None and now >= self.force_at:
            server.force_exit = True
            return True
        return False
