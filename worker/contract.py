"""The contract between unitgen and its worker runtime, in one place.

As gunicorn keeps its whole systemd protocol in ``systemd.py``, this module holds what
both sides must agree on: runtime paths, defaults and exit codes that the rendered
units and the worker share. unitgen (render, install, status, uninstall) imports it;
the worker and its helpers import it. It imports nothing heavy: the root helper
(``unitgen_worker.alert``) loads it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

# --- the worker's command line ------------------------------------------------------
INTERFACES = ("auto", "asgi", "wsgi")
DRAIN_TIMEOUT = 30  # seconds requests get after SIGTERM before connections are closed
# TimeoutStopSec= is the drain timeout plus this: the worker's quiet period and its
# forced exit after the drain timeout (lifecycle) fit in it with room to spare.
STOP_MARGIN = 15
WATCHDOG = 10  # WatchdogSec= by default
QUIET = 0.5  # seconds with no request activity before a drain is over
FORCE_AFTER = 2.0  # seconds after closing connections at the drain timeout before exiting anyway
STATUS_EVERY = 1.0  # seconds between STATUS= and counters file updates
INSTANCE_SPECIFIER = "%i"  # in a unit file: systemd puts the instance number here
THREADS = 10  # a WSGI app's thread pool per instance (both WSGI adapters' own default)
# A request running longer is logged with its stack; a WSGI instance whose threads are
# all stuck past it recycles itself (gunicorn's worker timeout, 30 s). 0: never.
REQUEST_TIMEOUT = 30
# --memory-max: the instance's MemoryMax= (the kernel's hard limit on its cgroup, which
# holds the old and the new process during a swap). The worker swaps itself for a fresh
# process once its resident memory plus a fresh process's (its own at READY) passes
# this share of it: the rest is room for what it grows while the swap runs.
RECYCLE_MEMORY_AT = 0.8
RECYCLE_RETRY = 30.0  # seconds before a recycle that failed (the new process did not start) is tried again


@dataclass(frozen=True)
class WorkerConfig:
    """What `python -m unitgen_worker` is told; rendered into ExecStart= by unitgen."""

    app: str  # MODULE:ATTR
    interface: str = "auto"
    instance: str = "0"  # for the logs; %i in the unit
    drain_timeout: float = DRAIN_TIMEOUT
    check: bool = False  # load the app, print its interface, exit (unitgen render)
    threads: int = THREADS  # WSGI only
    max_concurrency: int = 0  # requests in flight before the instance stops accepting; 0: threads (WSGI), none (ASGI)
    request_timeout: float = REQUEST_TIMEOUT
    rebalance: bool = True  # ask keep-alive clients of an instance over its share to reconnect
    max_requests: int = 0  # recycle (swap in place) after this many requests; 0: never
    max_requests_jitter: int = 0  # plus a random 0..this, drawn by each process
    memory_max: int = 0  # bytes: the unit's MemoryMax=, under which the process recycles itself; 0: none
    metrics: bool = False  # count responses by status class and time them (Counters.responses, .durations)

    def to_argv(self) -> list[str]:
        argv = ["--app", self.app, "--interface", self.interface]
        if self.check:
            return [*argv, "--check"]
        argv += ["--instance", self.instance, "--drain-timeout", _number(self.drain_timeout)]
        # The others only when they differ from the defaults: the unit says what was chosen.
        if self.threads != THREADS:
            argv += ["--threads", str(self.threads)]
        if self.max_concurrency:
            argv += ["--max-concurrency", str(self.max_concurrency)]
        if self.request_timeout != REQUEST_TIMEOUT:
            argv += ["--request-timeout", _number(self.request_timeout)]
        if not self.rebalance:
            argv += ["--no-rebalance"]
        if self.max_requests:
            argv += ["--max-requests", str(self.max_requests)]
            if self.max_requests_jitter:
                argv += ["--max-requests-jitter", str(self.max_requests_jitter)]
        if self.memory_max:
            argv += ["--memory-max", str(self.memory_max)]
        if self.metrics:
            argv += ["--metrics"]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str] | None) -> WorkerConfig:
        parser = argparse.ArgumentParser(prog="python -m unitgen_worker")
        parser.add_argument("--app", required=True, help="MODULE:ATTR")
        parser.add_argument("--interface", choices=INTERFACES, default="auto")
        parser.add_argument("--instance", default="0", help="instance number, for the logs")
        parser.add_argument("--drain-timeout", type=float, default=float(DRAIN_TIMEOUT),
                            help="seconds to let requests finish after SIGTERM before closing connections")
        parser.add_argument("--check", action="store_true", help="load the app, print its interface, exit")
        parser.add_argument("--threads", type=int, default=THREADS, help="a WSGI app's threads")
        parser.add_argument("--max-concurrency", type=int, default=0,
                            help="requests in flight before the instance stops accepting connections")
        parser.add_argument("--request-timeout", type=float, default=float(REQUEST_TIMEOUT),
                            help="seconds before a request is reported stuck (0: never)")
        parser.add_argument("--no-rebalance", dest="rebalance", action="store_false",
                            help="never ask keep-alive clients to move to a less loaded sibling")
        parser.add_argument("--max-requests", type=_count, default=0,
                            help="swap this process for a fresh one after this many requests (0: never)")
        parser.add_argument("--max-requests-jitter", type=_count, default=0,
                            help="plus a random number of requests up to this, drawn by each process")
        parser.add_argument("--memory-max", type=_count, default=0,
                            help="the unit's MemoryMax= in bytes: swap this process for a fresh one well before it")
        parser.add_argument("--metrics", action="store_true",
                            help="count responses by status class and time them, for unitgen's metrics")
        args = parser.parse_args(argv)
        return cls(app=args.app, interface=args.interface, instance=args.instance,
                   drain_timeout=args.drain_timeout, check=args.check, threads=args.threads,
                   max_concurrency=args.max_concurrency, request_timeout=args.request_timeout,
                   rebalance=args.rebalance, max_requests=args.max_requests,
                   max_requests_jitter=args.max_requests_jitter, memory_max=args.memory_max,
                   metrics=args.metrics)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def worker_argv(python: str, config: WorkerConfig) -> list[str]:
    """The whole command line of an instance (or of the render-time check)."""
    return [python, "-m", "unitgen_worker", *config.to_argv()]


# --- runtime paths ---------------------------------------------------------------
# Every app's instances share RuntimeDirectory=unitgen/NAME (preserved across stops):
# the restart backoff keeps one small JSON file per instance there. systemd creates
# it for the instances' user (with DynamicUser= under /run/private, linked from here).
RUNTIME_ROOT = Path("/run/unitgen")
# The crash-loop alert helper runs as root and keeps its own counts where the app's
# user cannot write ('.' cannot begin an app name, so no app's directory is named so).
ALERT_STATE_DIR = RUNTIME_ROOT / ".alerts"
# What install decided, saved beside the units it wrote (systemd ignores the suffix).
SPEC_SUFFIX = ".unitgen.json"


def runtime_directory(name: str) -> str:
    """The RuntimeDirectory= value of app name (relative to /run)."""
    return f"unitgen/{name}"


def state_directory(name: str) -> str:
    """The StateDirectory= value of app name (relative to /var/lib): the app's own data."""
    return f"unitgen/{name}"


def backoff_file(directory: Path, unit: str) -> Path:
    """The backoff state of instance unit (NAME@I.service) inside its runtime directory."""
    return directory / f"{instance_of(unit)}.backoff.json"


def counters_file(directory: Path, instance: int | str) -> Path:
    """Where a running instance publishes its Counters, at least once a second."""
    return directory / f"{instance}.counters.json"


def board_file(directory: Path) -> Path:
    """The instances' shared load board (unitgen_worker.board); only the instances use it."""
    return directory / "board"


BOARD_SLOTS = 1024  # one per possible instance number (unitgen renders at most 1024)


def read_app_file(path: Path, limit: int = 4096) -> str | None:
    """The start of a file in an app's runtime directory, which the app's user writes and
    root reads (`unitgen status`): never through a link, never blocking on a FIFO, only a
    regular file, at most limit bytes. None when it is not such a file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        with os.fdopen(fd, errors="replace") as f:
            return f.read(limit) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else None
    except OSError:
        return None


def handover_file(directory: Path, instance: int | str) -> Path:
    """The outcome of an instance's last reload (HandoverResult), for its ExecReload=
    waiter and `unitgen status`."""
    return directory / f"{instance}.handover.json"


def handover_lock(directory: Path) -> Path:
    """Held by an instance from the start of its swap to the end of its old process's
    drain: one app never has two instances swapping or draining at once."""
    return directory / "handover.lock"


def runtime_directory_of_this_process() -> Path | None:
    """$RUNTIME_DIRECTORY as systemd set it for this instance, or None (run by hand)."""
    value = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(value) if value else None


# --- what a running instance tells tools (status, metrics, balance) -------------------
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
# Upper bounds (seconds) of the request-duration histogram: prometheus_client's defaults,
# so dashboards made for other Python servers read ours. Counters.durations has one more
# count: the requests slower than the last bound.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class Counters:
    """An instance's live counters: a structured channel, not a sentence to parse.

    The worker rewrites its file (rename, so a reader never sees half of one) from its
    event loop; readers check pid against systemd's MainPID, as a file left behind by
    a killed process says nothing about its successor. Everything counts from the
    process's start, except swaps and recycles, which a new process takes over from the
    one it replaced (so they count from systemd's last start of the instance).
    """

    pid: int
    requests: int  # served since the process started (HTTP requests and WebSocket sessions)
    in_flight: int
    draining: bool = False
    connections: int = 0  # open, idle keep-alive ones included
    busy: int = 0  # a WSGI app's threads running a request (0 for ASGI)
    threads: int = 0  # a WSGI app's thread pool (0 for ASGI)
    swaps: int = 0  # in-place swaps (reloads and recycles) since systemd started the instance
    recycles: int = 0  # of those, the ones the instance asked for itself (--max-requests, --memory-max)
    # With --metrics only (empty otherwise): HTTP requests ended, by STATUS_CLASSES, and
    # those that ended with no response started (the app raised, or the client left);
    # their durations, as counts per DURATION_BUCKETS (not cumulative) and a sum in seconds.
    responses: tuple[int, ...] = ()
    unanswered: int = 0
    durations: tuple[int, ...] = ()
    duration_sum: float = 0.0

    def to_json(self) -> str:
        data = {"schema": 1, "pid": self.pid, "requests": self.requests, "in_flight": self.in_flight,
                "draining": self.draining, "connections": self.connections, "busy": self.busy,
                "threads": self.threads, "swaps": self.swaps, "recycles": self.recycles}
        if self.responses:
            data.update(responses=list(self.responses), unanswered=self.unanswered,
                        durations=list(self.durations), duration_sum=self.duration_sum)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Counters | None:
        """The counters in text, or None when it is not a valid counters document (the
        file is written by the app's user: readers trust nothing in it)."""
        try:
            data = json.loads(text)
            counters = cls(pid=data["pid"], requests=data["requests"], in_flight=data["in_flight"],
                           draining=data["draining"], connections=data.get("connections", 0),
                           busy=data.get("busy", 0), threads=data.get("threads", 0),
                           swaps=data.get("swaps", 0), recycles=data.get("recycles", 0),
                           responses=tuple(data.get("responses", ())), unanswered=data.get("unanswered", 0),
                           durations=tuple(data.get("durations", ())), duration_sum=data.get("duration_sum", 0.0))
        except (ValueError, KeyError, TypeError, RecursionError, AttributeError):
            return None
        ints = (counters.pid, counters.requests, counters.in_flight, counters.connections, counters.busy,
                counters.threads, counters.swaps, counters.recycles, counters.unanswered,
                *counters.responses, *counters.durations)
        if not all(type(v) is int and v >= 0 for v in ints) or type(counters.draining) is not bool:
            return None
        if counters.responses and (len(counters.responses) != len(STATUS_CLASSES)
                                   or len(counters.durations) != len(DURATION_BUCKETS) + 1
                                   or type(counters.duration_sum) not in (int, float)
                                   or not 0 <= counters.duration_sum < float("inf")):
            return None
        if not counters.responses and counters.durations:
            return None
        return counters

    def publish(self, path: Path) -> None:
        """Write to path by rename: a reader sees the old counters or the new ones."""
        scratch = path.with_name(f".{path.name}.{self.pid}.tmp")
        scratch.write_text(self.to_json())
        os.replace(scratch, path)

    def status_text(self, started: str) -> str:
        """The STATUS= sentence for people (`systemctl status`); tools read the file."""
        phase = "draining" if self.draining else "serving"
        threads = f", {self.busy}/{self.threads} threads busy" if self.threads else ""
        return (f"{phase}: {self.requests} requests, {self.in_flight} in flight, "
                f"{self.connections} connections{threads}, up since {started}")


# --- reload in place (unitgen_worker.handover) --------------------------------------
# The old process starts the new one with this variable: the listening fds it passes
# (at the same numbers), its end of a socket pair for "ready"/"main", and the watchdog
# timeout. LISTEN_PID cannot name a process that does not exist yet, hence a variable
# of our own.
HANDOVER_VARIABLE = "UNITGEN_HANDOVER"
HANDOVER_TIMEOUT = 90.0  # seconds the new process has to become ready (import, lifespan)
HOLD = 3.0  # seconds `unitgen roll` watches each swapped instance before the next


@dataclass(frozen=True)
class HandoverResult:
    """How an instance's last reload went, written by its old process."""

    old: int  # the pid that was asked to reload
    new: int  # the pid that serves now (old, when the swap failed)
    ok: bool
    asked: float  # CLOCK_MONOTONIC of the last SIGHUP this swap answers
    error: str = ""

    def to_json(self) -> str:
        return json.dumps({"old": self.old, "new": self.new, "ok": self.ok, "asked": self.asked,
                           "error": self.error})

    @classmethod
    def from_json(cls, text: str | None) -> HandoverResult | None:
        try:
            data = json.loads(text or "")
            result = cls(old=data["old"], new=data["new"], ok=data["ok"], asked=data["asked"],
                         error=str(data["error"])[:300])
        except (ValueError, KeyError, TypeError, RecursionError):
            return None
        if type(result.old) is not int or type(result.new) is not int or type(result.ok) is not bool \
                or type(result.asked) not in (int, float):
            return None
        return result


# --- names -----------------------------------------------------------------------
_INSTANCE_UNIT = re.compile(r"([A-Za-z0-9_][A-Za-z0-9_.-]*)@(\d+)\.service")


def instance_unit(name: str, instance: int | str) -> str:
    """The one place that spells an instance's unit name (instance may be a specifier)."""
    return f"{name}@{instance}.service"


def app_units(name: str) -> tuple[str, str, str]:
    """An app's unit files: NAME.socket, NAME@.service (the template), NAME.target."""
    return f"{name}.socket", instance_unit(name, ""), f"{name}.target"


def instances_pattern(name: str) -> str:
    """Every instance of an app, as systemctl and journalctl take a glob."""
    return instance_unit(name, "*")


def instance_of(unit: str) -> int:
    """The instance number of NAME@I.service; ValueError for anything else."""
    match = _INSTANCE_UNIT.fullmatch(unit)
    if not match:
        raise ValueError(f"{unit!r} is not an instance unit NAME@N.service")
    return int(match.group(2))


def app_of(unit: str) -> str:
    match = _INSTANCE_UNIT.fullmatch(unit)
    if not match:
        raise ValueError(f"{unit!r} is not an instance unit NAME@N.service")
    return match.group(1)


# --- restart policy (rendered into the units and applied by the helpers) ----------
FIRST_DELAY = 0.5  # seconds before the restart after a first failure, doubling...
MAX_DELAY = 32.0  # ...up to this
HEALTHY_RUN = 30.0  # a run at least this long starts the failure count again
RESTART_SEC = 0.1  # RestartSec=: part of the delay already
ALERT_AFTER = 3  # failures in a row that start the --on-failure unit

# --- exit codes (RestartPreventExitStatus= lists EXIT_CONFIG) ----------------------
# EX_CONFIG from sysexits.h: the app cannot be imported or is misconfigured. Restarting
# cannot help.
EXIT_CONFIG = 78
# The app imported but its startup failed (an exception at import time other than an
# ImportError, or ASGI lifespan startup failed). Possibly transient: restarted.
EXIT_STARTUP = 3
# EX_TEMPFAIL: every thread of a WSGI instance was stuck past --request-timeout, so it
# exited to be restarted at once (Restart=always); the backoff does not count it.
EXIT_RECYCLE = 75
