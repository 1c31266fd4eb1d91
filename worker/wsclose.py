"""WebSocket clients of a draining process get a close frame at once, code 1012 (service
restart, RFC 6455 as registered by IANA), so that they reconnect now, to a sibling,
instead of finding their connection cut at the drain timeout. A roll of many instances
with open WebSockets then takes seconds, not a drain timeout per instance.

uvicorn sends such a frame only from its own shutdown, which comes after the drain, and
on 0.17.6 (Debian 12) its `websockets` protocol sends none at all (it only closes the
transport). So the drain asks each open WebSocket itself, through what each of
uvicorn's protocols has had from 0.17.6 on:
- the `websockets` one (the default when the websockets library is installed) is a
  websockets WebSocketServerProtocol: its close() runs the closing handshake; the app's
  receive() then returns websocket.disconnect with the code;
- the `wsproto` and `websockets-sansio` ones: their shutdown() queues
  websocket.disconnect (1012) for the app, sends the close frame and closes.
A connection still in its opening handshake is left alone here; the drain looks again
every POLL, so it is asked once it is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("unitgen.worker")
SERVICE_RESTART = 1012
REASON = "server restarting"


def close_websockets(connections: Iterable[Any], asked: weakref.WeakSet[Any]) -> int:
    """Asks every open WebSocket not in asked to close; returns how many it asked."""
    count = 0
    for connection in list(connections):
        if connection in asked or not _open_websocket(connection):
            continue
        asked.add(connection)
        count += 1
        if hasattr(connection, "handshake_completed_event"):  # the websockets library's protocol
            task = asyncio.ensure_future(connection.close(SERVICE_RESTART, REASON))
            task.add_done_callback(_quiet)
        else:
            with contextlib.suppress(Exception):  # a frame it cannot send: the transport closes anyway
                connection.shutdown()
    return count


def _open_websocket(connection: Any) -> bool:
    event = getattr(connection, "handshake_completed_event", None)
    if event is not None:  # set at the end of the handshake, and also when the connection is lost
        return event.is_set() and getattr(connection, "open", False) is True
    return getattr(connection, "handshake_complete", None) is True and not getattr(connection, "close_sent", False)


def _quiet(task: asyncio.Task[Any]) -> None:
    # A client that went away mid-handshake: nothing to tell anyone.
    if not task.cancelled() and task.exception() is not None:
        log.debug("closing a WebSocket: %s", task.exception())
