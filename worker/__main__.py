"""python -m unitgen_worker: run one instance of an app under systemd."""

from __future__ import annotations

import contextlib
import faulthandler
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from unitgen_worker.contract import (
    EXIT_CONFIG,
    EXIT_RECYCLE,
    EXIT_STARTUP,
    WorkerConfig,
    board_file,
    counters_file,
    runtime_directory_of_this_process,
)
from unitgen_worker.handover import adopt_sockets, note_early_sighup
from unitgen_worker.hung import HungRequests, WatchThreads
from unitgen_worker.loader import ConfigError, as_asgi, detect_interface, import_app
from unitgen_worker.sd import NoSocketError

log = logging.getLogger("unitgen.worker")


def load(app_spec: str, interface: str) -> tuple[object, str]:
    app = import_app(app_spec)
    detected = detect_interface(app)
    return app, (detected if interface == "auto" else interface)


def main(argv: list[str] | None = None) -> int:
    args = WorkerConfig.from_argv(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # The import path is the working directory, as for `python -m` and gunicorn.
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    if args.check:
        try:
            _, interface = load(args.app, args.interface)
        except ConfigError as err:
            print(f"unitgen-worker: {err}", file=sys.stderr)
            return EXIT_CONFIG
        print(interface)
        return 0

    # systemd's watchdog kills with SIGABRT: faulthandler prints every thread's stack
    # to stderr (the journal) first, which shows where the event loop was stuck.
    faulthandler.enable(all_threads=True)
    # SIGHUP asks for a reload (handover.py) once the instance serves. One that comes
    # earlier must not kill a starting instance, and is noted: a process started by a
    # reload can get the next reload's SIGHUP between READY=1 and its loop's handler
    # (systemd runs a queued reload job at once). A handler, not SIG_IGN: that would
    # be inherited by every program the app runs.
    signal.signal(signal.SIGHUP, note_early_sighup)
    try:
        sockets, successor = adopt_sockets()
        app, interface = load(args.app, args.interface)
    except (ConfigError, NoSocketError) as err:
        # One line in the journal, no traceback: RestartPreventExitStatus= stops here.
        print(f"unitgen-worker: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception:
        log.exception("the app raised while it was imported")
        return EXIT_STARTUP
    # After the app: its import errors come first.
    from unitgen_worker.lifecycle import Metrics, RunState
    from unitgen_worker.recycle import Recycle
    from unitgen_worker.server import serve

    log.info("instance %s serving %s (%s)", args.instance, args.app, interface)
    lifespan = "auto" if interface == "asgi" else "off"
    runtime = runtime_directory_of_this_process()
    counters = counters_file(runtime, args.instance) if runtime else None
    state = RunState(metrics=Metrics() if args.metrics else None)
    if successor is not None:  # the instance's swaps go on counting in this process
        state.swaps, state.recycles = successor.swaps + 1, successor.recycles + successor.recycle
    if interface == "wsgi":
        state.threads = WatchThreads(app, args.threads)
        served = as_asgi(state.threads, interface, args.threads)
        busy = threads_taken(state.threads, served)
    else:
        served = as_asgi(app, interface, args.threads)
        # Counted by TakeRoom with --max-concurrency, without it by uvicorn (the board's figure).
        busy = state.room_taken_now if args.max_concurrency else lambda: state.in_flight
    # A full instance stops accepting: at its --max-concurrency, else when a WSGI app's
    # threads are all taken (an ASGI app has no such limit of its own).
    capacity = args.max_concurrency or (args.threads if interface == "wsgi" else 0)
    code = serve(served, sockets, lifespan=lifespan, drain_timeout=args.drain_timeout, state=state,
                 hung=HungRequests(args.request_timeout, state.threads),
                 board=open_board(runtime, args.instance), capacity=capacity, busy=busy, rebalance=args.rebalance,
                 counters_path=counters, successor=successor, instance=args.instance, runtime=runtime,
                 recycle=Recycle(args.max_requests, args.max_requests_jitter, args.memory_max))
    if code == EXIT_RECYCLE:
        # Stuck threads would hold the interpreter's exit (it joins them) until they end.
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def threads_taken(watch: WatchThreads, adapter: object) -> Callable[[], int]:
    """A WSGI instance's busy(): threads running a request, and requests queued for one.
    Requests still reading their body (uvicorn's adapter reads it before taking a thread)
    take nothing, so slow uploads cannot fill an instance."""
    queue = getattr(getattr(adapter, "executor", None), "_work_queue", None)
    if queue is None:
        return watch.busy
    return lambda: watch.busy() + queue.qsize()


def open_board(runtime: Path | None, instance: str):
    """The load board shared with the siblings, or None (run by hand, or no room for it):
    then this instance accepts without looking at them."""
    from unitgen_worker.board import Board

    if runtime is None or not instance.isdigit():
        return None
    try:
        return Board(board_file(runtime), int(instance))
    except (OSError, ValueError) as err:
        log.warning("no load board, so no even spread with siblings: %s", err)
        return None


if __name__ == "__main__":
    sys.exit(main())
