"""unitgen's Prometheus exporter: `python3 -I -m unitgen.metrics NAME` in NAME-metrics.service.

Each scrape asks systemd for every instance of the app (restarts, memory, CPU, state,
main pid) and reads each instance's counters file (requests by status class, in flight,
durations, connections, draining, swaps). It runs as the app's user, on the socket
systemd passed it, with unitgen's own interpreter.

The counters files are written by the app's user: each is read as data only (never
through a link, at most 4 KiB, validated by Counters.from_json), and one whose pid is not
the instance's MainPID (left by a process that is gone) is ignored. The counters count
from the process's start, so an instance's request counters start again after a restart
or a swap, as Prometheus counters may (rate() takes it as a reset).
"""

from __future__ import annotations

import contextlib
import ctypes
import http.server
import os
import socket
import socketserver
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from unitgen.errors import Die
from unitgen.spec import parse_name
from unitgen.state import App, instance_number, show
from unitgen_worker.contract import (
    DURATION_BUCKETS,
    RUNTIME_ROOT,
    STATUS_CLASSES,
    Counters,
    counters_file,
    read_app_file,
)

PROPS = ["ActiveState", "SubState", "MainPID", "MemoryCurrent", "CPUUsageNSec", "NRestarts"]
# Far above any real count, far below what a float cannot hold: a file with a bigger
# number is not an instance's (10**400 would make float() raise).
MAX_VALUE = 2**63 - 1
READ_TIMEOUT = 10.0  # seconds a client has to send its request
# A connection's whole life, however slowly its client sends (READ_TIMEOUT is per read:
# a byte every 9 s would hold a thread for ever), and how many are served at once; the
# others are closed at once, so a flood of slow clients never reaches TasksMax= and
# the scrapes of Prometheus go on (they come one at a time).
CONNECTION_DEADLINE = 15.0
MAX_CLIENTS = 8
LABELS = ["app", "instance"]


def read_counters(directory: Path, instance: int, pid: int) -> Counters | None:
    """The counters instance's process pid published, or None: no file, a link, not a
    regular file, not a valid document, another pid, or a number no counter reaches."""
    text = read_app_file(counters_file(directory, instance))
    counters = Counters.from_json(text) if text is not None else None
    if counters is None or pid <= 0 or counters.pid != pid:
        return None
    numbers = (counters.requests, counters.in_flight, counters.connections, counters.busy, counters.threads,
               counters.swaps, counters.recycles, counters.unanswered, *counters.responses, *counters.durations)
    if any(value > MAX_VALUE for value in numbers) or counters.duration_sum > MAX_VALUE:
        return None
    return counters


def _number(value: str | None) -> int | None:
    """A systemd property as a number; None where it has none ("[not set]", 2**64-1)."""
    if not value or not value.isdigit() or int(value) >= 2**64 - 1:
        return None
    return int(value)


# The classic text format, as Debian 12's prometheus_client (0.16) says: newer clients
# name it version=1.0.0 (CONTENT_TYPE_LATEST), which Prometheus 2 does not know; the text
# generate_latest() writes for our names is the same in both.
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"

class AppCollector:
    """A prometheus_client collector of one app's instances, as of each scrape."""

    def __init__(self, name: str, runtime_root: Path = RUNTIME_ROOT) -> None:
        self.name = name
        self.directory = runtime_root / name

    def units(self) -> list[tuple[str, dict[str, str]]]:
        """Every instance the target wants or systemd has loaded, with its PROPS."""
        app = App(self.name)
        units = sorted(set(app.wanted()) | set(app.loaded()), key=instance_number)
        return list(zip(units, show(units, PROPS) if units else [], strict=True))

    def collect(self) -> Iterator:
        return iter(self.families(self.units()))

    def families(self, units: list[tuple[str, dict[str, str]]]) -> list:
        f = _Families()
        for unit, props in units:
            labels = [self.name, str(instance_number(unit))]
            pid = _number(props.get("MainPID")) or 0
            f.state.add_metric([*labels, props.get("ActiveState", "unknown"), props.get("SubState", "unknown")], 1)
            f.pid.add_metric(labels, pid)
            f.restarts.add_metric(labels, _number(props.get("NRestarts")) or 0)
            if (memory := _number(props.get("MemoryCurrent"))) is not None:
                f.memory.add_metric(labels, memory)
            if (cpu := _number(props.get("CPUUsageNSec"))) is not None:
                f.cpu.add_metric(labels, cpu / 1e9)
            counters = read_counters(self.directory, instance_number(unit), pid) if pid else None
            if counters is not None:
                f.add_counters(labels, counters)
        return f.all()


class _Families:
    """The metric families of one scrape, one sample per instance in each."""

    def __init__(self) -> None:
        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"unitgen_{name}", doc, labels=[*LABELS, *extra])

        def counter(name: str, doc: str, extra: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(f"unitgen_{name}", doc, labels=[*LABELS, *extra])

        self.state = gauge("state", "1 for the instance's ActiveState and SubState in systemd",
                           ("state", "sub_state"))
        self.pid = gauge("main_pid", "The instance's MainPID (0: none)")
        self.restarts = counter("restarts", "Restarts of the instance by systemd (NRestarts)")
        self.memory = gauge("memory_bytes", "Memory of the instance's cgroup (MemoryCurrent)")
        self.cpu = counter("cpu_seconds", "CPU time of the instance's cgroup (CPUUsageNSec)")
        self.requests = counter("requests", "HTTP requests answered by the instance's process, by status class",
                                ("status",))
        self.unanswered = counter("requests_unanswered",
                                  "HTTP requests that ended with no response started (app error, client gone)")
        self.durations = HistogramMetricFamily("unitgen_request_duration_seconds",
                                               "Time from a request's arrival to its end", labels=LABELS)
        self.in_flight = gauge("requests_in_flight", "Requests the instance's process is serving now")
        self.connections = gauge("connections", "Open client connections, idle keep-alive ones included")
        self.draining = gauge("draining", "1 while the instance's process drains (stop, swap)")
        self.swaps = counter("swaps", "In-place swaps of the instance's process since systemd started it")
        self.recycles = counter("recycles", "Of those, swaps the instance asked for (--max-requests, --memory-max)")
        self.busy = gauge("threads_busy", "A WSGI app's threads running a request")
        self.threads = gauge("threads", "A WSGI app's thread pool")

    def add_counters(self, labels: list[str], c: Counters) -> None:
        self.in_flight.add_metric(labels, c.in_flight)
        self.connections.add_metric(labels, c.connections)
        self.draining.add_metric(labels, int(c.draining))
        self.swaps.add_metric(labels, c.swaps)
        self.recycles.add_metric(labels, c.recycles)
        if c.threads:
            self.busy.add_metric(labels, c.busy)
            self.threads.add_metric(labels, c.threads)
        if c.responses:  # the worker runs with --metrics
            for status, count in zip(STATUS_CLASSES, c.responses, strict=True):
                self.requests.add_metric([*labels, status], count)
            self.unanswered.add_metric(labels, c.unanswered)
            cumulative, buckets = 0, []
            for bound, count in zip([*map(str, DURATION_BUCKETS), "+Inf"], c.durations, strict=True):
                cumulative += count
                buckets.append((bound, cumulative))
            self.durations.add_metric(labels, buckets, c.duration_sum)

    def all(self) -> list:
        return [self.state, self.pid, self.restarts, self.memory, self.cpu, self.requests, self.unanswered,
                self.durations, self.in_flight, self.connections, self.draining, self.swaps, self.recycles,
                self.busy, self.threads]


def registry_of(name: str, runtime_root: Path = RUNTIME_ROOT) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppCollector(name, runtime_root))
    return registry


class _Handler(http.server.BaseHTTPRequestHandler):
    registry: CollectorRegistry
    timeout = READ_TIMEOUT  # a client that sends nothing holds its thread this long at most

    def setup(self) -> None:
        super().setup()
        # Cut the connection at its deadline, whatever it is doing (shutdown, not close:
        # the handler's thread still owns the file descriptor).
        self.deadline = threading.Timer(CONNECTION_DEADLINE, self._cut)
        self.deadline.daemon = True
        self.deadline.start()

    def _cut(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.deadline.cancel()
        super().finish()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "the metrics are at /metrics")
            return
        try:
            body = generate_latest(self.registry)
        except Die as err:  # systemd did not answer, or the app is no longer installed
            print(f"scrape failed: {err.line()}", file=sys.stderr, flush=True)
            self.send_error(503, "cannot read the app's state")
            return
        except Exception as err:  # noqa: BLE001 - one scrape fails, the exporter serves on
            print(f"scrape failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
            self.send_error(500, "internal error")
            return
        self.send_response(200)
        self.send_header("Content-Type", TEXT_FORMAT)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's name
        pass  # no journal line per scrape; errors are printed where they happen


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[_Handler]) -> None:
        # Not TCPServer.__init__: it makes a socket of its own, which the sandbox refuses
        # (RestrictAddressFamilies=AF_UNIX) and which is not needed: systemd's is bound
        # and listening already.
        socketserver.BaseServer.__init__(self, sock.getsockname(), handler)
        self.socket = sock
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)

    def process_request(self, request, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this client is closed at once
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def listening_socket() -> socket.socket:
    """The one socket NAME-metrics.socket passes (fd 3), checked as systemd's sd_listen_fds()."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        raise Die("no listening socket from systemd (LISTEN_FDS=1 for this pid)",
                  hint="the exporter runs in NAME-metrics.service, started by NAME-metrics.socket")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    sock = socket.socket(fileno=3)
    sock.setblocking(True)
    return sock


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise Die("usage: python3 -I -m unitgen.metrics NAME", hint="NAME-metrics.service runs it")
        name = parse_name(argv[0])
        # The app's processes share this user: none may ptrace this one or open its memory.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE, 0
        sock = listening_socket()
    except Die as err:
        print(f"unitgen.metrics: error: {err.line()}", file=sys.stderr)
        return err.code
    _Handler.registry = registry_of(name)
    with _Server(sock, _Handler) as server:
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
