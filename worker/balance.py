"""Accepting connections: evenly across the instances, and only with room to serve them.

uvicorn's own server (asyncio's or uvloop's) accepts every pending connection each time
the shared listening socket is readable, so the instance whose process wakes first takes
them all (4 instances: max/min 1.66 to 2.09 of new connections). The worker accepts by
itself instead, one connection per wake, and hands each to uvicorn's protocol with
loop.connect_accepted_socket(), which asyncio and uvloop both have:

- an instance that holds more connections than its least loaded sibling (plus
  ACCEPT_SLACK) waits ACCEPT_DELAY before it accepts, so the sibling takes the connection
  first. It never refuses: a sibling whose loop is stuck costs a connection ACCEPT_DELAY;
- an instance with no room (every WSGI thread taken, or --max-concurrency requests in
  flight, counting the connections accepted in the last SILENT_GRACE seconds that have
  not sent a byte yet) stops accepting until a request ends. Connections wait in the kernel's queue,
  where any sibling with room takes them, not inside a process that cannot serve them;
- with rebalancing on, an instance over its fair share of open connections answers with
  `Connection: close` until it is back within it (connections_to_close()). The client
  reconnects, and the first rule sends it to a sibling. This is how keep-alive clients
  spread again after a roll, a restart, a crash or a scale-up.

What the siblings hold comes from the board (unitgen_worker.board).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import math
import socket
import time
from collections.abc import Callable, Collection
from typing import Any

from unitgen_worker.board import DRAINING, FULL, Board, Siblings

log = logging.getLogger("unitgen.worker")
TICK = 0.1  # seconds between heartbeats on the board and new fair shares
ACCEPT_SLACK = 1  # connections more than the least loaded sibling before deferring
ACCEPT_DELAY = 0.005  # seconds a deferring instance leaves a connection to its siblings
FRESH = 0.01  # seconds a read of the siblings' slots is reused when accepting
# A new connection's request usually follows at once; one that stays silent longer stops
# counting against the room, or idle connections (slowloris) would fill every instance.
SILENT_GRACE = 0.5
KEEP_SLACK = 2, 0.1  # over the mean by more than max(2, 10%): ask clients to reconnect
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Balancer:
    """Accepts on the listening sockets for one instance; see the module's docstring."""

    def __init__(self, sockets: list[socket.socket], protocol_factory: Callable[[], asyncio.Protocol],
                 connections: Collection[Any], *, board: Board | None, capacity: int, rebalance: bool) -> None:
        self.sockets = sockets
        self.protocol_factory = protocol_factory
        self.connections = connections  # uvicorn's server_state.connections: open ones
        self.board = board
        self.capacity = capacity  # requests in flight that fill the instance; 0: no limit
        self.rebalance = rebalance and board is not None
        self.in_flight = 0
        self.draining = False
        self.keep_limit = math.inf  # open connections above which clients are asked to move
        self._connecting = 0  # accepted, not yet handed to uvicorn's protocol
        self._silent = 0  # accepted, nothing received yet: each will most likely be a request
        self._closing = 0  # asked to close since the last tick
        self._listening: set[socket.socket] = set()
        self._deferred: dict[socket.socket, asyncio.TimerHandle] = {}
        self._siblings, self._read_at = Siblings(), -math.inf
        self._tick: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    # --- the sequence: start, then stop at the drain -------------------------------
    def start(self) -> None:
        for sock in self.sockets:
            self._listen(sock)
        self._tick = self._loop.create_task(self._ticking())

    def stop(self) -> None:
        """Accepts nothing more; siblings see this instance as draining at once."""
        self.draining = True
        for sock in list(self._listening):
            self._unlisten(sock)
        for timer in self._deferred.values():
            timer.cancel()
        self._deferred.clear()
        if self._tick is not None:
            self._tick.cancel()
        self._publish()

    def leave(self) -> None:
        if self.board is not None:
            self.board.leave()
            self.board = None

    # --- what the requests tell it --------------------------------------------------
    def request_started(self) -> None:
        self.in_flight += 1
        if self.full():
            for sock in list(self._listening):
                self._unlisten(sock)
            self._publish()

    def request_ended(self) -> None:
        self.in_flight -= 1
        self._room_again()

    def _room_again(self) -> None:
        if not self.draining and not self._listening and not self._deferred and not self.full():
            for sock in self.sockets:
                self._listen(sock)
            self._publish()

    def connections_to_close(self) -> bool:
        """True when this response should ask its client to reconnect elsewhere."""
        if not self.rebalance or len(self.connections) - self._closing <= self.keep_limit:
            return False
        self._closing += 1
        return True

    def full(self) -> bool:
        return bool(self.capacity) and self.in_flight + self._silent >= self.capacity

    def open_connections(self) -> int:
        return len(self.connections) + self._connecting

    # --- accepting --------------------------------------------------------------------
    def _listen(self, sock: socket.socket) -> None:
        if sock not in self._listening:
            self._loop.add_reader(sock.fileno(), self._readable, sock)
            self._listening.add(sock)

    def _unlisten(self, sock: socket.socket) -> None:
        if sock in self._listening:
            self._loop.remove_reader(sock.fileno())
            self._listening.discard(sock)

    def _readable(self, sock: socket.socket) -> None:
        if self.full():
            self._unlisten(sock)  # request_ended() listens again
            return
        if self._over_share():
            self._unlisten(sock)
            self._deferred[sock] = self._loop.call_later(ACCEPT_DELAY, self._deferred_accept, sock)
            return
        self._accept(sock)

    def _deferred_accept(self, sock: socket.socket) -> None:
        del self._deferred[sock]
        if self.draining or self.full():
            return
        self._accept(sock)  # nobody took it meanwhile: this instance does
        self._listen(sock)

    def _over_share(self) -> bool:
        if self.board is None:
            return False
        now = time.monotonic()
        if now - self._read_at > FRESH:
            self._siblings, self._read_at = self.board.siblings(), now
        siblings = self._siblings
        return siblings.count > 0 and self.open_connections() > siblings.fewest + ACCEPT_SLACK

    def _accept(self, sock: socket.socket) -> None:
        try:
            conn, _ = sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return  # a sibling took it, or the client gave up
        except OSError as err:
            if err.errno not in _OUT_OF_RESOURCES:
                raise
            # Out of file descriptors or memory: leave the connection in the queue for a
            # sibling and look again a little later, instead of spinning on it.
            log.warning("cannot accept a connection: %s", err)
            self._unlisten(sock)
            self._deferred[sock] = self._loop.call_later(TICK, self._deferred_accept, sock)
            return
        conn.setblocking(False)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connecting += 1
        self._silent += 1
        self._loop.create_task(self._hand_over(conn))
        if self.full():
            for listening in list(self._listening):
                self._unlisten(listening)
        self._publish()

    async def _hand_over(self, conn: socket.socket) -> None:
        made = False

        def protocol() -> asyncio.Protocol:
            nonlocal made
            made = True
            return self._counted_protocol()  # from here, its grace timer ends its silence

        try:
            await self._loop.connect_accepted_socket(protocol, conn)
        except Exception as err:  # the client reset it before uvicorn saw it, say
            log.debug("dropped an accepted connection: %s", err)
            conn.close()
            if not made:
                self._silent -= 1
                self._room_again()
        finally:
            self._connecting -= 1

    def _counted_protocol(self) -> asyncio.Protocol:
        protocol = self.protocol_factory()
        lost, received = protocol.connection_lost, protocol.data_received
        silent = True

        def spoke() -> None:
            nonlocal silent
            if silent:
                silent = False
                self._silent -= 1
                grace.cancel()
                self._room_again()

        def data_received(data: bytes) -> None:
            if silent:
                spoke()  # its request counts as in flight from now on
            received(data)

        def connection_lost(exc: Exception | None) -> None:
            spoke()
            lost(exc)
            self._room_again()
            self._publish()  # siblings see the connection gone at once

        grace = self._loop.call_later(SILENT_GRACE, spoke)
        protocol.data_received = data_received  # type: ignore[method-assign]
        protocol.connection_lost = connection_lost  # type: ignore[method-assign]
        return protocol

    # --- the board ----------------------------------------------------------------------
    def _publish(self) -> None:
        if self.board is not None:
            flags = (DRAINING if self.draining else 0) | (FULL if self.full() else 0)
            self.board.publish(self.open_connections(), self.in_flight, flags)

    async def _ticking(self) -> None:
        # A heartbeat for the siblings, and this instance's fair share of connections.
        while True:
            self._publish()
            if self.rebalance:
                siblings = self.board.siblings()  # type: ignore[union-attr]
                if siblings.count:
                    mean = (self.open_connections() + siblings.connections) / (siblings.count + 1)
                    self.keep_limit = mean + max(KEEP_SLACK[0], KEEP_SLACK[1] * mean)
                else:
                    self.keep_limit = math.inf
                self._closing = 0
            await asyncio.sleep(TICK)
