"""Serve the app with uvicorn on the inherited sockets: READY=1 once it really is, and a
drain on SIGTERM that fails no request, keep-alive included.

The drain is WorkerServer.shutdown(): one sequence, read top to bottom like uvicorn's
own Server.shutdown(), which is its last step:
1. STOPPING=1, and close this process's copy of the listening sockets: systemd and the
   sibling instances keep theirs, so new connections go to them;
2. answer every request from then on with `Connection: close` (one of uvicorn's default
   headers from then on, so also the responses of requests already in flight), so each
   client moves to a sibling after its next response instead of finding its connection
   closed while its next request is on the wire;
3. send every open WebSocket a close frame (1012, wsclose.py), so its client reconnects
   to a sibling now; wait until nothing is in flight and nothing has happened for QUIET
   seconds, at most the drain timeout; at the timeout, close the connections left;
4. uvicorn's own shutdown: it closes the idle connections and runs the lifespan
   shutdown; after a drain timeout, it gets FORCE_AFTER seconds before force_exit.
The same drain recycles an instance whose threads are all stuck (hung.py), except that
it does not wait for the stuck requests.

On SIGHUP (`systemctl reload`), a new process takes the instance over and this one then
drains the same way (handover.py): capacity never drops. The same swap recycles an
instance after --max-requests or over its memory limit (recycle.py).

uvicorn gets no listening socket: the Balancer (balance.py) serves each through a
duplicate of its descriptor with uvicorn's protocol, and stops and starts accepting, so
that load spreads evenly and an instance with no room accepts nothing.

It has to work from uvicorn 0.17.6 (Debian 12) to the current release, so it uses only
what they all have: Server.startup()/shutdown(sockets=), `servers`,
`server_state.connections`, should_exit/force_exit, and main_loop(), which looks at
should_exit every 0.1 s and then returns for serve() to call shutdown().
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import os
import signal
import socket
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from unitgen_worker.balance import Balancer
from unitgen_worker.board import Board
from unitgen_worker.contract import EXIT_RECYCLE, EXIT_STARTUP
from unitgen_worker.handover import EARLY_SIGHUP, Successor, Swap, become_main, outlive
from unitgen_worker.hung import HungRequests
from unitgen_worker.lifecycle import FORCE_AFTER, MeasureRequests, RunState, TakeRoom, ping
from unitgen_worker.recycle import Recycle
from unitgen_worker.sd import notify, watchdog_interval
from unitgen_worker.wsclose import close_websockets

log = logging.getLogger("unitgen.worker")
POLL = 0.1  # how often the drain looks whether it is quiet, as uvicorn's own waits do
WATCH_EVERY = 0.25  # seconds between looks for stuck requests
RECYCLE_EVERY = 0.1  # seconds between looks at the request count and resident memory (a read of /proc)


class WorkerServer(uvicorn.Server):
    """uvicorn's Server with systemd's lifecycle: READY=1 after startup, our drain on SIGTERM."""

    def __init__(self, config: uvicorn.Config, state: RunState, *, drain_timeout: float, hung: HungRequests,
                 balance: dict[str, Any], counters_path: Path | None = None, successor: Successor | None = None,
                 instance: str = "0", runtime: Path | None = None, recycle: Recycle | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout = drain_timeout
        self.hung = hung
        self.balance = balance  # the Balancer's board, capacity, busy and rebalance
        self.counters_path = counters_path
        self.listen_sockets: list[socket.socket] = []
        self.pinger: asyncio.Task[None] | None = None  # from READY=1 on
        self.watcher: asyncio.Task[None] | None = None
        self.successor = successor  # started by a reload: the old process hands over
        self.instance = instance
        self.runtime = runtime
        self.swap: Swap | None = None
        self.swapper: asyncio.Task[None] | None = None
        self.recycler: asyncio.Task[None] | None = None
        self.swap_asked = asyncio.Event()
        self.asked_at = 0.0  # CLOCK_MONOTONIC of the last SIGHUP
        self.main = True  # False: started by a reload that failed, never the main process
        self.exit_at_first_tick = False  # told to exit during startup: see startup()
        self.cut_short = False  # a second SIGINT: no more waiting for anything
        self.stopped_while_handing_over = False
        self.recycle = recycle or Recycle()
        self.recycling_swap = False  # the swap asked for is a recycle, not a reload
        self.swapping = False  # from the swap's start to its outcome
        hung.asgi_tasks = self.server_state.tasks  # uvicorn's task for each request in flight
        state.uvicorn = self.server_state  # what the instance served, and has in flight
        # uvicorn's default headers (Date), one list for the life of the process: see on_tick().
        self.default_headers = self.server_state.default_headers
        self.drain_headers: list[tuple[bytes, bytes]] = []

    async def on_tick(self, counter: int) -> bool:
        # Every second uvicorn puts a new list of default headers in server_state; a
        # connection's protocol keeps the list it was made with (0.17.6) or its request
        # cycle takes the one of the moment (later). Copied into one list, kept for the
        # life of the process, so that the header the drain adds reaches every response
        # started after it, on every open connection, in flight or not, on every uvicorn
        # version, at no cost to each request. No await in between: nothing can read the
        # new list before it is replaced.
        if self.exit_at_first_tick:
            self.should_exit = True
        should_exit = await super().on_tick(counter)
        fresh = self.server_state.default_headers
        if fresh is not self.default_headers:
            self.default_headers[:] = [*fresh, *self.drain_headers]
            self.server_state.default_headers = self.default_headers
        return should_exit

    def _tell_clients_to_close(self) -> None:
        """From now on every response says `Connection: close` (uvicorn then closes the
        connection after it, and its client reconnects, to a sibling)."""
        self.drain_headers = [(b"connection", b"close")]
        self.default_headers.extend(self.drain_headers)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Only flags: main_loop() sees should_exit and returns, then shutdown() drains.
        # uvicorn 0.32 and later install this with signal.signal(), so it runs between
        # any two bytecodes of the loop; they would also record the signal and raise it
        # again after serve(), killing the process instead of exit 0, so it is not
        # recorded. A second SIGINT (Ctrl-C by hand) skips the rest of the drain.
        if sig == signal.SIGINT and self.should_exit:
            self.force_exit = self.cut_short = True
        if self.handed_to is not None:
            # Only the main process gets a stop's SIGTERM (KillMode=mixed): this one got
            # it as it handed over, before systemd read MAINPID=. shutdown() passes it on.
            self.stopped_while_handing_over = True
        self.should_exit = True

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().serve(sockets=sockets)
        finally:
            for task in (self.pinger, self.watcher, self.swapper, self.recycler):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.state.balancer is not None:
                self.state.balancer.leave()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self._start(sockets)
        if self.state.balancer is not None and self.should_exit:
            # Told to exit once the Balancer accepted (a SIGTERM, or a new process never
            # made the main one): uvicorn 0.17.6 and 0.32 would skip shutdown() and
            # close what was accepted. main_loop()'s first tick ends it instead, so the
            # drain runs on every version, under uvicorn's signal handlers.
            self.should_exit = False
            self.exit_at_first_tick = True

    async def _start(self, sockets: list[socket.socket] | None) -> None:
        # uvicorn's startup runs the ASGI lifespan startup, then listens on the sockets it
        # is given: none, the Balancer accepts. `started` is set only when both succeeded.
        self.listen_sockets = sockets or []
        try:
            await super().startup(sockets=[])
        except SystemExit:
            # A failed lifespan startup: uvicorn 0.17.6 and 0.32 set should_exit, newer
            # ones sys.exit(3). Either way serve() returns, and our serve() says False.
            self.should_exit = True
            return
        if not self.started or self.should_exit:
            return  # failed, or stopped during startup: no READY=1, nothing to drain
        balancer = Balancer(self.listen_sockets, self._protocol_factory(), self.server_state.connections,
                            backlog=self.config.backlog, http_protocol=self.config.http_protocol_class,
                            **self.balance)
        self.state.balancer = balancer
        await balancer.start()
        if self.successor is None:
            notify(f"READY=1\nSTATUS={self.state.status()}")
        elif not await become_main(self.successor):
            # The old process gave up on this one (or died, or stops): this one may have
            # accepted connections already, so it drains them, as a process that is not
            # the main one (shutdown()), and serves nothing more.
            log.error("the old process did not hand instance %s over: draining", self.instance)
            self.main = False
            self.state.balancer.board = None  # the old process's slot
            self.should_exit = True
            return
        watchdog = watchdog_interval()
        self.pinger = asyncio.ensure_future(ping(self.state, watchdog, self.counters_path))
        self.watcher = asyncio.ensure_future(self._watch_requests())
        self.swap = Swap(self.listen_sockets, self.instance, self.runtime, watchdog)
        self.swapper = asyncio.ensure_future(self._swap_when_asked(self.swap))
        if self.recycle.wanted:
            self.recycle.ready()
            self.recycler = asyncio.ensure_future(self._recycle_when_due())
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._asked_to_swap)
        if EARLY_SIGHUP and self.successor is not None:  # the next reload, asked of this process already
            self._asked_to_swap()
        EARLY_SIGHUP.clear()

    @property
    def handed_to(self) -> int | None:
        """The new process's pid once this one sent MAINPID= for it: it is the instance
        now, this one only drains. Read from the swap, which knows it first (a signal
        handler may run between MAINPID= and the swap's return)."""
        handed = self.swap.handed if self.swap is not None else None
        return handed.pid if handed is not None else None

    def _asked_to_swap(self) -> None:
        # Run by the loop (add_signal_handler), not in the signal's context: only flags.
        self.asked_at = time.monotonic()
        self.recycling_swap = False
        self.swap_asked.set()

    async def _swap_when_asked(self, swap: Swap) -> None:
        while True:
            await self.swap_asked.wait()
            self.swap_asked.clear()
            if self.handed_to is not None:
                # Asked by a waiter that systemd started just before it took MAINPID=:
                # that reload is done already.
                swap.answer_done(self.asked_at, self.handed_to)
                continue
            if self.should_exit:
                swap.refuse(self.asked_at, "this process is stopping")
                continue
            recycling = self.recycling_swap
            self.swapping = True
            try:
                new = await swap.run(lambda: self.asked_at, lambda: self.should_exit,
                                     (self.state.swaps, self.state.recycles, recycling))
            finally:
                self.swapping = False
            self.swap_asked.clear()  # a SIGHUP during the swap: its outcome answered it
            if new is not None:
                self.should_exit = True  # main_loop() returns, shutdown() drains
                continue
            if recycling:
                self.recycle.failed(self.state.served, time.monotonic())

    async def _recycle_when_due(self) -> None:
        # Asks for the same swap as SIGHUP. Not while a sibling drains (a stop, a scale
        # down): that instance is out of service already; the handover lock keeps swaps
        # one at a time. A reload asked meanwhile is the swap this waits for, too.
        while True:
            await asyncio.sleep(RECYCLE_EVERY)
            if self.should_exit:  # stopping, or handed over: the new process recycles itself
                return
            if self.swap_asked.is_set() or self.swapping:
                continue
            why = self.recycle.due(self.state.served, time.monotonic())
            board = self.state.balancer.board if self.state.balancer is not None else None
            if why is None or (board is not None and board.siblings().draining):
                continue
            log.info("recycling instance %s, pid %d: %s", self.instance, os.getpid(), why)
            self.asked_at = time.monotonic()
            self.recycling_swap = True
            self.swap_asked.set()

    def _protocol_factory(self) -> Any:
        """What uvicorn's startup would pass to create_server(): its HTTP protocol, bound
        to this server's state (and, from uvicorn 0.2x on, to the lifespan's state)."""
        protocol = self.config.http_protocol_class
        kwargs: dict[str, Any] = {"config": self.config, "server_state": self.server_state}
        if "app_state" in inspect.signature(protocol).parameters:
            kwargs["app_state"] = self.lifespan.state
        return functools.partial(protocol, **kwargs)

    async def _watch_requests(self) -> None:
        while not self.hung.check():
            await asyncio.sleep(WATCH_EVERY)
        log.error("all %d threads stuck for more than %g s: recycling this instance (their requests are lost)",
                  self.hung.stuck(), self.hung.timeout)
        self.state.recycling = True
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """The drain, then uvicorn's shutdown; see this module's docstring."""
        if self.state.balancer is None:  # stopped during startup (newer uvicorn still calls this)
            await super().shutdown(sockets=sockets)
            return
        state = self.state
        state.begin_drain()  # before STOPPING=1, whose STATUS= says "draining"
        # The others' drains (outlive()) began before this one: by then they had as long.
        others_by = time.monotonic() + self.drain_timeout + FORCE_AFTER
        self._tell_clients_to_close()
        if self.swapper is not None and self.handed_to is None:
            self.swapper.cancel()  # a swap under way: its new process is stopped
            with contextlib.suppress(asyncio.CancelledError):
                await self.swapper
        if self.handed_to is not None or not self.main:
            # Not the main process (any more): systemd would refuse its notifications,
            # and the board slot and counters file are the main process's.
            if self.pinger is not None:
                self.pinger.cancel()
            state.balancer.board = None
        else:
            notify(f"STOPPING=1\nSTATUS={state.status()}")
        log.info("draining: %d requests in flight", state.in_flight)
        await state.balancer.stop()
        close_listeners(self.servers, self.listen_sockets)

        timed_out = False
        try:
            await asyncio.wait_for(self._until_quiet(), timeout=self.drain_timeout)
        except TimeoutError:
            timed_out = True
            closed = close_connections(self.server_state.connections)
            log.warning("drain timeout (%.0f s): closed %d connections, %d requests unfinished",
                        self.drain_timeout, closed, state.in_flight)
        else:
            if self.force_exit:
                log.warning("second SIGINT: drain cut short, %d requests unfinished", state.in_flight)
            else:
                log.info("drained: %d requests served", state.served)

        if state.recycling:
            self.force_exit = True  # uvicorn would wait for the stuck requests' tasks forever
        uvicorn_shutdown = asyncio.ensure_future(super().shutdown(sockets=sockets))
        if timed_out:
            # The app's task for a connection closed above may never end: uvicorn's send()
            # returns quietly on a closed connection, so a stream's loop goes on. uvicorn
            # waits for those tasks with no limit on 0.17.6 (timeout_graceful_shutdown
            # came later), and force_exit is what ends the wait on every version; it also
            # skips the lifespan shutdown if that has not begun.
            await asyncio.wait([uvicorn_shutdown], timeout=FORCE_AFTER)
            self.force_exit = True
        await uvicorn_shutdown
        if self.main and self.handed_to is None:
            await outlive([self.successor and self.successor.predecessor, self.swap and self.swap.abandoned],
                          others_by, lambda: self.cut_short)
        elif self.stopped_while_handing_over and self.swap is not None and self.swap.handed is not None:
            # Whichever process systemd now takes for the main one, the stop reaches the new one.
            self.swap.handed.terminate()
            await outlive([self.swap.handed], others_by, lambda: self.cut_short)

    async def _until_quiet(self) -> None:
        # Polled, as uvicorn's own waits are: requests start and end in other tasks. A
        # recycle waits only for the threads that are not stuck: the requests waiting for
        # a thread could never run, and are lost with the stuck ones. WebSockets opened
        # since the last look are asked to close as well.
        asked: weakref.WeakSet[Any] = weakref.WeakSet()
        while not self.force_exit:
            if closing := close_websockets(self.server_state.connections, asked):
                log.info("draining: asked %d WebSocket clients to reconnect (close code 1012)", closing)
            if self.state.recycling and self.hung.running_unstuck() == 0:
                log.error("recycling: %d requests stuck or waiting for a thread are lost", self.state.in_flight)
                return
            if self.state.quiet():
                return
            await asyncio.sleep(POLL)


def close_listeners(servers: Iterable[Any], sockets: Iterable[socket.socket]) -> None:
    """Closes this process's copies of the listening sockets.

    Never shutdown(), which would stop the socket for systemd and every sibling too, and
    never unlink a unix socket: both belong to systemd's socket unit.
    """
    for server in servers:
        server.close()  # asyncio closes the socket object; uvloop detaches it and closes the fd
    for sock in sockets:
        sock.close()  # already closed or detached by now: a no-op, as in uvicorn's shutdown


def close_connections(connections: Iterable[Any]) -> int:
    """Closes every connection left, mid-response or not; returns how many."""
    left = list(connections)
    for connection in left:
        transport = getattr(connection, "transport", None)
        if transport is not None:
            transport.close()
    return len(left)


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def serve(app: Any, sockets: list[socket.socket], *, lifespan: str, drain_timeout: float, state: RunState,
          hung: HungRequests, board: Board | None, capacity: int, busy: Callable[[], int], rebalance: bool,
          counters_path: Path | None = None, successor: Successor | None = None, instance: str = "0",
          runtime: Path | None = None, recycle: Recycle | None = None) -> int:
    """Run until the drain is over; the exit code: 0, EXIT_STARTUP or EXIT_RECYCLE."""
    if capacity:
        app = TakeRoom(app, state)
    config = uvicorn.Config(
        MeasureRequests(app, state.metrics) if state.metrics is not None else app,
        lifespan=lifespan,
        log_config=None,  # journald already stamps and tags every line
        # Set, or uvicorn.error keeps level NOTSET, and uvicorn 0.17.6 (Debian 12) then
        # wraps the app in its MessageLoggerMiddleware, which formats every ASGI message
        # for a TRACE line: measured, a third of one instance's throughput.
        log_level="info",
        access_log=False,
    )
    server = WorkerServer(config, state, drain_timeout=drain_timeout, hung=hung, counters_path=counters_path,
                          balance={"board": board, "capacity": capacity, "busy": busy, "rebalance": rebalance},
                          successor=successor, instance=instance, runtime=runtime, recycle=recycle)
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(server.serve(sockets=sockets))
    finally:
        loop.close()
    if not server.started:
        log.error("startup failed: the app never became ready")
        return EXIT_STARTUP
    return EXIT_RECYCLE if state.recycling else 0
