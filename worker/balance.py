"""Accepting connections: evenly across the instances, and only with room to serve them.

The accepting itself stays in uvloop's (or asyncio's) own server, the fastest path there
is: measured here, a Python accept loop (accept + connect_accepted_socket) cost a third
of the connection-close throughput. What the Balancer adds is when to accept at all. It
serves each listening socket through a duplicate of its descriptor, so that it can stop
accepting by closing its server (only the duplicate closes: systemd, this process's own
copy and the siblings keep the socket and its queue) and start again with a new one:

- an instance with no room (its WSGI threads all taken or claimed by queued requests, or
  --max-concurrency requests in flight) stops accepting until a request ends.
  Connections wait in the kernel's queue, where any sibling with room takes them, not
  inside a process that cannot serve them. Except in a burst under libuv before 1.45
  (Debian 12 has 1.44): it accepts every connection waiting at each wake, and a server
  cannot be closed in the middle of that (libuv closes the connection accepted but not
  yet handed over), so one wake may take more than the room (64 connections at once:
  11 to 53 in one instance of 2 in 6 tries). libuv 1.45 accepts one per wake (libuv #3696);
- while connections come and go fast (connection-close load, many short clients), an
  instance that accepted more of them over the last second than the mean of it and its
  siblings, by more than ACCEPTS_SLACK, stops accepting until it is back near the mean.
  Accepts are what such load is made of: the process that wakes first would take most
  (libuv before 1.45 accepts all that wait; 4 instances: max/min 1.73
  to 2.05), and shares of open connections, few and short-lived, left an instance whose
  core was less contended taking more (1.09 to 1.33). On accept counts: 1.01 to 1.03;
- otherwise (keep-alive clients), an instance over its fair share of open connections
  stops accepting until it is back within it, so new connections go to its siblings;
- with rebalancing on (the default), the next response on each connection it holds
  over its share says `Connection: close` (_move_clients()), so those keep-alive clients
  reconnect to siblings. This is how they spread again after a roll, a restart, a crash
  or a scale-up.

All of it is decided as connections arrive and on a tick, not as each request runs
(that cost every request: bench/overhead.md); only an instance with a capacity hears of
each request (request_started(), request_ended(), from lifecycle.TakeRoom).

What the siblings hold comes from the board (unitgen_worker.board). An instance never
stops accepting for its share while no sibling with room is alive on the board.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from unitgen_worker.board import DRAINING, FULL, OVER_SHARE, Board, Siblings

log = logging.getLogger("unitgen.worker")
TICK = 0.1  # seconds between heartbeats on the board and new fair shares
FRESH = 0.01  # seconds: an instance about to stop or start accepting looks at most this often
# Open connections above the mean of the instances by more than max(0.5, 2.5%): accept
# none until back at the mean; by more than max(1, 5%): also ask clients to reconnect.
# The second is wider, so an instance that has just asked a client to move does not
# take it back: 64 keep-alive connections over 4 instances settle within 13 to 17 each.
ACCEPT_SLACK = 0.5, 0.025
KEEP_SLACK = 1, 0.05
# Accepted connections over the last ACCEPTS_WINDOW seconds: an instance over the mean
# by more than max(5, 5%) accepts none until within half that. Counts read fresh from
# the board, not rates: a rate over a sliding window falls only as old accepts leave it,
# and everyone's falls together, so instances waited on each other (a third of the
# connection-close throughput lost here). A tighter slack costs throughput too: 3% lost
# a sixth of it, where 5% lost none and kept max/min at 1.01 to 1.03. Below MIN_ACCEPTS
# each in the window (keep-alive load, clients moving after a roll), accepts say nothing
# about the load, and the shares of open connections decide.
ACCEPTS_WINDOW = 1.0
# Seconds after a sibling came, went or began to drain in which no client is asked to move.
# As an instance swaps, its new process shows on the board with no connection at all,
# while the old one's clients are about to reconnect (its drain asks them to): the
# sibling, over the mean of itself and an empty instance, asked half its clients to move
# too, and the new process, given both, sent some of them back (measured in a reload of
# 1 of 2 under 64 keep-alive connections: 67 reconnects where 31 left the old process).
# Moves wait until the board says where the clients went; a sibling over its share still
# accepts none meanwhile, which is what sends the old process's clients to the new one.
SETTLE = 1.0
# Seconds a client asked to move counts as still this instance's after it was told: the
# board shows it at a sibling only once that sibling has published (up to a TICK) and this
# instance has read the board again (another). In between, this instance saw itself a
# client lower and the mean lower with it, and asked one more to move than it held over
# its share (8 against 0: 4 asked, where 3 were over; seen in CI).
TRANSIT = 3 * TICK
ACCEPTS_SLACK = 5, 0.05
MIN_ACCEPTS = 50


class Balancer:
    """Decides when this instance accepts; see the module's docstring.

    busy() says how many requests hold the instance's room now (WSGI: threads running a
    request or queued for one; ASGI: requests in flight); capacity is how many fill it
    (0: never full).
    """

    def __init__(self, sockets: list[socket.socket], protocol_factory: Callable[[], asyncio.Protocol],
                 connections: Collection[Any], *, board: Board | None, capacity: int, busy: Callable[[], int],
                 rebalance: bool, backlog: int, http_protocol: type | None = None) -> None:
        self.sockets = sockets
        # create_server() calls listen() again on the socket with this backlog: uvicorn's
        # own (--backlog, 2048), as before.
        self.backlog = backlog
        self.protocol_factory = protocol_factory
        self.connections = connections  # uvicorn's server_state.connections: open ones
        # The class of those that speak HTTP (the others are WebSockets): each reads its
        # `app` as a request starts, on uvicorn 0.17.6 to 0.54, which is how a client is
        # asked to move (_move_clients()).
        self.http_protocol = http_protocol
        self.board = board
        self.capacity = capacity
        self.busy = busy
        self.rebalance = rebalance  # ask keep-alive clients over the share to reconnect
        self.draining = False
        self.over_share = False  # accepting nothing until back within its share
        self.keep_limit = math.inf  # open connections above which clients are asked to move
        self.accept_limit = math.inf  # ... above which this instance accepts none
        self.resume_limit = math.inf  # ... until back at this
        self.accepted = 0  # connections, since start
        self.ahead = False  # accepting nothing until its accepts are back at the mean
        # The siblings' accepted counts and its own, a tick apart, ACCEPTS_WINDOW back.
        self._accepts: deque[tuple[dict[int, int], int]] = deque(maxlen=round(ACCEPTS_WINDOW / TICK) + 1)
        self._counted = -math.inf  # when it last compared its accepts with the siblings'
        # Many connections come and go (over MIN_ACCEPTS each in the window): the accepts
        # are shared, and the open connections, few and short, are left to themselves.
        self.churning = False
        self._sibling_accepting = False  # as of the last look at the board
        self._siblings_seen: frozenset[int] = frozenset()  # their pids, as of the last tick
        self._settled_at = -math.inf  # when clients may be asked to move again (SETTLE)
        self._looked_at = -math.inf
        self._looking_again: asyncio.TimerHandle | None = None  # _back_within_share(), pending
        self._moving: weakref.WeakSet[Any] = weakref.WeakSet()  # connections asked to move
        self._told: deque[float] = deque()  # when each client asked to move was told (TRANSIT)
        self._servers: list[asyncio.AbstractServer] = []
        self._switching: asyncio.Task[None] | None = None
        self._tick: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    # --- the sequence: start, then stop at the drain -------------------------------
    async def start(self) -> None:
        await self._switch()
        self._tick = self._loop.create_task(self._ticking())

    async def stop(self) -> None:
        """Accepts nothing more; siblings see this instance as draining at once."""
        self.draining = True
        if self._tick is not None:
            self._tick.cancel()
        await self._switch()
        self._publish()

    def leave(self) -> None:
        if self.board is not None:
            self.board.leave()
            self.board = None

    # --- what the connections and requests tell it --------------------------------------------------
    def _accepting(self) -> asyncio.Protocol:
        """The protocol factory the servers call at each connection they accepted."""
        self.accepted += 1
        if self.board is not None:
            self.board.count_accepted(self.accepted)
            if not self.ahead and time.monotonic() - self._counted >= FRESH:
                self._share_accepts()
            self._check_share(arriving=1)
        return self.protocol_factory()

    def request_started(self) -> None:
        """A request takes room (an instance with a capacity only)."""
        # This request takes room that busy() may not show yet (a WSGI request is queued
        # for a thread only once the app is called).
        if self._servers and self.busy() + 1 >= self.capacity:
            self._want_switch()

    def request_ended(self) -> None:
        if not self._servers and not self.draining:
            self._want_switch()

    def _check_share(self, arriving: int = 0) -> None:
        """Stops accepting while over its share of open connections (arriving: one just
        accepted, not yet among them), where a sibling accepts instead."""
        if self.over_share or self.churning or len(self.connections) + arriving <= self.accept_limit:
            return
        self._look_at_the_board(arriving)  # the limits may be a tick old: decide on fresh ones
        if not self.over_share and self._sibling_accepting and len(self.connections) + arriving > self.accept_limit:
            self.over_share = True  # new connections go to siblings until back within its share
            self._want_switch()
            self._look_again_soon()

    def _look_again_soon(self) -> None:
        # One look pending at most: the tick may end over_share and a new arrival set it
        # again before the last look ran, which would otherwise start a second chain.
        if self._looking_again is None:
            self._looking_again = self._loop.call_later(FRESH, self._back_within_share)

    def _back_within_share(self) -> None:
        """Looks every FRESH seconds, while over its share, whether enough of its connections
        have closed: nothing else tells it (no hook runs as a connection ends), and waiting
        for the tick kept short-lived connections' instances out for up to TICK each time
        (a roll of 4 under connection-close load: p99 2x steady, a fifth less served)."""
        self._looking_again = None
        if not self.over_share:
            return
        if len(self.connections) <= self.resume_limit:
            self._look_at_the_board()  # decides on fresh limits, and switches if it may accept
        if self.over_share:
            self._look_again_soon()

    def _move_clients(self) -> None:
        """Over its share by more than KEEP_SLACK: the next response on as many of its
        connections as it holds over that says `Connection: close` (uvicorn then closes
        the connection, and the client reconnects, to a sibling: this instance accepts
        none while over its share). Back within it, those asked that have not sent a
        request since are no longer asked."""
        if not self.rebalance or self.http_protocol is None:
            return
        open_connections = self.connections
        asked = sum(1 for connection in self._moving if connection in open_connections)
        excess = len(open_connections) - asked - self.keep_limit
        if excess > 0:
            for connection in list(open_connections):
                if excess <= 0:
                    break
                if type(connection) is self.http_protocol and connection not in self._moving:
                    connection.app = MoveClient(connection.app, self._told_to_move)
                    self._moving.add(connection)
                    excess -= 1
        elif asked and len(open_connections) <= self.keep_limit:
            for connection in list(self._moving):
                if isinstance(connection.app, MoveClient):
                    connection.app = connection.app.app
            self._moving = weakref.WeakSet()

    def _told_to_move(self) -> None:
        self._told.append(time.monotonic())

    def _in_transit(self) -> int:
        """Clients told to move within TRANSIT."""
        since = time.monotonic() - TRANSIT
        while self._told and self._told[0] < since:
            self._told.popleft()
        return len(self._told)

    def full(self) -> bool:
        return bool(self.capacity) and self.busy() >= self.capacity

    def open_connections(self) -> int:
        return len(self.connections)


    # --- accepting or not ---------------------------------------------------------------
    def _should_accept(self) -> bool:
        return not (self.draining or self.over_share or self.ahead or self.full())

    def _want_switch(self) -> None:
        if self._switching is None or self._switching.done():
            self._switching = self._loop.create_task(self._switch())

    async def _switch(self) -> None:
        """Starts or stops the servers until they match _should_accept()."""
        while bool(self._servers) != self._should_accept():
            if self._servers:
                servers, self._servers = self._servers, []
                for server in servers:
                    server.close()  # closes the duplicate only: the socket and its queue stay
            else:
                self._servers = [await self._serve(sock) for sock in self.sockets]
            self._publish()

    async def _serve(self, sock: socket.socket) -> asyncio.AbstractServer:
        # libuv (uvloop) before 1.45 accepts every pending connection at each wake; the
        # accept counts above spread them. Not UV_TCP_SINGLE_ACCEPT=1: libuv then nanosleep()s after
        # every accept, which the kernel's default timer slack makes 50 us, and that idle
        # time cost a third of the connection-close throughput (2 instances: 0.65x of
        # uvicorn --workers 2 with it, 0.94x without; 4 instances kept max/min 1.02-1.09).
        duplicate = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            return await self._loop.create_server(self._accepting, sock=duplicate, backlog=self.backlog)
        except BaseException:
            duplicate.close()
            raise

    # --- the board ----------------------------------------------------------------------
    def _publish(self) -> None:
        if self.board is not None:
            flags = ((DRAINING if self.draining else 0) | (FULL if self.full() else 0)
                     | (OVER_SHARE if self.over_share or self.ahead else 0))
            self.board.publish(self.open_connections(), self.busy(), flags, self.accepted)

    async def _ticking(self) -> None:
        # A heartbeat for the siblings, this instance's fair share of connections, and a
        # safety net that starts accepting again if a request's end was missed.
        while True:
            self._publish()
            if self.board is not None:
                self.board.claim()
                siblings = self.board.siblings()
                self._share(siblings)
                self._accepts.append((siblings.accepted, self.accepted))
                if not self.ahead:
                    self._share_accepts(siblings)
                self._check_share()
                now = time.monotonic()
                if siblings.pids != self._siblings_seen:
                    self._siblings_seen, self._settled_at = siblings.pids, now + SETTLE
                if not self.draining and now >= self._settled_at:
                    self._move_clients()
            if bool(self._servers) != self._should_accept():
                self._want_switch()
            await asyncio.sleep(TICK)

    def _look_at_the_board(self, arriving: int = 0) -> None:
        """Publishes and reads the board again, at most every FRESH seconds."""
        now = time.monotonic()
        if self.board is not None and now - self._looked_at >= FRESH:
            self._looked_at = now
            self._publish()
            self._share(self.board.siblings(), arriving)
            if bool(self._servers) != self._should_accept():
                self._want_switch()

    def _share(self, siblings: Siblings, arriving: int = 0) -> None:
        # A connection just accepted counts in the mean as well: without it, the first
        # connection an idle instance took put it over the share of an idle pair (0.5)
        # and it stopped accepting, leaving its sibling to take more than its threads.
        mine = self.open_connections() + arriving
        if siblings.count:
            mean = (mine + siblings.connections) / (siblings.count + 1)
            # Those told to move within TRANSIT may not show at a sibling yet: they count
            # here, for the keep limit only (accepting none sends them elsewhere anyway).
            moving_mean = mean + self._in_transit() / (siblings.count + 1)
            self.keep_limit = moving_mean + max(KEEP_SLACK[0], KEEP_SLACK[1] * moving_mean)
            self.accept_limit = mean + max(ACCEPT_SLACK[0], ACCEPT_SLACK[1] * mean)
            self.resume_limit = mean
        else:
            self.keep_limit = self.accept_limit = self.resume_limit = math.inf  # nobody else to take them
        # Back within its share, or nobody else accepts (siblings that stopped for their
        # share at the same moment, say): accept again, or clients would wait.
        self._sibling_accepting = siblings.accepting > 0
        if self.over_share and (mine <= self.resume_limit or not self._sibling_accepting or self.churning):
            self.over_share = False

    def _share_accepts(self, siblings: Siblings | None = None) -> None:
        """Stops accepting while over its share of the accepts, and looks again every FRESH
        seconds until back at the mean (nothing else wakes a paused instance whose few
        connections have closed). siblings: the board as the tick just read it."""
        self._counted = time.monotonic()
        over = self._accepts_over_the_mean(siblings)
        slack = max(ACCEPTS_SLACK[0], ACCEPTS_SLACK[1] * over[1]) if over is not None else 0
        if self.ahead:
            # Back within half the slack: stopping until exactly at the mean kept each
            # instance out for longer than the evening out needs (measured: 0.5 s in 5).
            if over is None or over[0] <= slack / 2:
                self.ahead = False
                self._want_switch()
            else:
                self._loop.call_later(FRESH, self._share_accepts)
        elif over is not None and over[0] > slack:
            self.ahead = True
            self._want_switch()  # not closed here: uvloop has yet to take this connection
            self._loop.call_later(FRESH, self._share_accepts)

    def _accepts_over_the_mean(self, siblings: Siblings | None) -> tuple[float, float] | None:
        """(accepts over the mean, the mean) over the window, or None where that says
        nothing: a new instance (after a roll, say) takes what comes for a whole window,
        and its siblings do not stop for its few accepts; nor for a sibling that is full."""
        self.churning = False
        if self.board is None or self.draining or len(self._accepts) < (self._accepts.maxlen or 0):
            return None
        then, mine_then = self._accepts[0]
        if siblings is None:
            siblings = self.board.siblings()
        self._sibling_accepting = siblings.accepting > 0
        # While an instance drains or has just started (a roll, a restart), every free
        # core counts more than an even spread: measured, p99 during a roll under
        # connection-close load went from 1.3x steady to 1.4-1.5x when the others still
        # stopped for each other then.
        if siblings.draining or not siblings.accepted.keys() <= then.keys() or not self._sibling_accepting:
            return None
        theirs = [n - then[pid] for pid, n in siblings.accepted.items()]
        if not theirs:
            return None
        mine = self.accepted - mine_then
        mean = (mine + sum(theirs)) / (len(theirs) + 1)
        self.churning = mean >= MIN_ACCEPTS
        return (mine - mean, mean) if mean >= MIN_ACCEPTS else None


class MoveClient:
    """The app of a connection asked to move (Balancer._move_clients()): its next
    response says `Connection: close`."""

    def __init__(self, app: Any, told: Callable[[], None]) -> None:
        self.app = app
        self.told = told  # called as the response says it

    def __call__(self, scope: dict, receive: Any, send: Any) -> Awaitable[None]:
        def send_moving(message: dict) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                self.told()
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            return send(message)
        return self.app(scope, receive, send_moving)
