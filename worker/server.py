"""Serve the app with uvicorn on the inherited sockets; READY=1 once it really is."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType
from typing import Any

import uvicorn

from unitgen_worker.lifecycle import RunState, Supervisor, TrackRequests
from unitgen_worker.sd import notify, watchdog_interval

log = logging.getLogger("unitgen.worker")


class WorkerServer(uvicorn.Server):
    """uvicorn's Server with systemd's lifecycle: READY=1 after startup, our drain on SIGTERM."""

    def __init__(self, config: uvicorn.Config, state: RunState, *, drain_timeout: float) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.supervisor: asyncio.Future[None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler only sets a flag; supervise() drains on the event loop.
        # A second SIGINT (Ctrl-C by hand) skips the drain.
        if sig == signal.SIGINT and self.state.stop_requested:
            self.should_exit = self.force_exit = True
        self.state.stop_requested = True
        if self.supervisor is None:  # still starting up: nothing to drain yet
            self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's startup runs the ASGI lifespan startup, then listens; `started`
        # is set only when both succeeded.
        await super().startup(sockets=sockets)
        if not self.started or self.should_exit:
            return
        supervisor = Supervisor(self, self.state, drain_timeout=self.drain_timeout,
                                watchdog_interval=watchdog_interval())
        self.supervisor = asyncio.ensure_future(supervisor.run())
        notify(f"READY=1\nSTATUS={self.state.status()}")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(app: Any, sockets: list[socket.socket], *, lifespan: str, drain_timeout: float) -> bool:
    """Run until the drain is over; False when startup failed."""
    state = RunState()
    config = uvicorn.Config(
        TrackRequests(app, state),
        lifespan=lifespan,
        log_config=None,  # journald already stamps and tags every line
        access_log=False,
    )
    server = WorkerServer(config, state, drain_timeout=drain_timeout)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(server.serve(sockets=sockets))
    finally:
        loop.close()
    if not server.started:
        log.error("startup failed: the app never became ready")
    return server.started
