"""Serve the app with uvicorn on the inherited sockets; READY=1 once it really is."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import uvicorn

from unitgen_worker.sd import notify


class NotifyingServer(uvicorn.Server):
    """uvicorn's Server, telling systemd it is ready once startup has finished.

    startup() imports nothing more and runs the ASGI lifespan startup before it
    listens; `started` is set only when that succeeded.
    """

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            notify("READY=1\nSTATUS=serving")


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(app: Any, sockets: list[socket.socket], *, lifespan: str) -> bool:
    """Run until uvicorn exits; False when startup failed."""
    config = uvicorn.Config(
        app,
        lifespan=lifespan,
        log_config=None,  # journald already stamps and tags every line
        access_log=False,
    )
    server = NotifyingServer(config)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(server.serve(sockets=sockets))
    finally:
        loop.close()
    if not server.started:
        logging.getLogger("unitgen.worker").error("startup failed: the app never became ready")
    return server.started
