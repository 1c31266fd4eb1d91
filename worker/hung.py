"""Requests that run too long (--request-timeout): logged with their stacks, and a WSGI
instance whose threads are all stuck recycles itself.

The watchdog catches a blocked event loop, but a WSGI app's handlers run in a thread
pool: every thread can hang (a lock, a dead database, a call without a timeout) while
the loop stays free and keeps pinging. Such an instance accepts nothing (it has no room,
see balance.py) and would never serve again. So, as gunicorn's worker timeout does, an
instance whose threads have all been running the app's code for longer than the timeout
exits with EXIT_RECYCLE after draining the rest: those stuck requests are lost, systemd
starts it again at once, and the service recovers by itself. Every stuck request is
first logged once with its thread's stack, which says where it hangs.

ASGI handlers share the loop: a request that awaits forever is logged with its task's
stack; recycling is for the watchdog (a blocked loop) or for the operator.

Time a thread spends waiting for its client (reading the request body, handing a chunk
of the response over) is not the app's: a slow upload or download never makes a request
stuck, or any client could make an instance recycle.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("unitgen.worker")


class Running:
    """One request being handled: since when, what, and where to find its stack.
    Made for every request: a plain class with slots, not a dataclass, as it costs
    less than half (measured: 0.3 against 0.7 µs)."""

    __slots__ = ("method", "path", "started", "task", "reported", "since", "in_io")

    def __init__(self, method: object, path: object, task: asyncio.Task[Any] | None = None) -> None:
        self.method = method
        self.path = path
        self.started = self.since = time.monotonic()  # since: when the app's code last resumed
        self.task = task  # ASGI: the task running it
        self.reported = False
        self.in_io = False  # WSGI: waiting for the client now

    def stuck_since(self, deadline: float) -> bool:
        return not self.in_io and self.since < deadline

    @property
    def what(self) -> str:
        # ascii(): the path is the client's text; it must not write lines into the journal.
        return f"{ascii(self.method)} {ascii(self.path)}"


class WatchThreads:
    """WSGI middleware: which thread runs which request, from the call until the
    response's iterable is exhausted or closed (the thread is busy all along)."""

    def __init__(self, app: Any, threads: int) -> None:
        self.app = app
        self.threads = threads
        self.running: dict[int, Running] = {}  # by thread ident

    def __call__(self, environ: dict, start_response: Any) -> Iterable[bytes]:
        ident = threading.get_ident()
        running = self.running[ident] = Running(environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
        if "wsgi.input" in environ:
            environ["wsgi.input"] = _TimedInput(environ["wsgi.input"], running)
        try:
            result = self.app(environ, start_response)
        except BaseException:
            self.running.pop(ident, None)
            raise
        return self._iterate(result, ident, running)

    def _iterate(self, result: Iterable[bytes], ident: int, running: Running) -> Iterator[bytes]:
        try:
            for chunk in result:
                running.in_io = True  # the adapter sends it to the client before asking for more
                yield chunk
                running.in_io, running.since = False, time.monotonic()
        finally:
            try:
                close = getattr(result, "close", None)
                if close is not None:
                    close()  # WSGI requires it; uvicorn 0.17.6's adapter never calls it
            finally:
                self.running.pop(ident, None)

    def busy(self) -> int:
        return len(self.running)


class HungRequests:
    """Looks at the running requests; check() says whether the instance must recycle.

    A WSGI app's requests are recorded by the threads that run them (WatchThreads). An
    ASGI app's are uvicorn's own tasks (server_state.tasks, set as asgi_tasks once the
    server exists), looked at every WATCH_EVERY: a task is timed from the first look
    that sees it, so a request is reported at most one look late, and nothing is
    recorded per request (that cost every request a few %; bench/overhead.md).
    """

    def __init__(self, timeout: float, threads: WatchThreads | None) -> None:
        self.timeout = timeout
        self.threads = threads
        self.asgi_tasks: Iterable[asyncio.Task[Any]] = ()
        self._seen: dict[asyncio.Task[Any], float] = {}  # ASGI task -> first seen (CLOCK_MONOTONIC)
        self._reported: set[asyncio.Task[Any]] = set()

    def _look_at_tasks(self, now: float) -> None:
        running = set(self.asgi_tasks)
        seen = self._seen
        for task in [task for task in seen if task not in running]:
            del seen[task]
        for task in running:
            seen.setdefault(task, now)
        self._reported.intersection_update(running)

    def stuck(self) -> int:
        """Requests (WSGI: threads) running for longer than the timeout."""
        if not self.timeout:
            return 0
        deadline = time.monotonic() - self.timeout
        if self.threads is None:
            return sum(1 for started in self._seen.values() if started < deadline)
        return sum(1 for request in list(self.threads.running.values()) if request.stuck_since(deadline))

    def running_unstuck(self) -> int:
        """WSGI threads running a request that is not (yet) stuck."""
        return self.threads.busy() - self.stuck() if self.threads is not None else 0

    def check(self) -> bool:
        if not self.timeout:
            return False
        now = time.monotonic()
        if self.threads is None:
            self._look_at_tasks(now)
            for task, started in self._seen.items():
                if task not in self._reported and now - started > self.timeout:
                    self._reported.add(task)
                    scope = _task_scope(task)
                    what = f"{ascii(scope.get('method', 'WEBSOCKET'))} {ascii(scope.get('path'))}"
                    log.error("request %s has run for %.0f s (--request-timeout %g); its task:\n%s",
                              what, now - started, self.timeout, _task_stack(task))
            return False
        frames = sys._current_frames()
        for ident, request in list(self.threads.running.items()):
            if not request.reported and request.stuck_since(now - self.timeout):
                request.reported = True
                stack = "".join(traceback.format_stack(frames[ident])) if ident in frames else "(gone)\n"
                log.error("request %s has run for %.0f s in thread %d (--request-timeout %g):\n%s",
                          request.what, now - request.since, ident, self.timeout, stack.rstrip())
        return self.stuck() >= self.threads.threads


class _TimedInput:
    """wsgi.input, with the time spent reading it marked as the client's."""

    def __init__(self, stream: Any, running: Running) -> None:
        self._stream = stream
        self._running = running

    def _timed(self, method: str, *args: Any) -> Any:
        self._running.in_io = True
        try:
            return getattr(self._stream, method)(*args)
        finally:
            self._running.in_io, self._running.since = False, time.monotonic()

    def read(self, *args: Any) -> bytes:
        return self._timed("read", *args)

    def readline(self, *args: Any) -> bytes:
        return self._timed("readline", *args)

    def readlines(self, *args: Any) -> list[bytes]:
        return self._timed("readlines", *args)

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


def _task_scope(task: asyncio.Task[Any]) -> dict:
    """The ASGI scope of the request a uvicorn task runs: the task runs the coroutine
    run_asgi() of the request's cycle (HTTP) or protocol (WebSocket), which holds it as
    self.scope, from 0.17.6 on. {} when it cannot be found."""
    frame = getattr(task.get_coro(), "cr_frame", None)
    scope = getattr(frame.f_locals.get("self"), "scope", None) if frame is not None else None
    return scope if isinstance(scope, dict) else {}


def _task_stack(task: asyncio.Task[Any]) -> str:
    """Where the task waits: its coroutine and every coroutine it awaits, down to the
    innermost (Task.print_stack() shows only the outermost, uvicorn's run_asgi())."""
    frames = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(frames) < 100:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is not None:
            frames.append((frame, frame.f_lineno))
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    if not frames:
        return "(no stack: the task is not waiting in a coroutine)"
    return "".join(traceback.format_list(traceback.StackSummary.extract(frames))).rstrip()
