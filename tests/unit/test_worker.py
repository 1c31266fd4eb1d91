"""The worker runtime with real sockets: systemd-socket-activate passes the listening
fd (LISTEN_FDS/LISTEN_PID) and a real datagram socket receives sd_notify messages."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

APPS = Path(__file__).resolve().parents[1] / "e2e" / "apps"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Under CI a missing tool is a failure (the fixture below), never a silent skip.
pytestmark = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None and os.environ.get("CI") != "true",
                                reason="needs systemd-socket-activate (package systemd)")


class Worker:
    def __init__(self, proc: subprocess.Popen[str], notify: socket.socket, address: str | tuple[str, int]) -> None:
        self.proc, self.notify, self.address = proc, notify, address

    def messages(self, timeout: float) -> list[str]:
        self.notify.settimeout(timeout)
        return self.notify.recv(4096).decode().split("\n")

    def get(self, path: str = "/") -> bytes:
        family = socket.AF_UNIX if isinstance(self.address, str) else (
            socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET)
        with socket.socket(family) as client:
            client.settimeout(15)
            client.connect(self.address)
            client.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


@pytest.fixture
def activate(tmp_path):
    started: list[subprocess.Popen[str]] = []

    def _activate(app: str, listen: str, cwd: Path = APPS) -> Worker:
        if shutil.which("systemd-socket-activate") is None:
            pytest.fail("systemd-socket-activate is missing: apt-get install systemd", pytrace=False)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(tmp_path / "notify"))
        cmd = ["systemd-socket-activate", "-l", listen, "-E", f"NOTIFY_SOCKET={tmp_path}/notify",
               sys.executable, "-m", "unitgen_worker", "--app", app]
        proc = subprocess.Popen(cmd, cwd=cwd, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        # systemd-socket-activate prints "Listening on ..." once the socket is bound.
        assert "Listening on" in proc.stderr.readline()
        if listen.startswith("/"):
            return Worker(proc, notify, listen)
        host, _, port = listen.rpartition(":")
        return Worker(proc, notify, (host.strip("[]"), int(port)))

    yield _activate
    for proc in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack to stderr
            proc.wait(10)
            pytest.fail(f"the worker did not exit on SIGTERM:\n{proc.stderr.read()}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ready_only_after_lifespan_startup_and_queued_request_served(activate):
    worker = activate("slowstart:app", f"127.0.0.1:{free_port()}")
    began = time.monotonic()
    # The first connection makes systemd-socket-activate start the worker; it waits
    # in the socket's queue while the app starts, and is served once it is ready.
    response = worker.get()
    assert worker.messages(timeout=10)[0] == "READY=1"
    assert time.monotonic() - began >= 2.0
    assert response.startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize("listen", ["unix", "[::1]", "127.0.0.1"])
def test_serves_any_socket_family_and_unsets_listen_variables(activate, tmp_path, listen):
    address = str(tmp_path / "app.sock") if listen == "unix" else f"{listen}:{free_port()}"
    worker = activate("envapp:app", address, cwd=Path(__file__).parent / "apps")
    response = worker.get()
    assert response.startswith(b"HTTP/1.1 200 ")
    # The app sees no LISTEN_* variables: a child it starts must not adopt the socket.
    assert b"LISTEN_FDS=None LISTEN_PID=None" in response
    assert worker.messages(timeout=10)[0] == "READY=1"


def run_worker(*args: str, env: dict[str, str] | None = None, cwd: Path = APPS) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "unitgen_worker", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=30)


def test_listen_fds_for_another_process_are_not_adopted():
    result = run_worker("--app", "worker:app", env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    assert result.returncode == 78
    assert result.stderr.splitlines()[-1].startswith("unitgen-worker: no listening socket was passed in")


def test_import_error_is_exit_78_and_one_line(activate):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        os.set_inheritable(listener.fileno(), True)
        result = subprocess.run(
            [sys.executable, "-c",
             f"import os, sys; os.dup2({listener.fileno()}, 3); os.environ['LISTEN_FDS'] = '1'; "
             "os.environ['LISTEN_PID'] = str(os.getpid()); sys.argv = ['w', '--app', 'nosuch:app']; "
             "import runpy; runpy.run_module('unitgen_worker', run_name='__main__')"],
            cwd=APPS, capture_output=True, text=True, pass_fds=(listener.fileno(),), timeout=30)
    assert result.returncode == 78
    assert result.stderr.splitlines() == ["unitgen-worker: cannot import 'nosuch': No module named 'nosuch'"]


def test_check_reports_the_interface():
    assert run_worker("--check", "--app", "flaskapp:app").stdout == "wsgi\n"
    assert run_worker("--check", "--app", "starletteapp:app").stdout == "asgi\n"
    assert run_worker("--check", "--app", "hello:app", cwd=EXAMPLES).stdout == "asgi\n"
    assert run_worker("--check", "--app", "worker:app").stdout == "wsgi\n"


def test_drains_and_exits_even_when_the_notify_socket_is_gone(activate):
    # python-systemd raises when a datagram is refused (PID 1 re-executing, say): a
    # STATUS= that fails must not kill the loop that acts on SIGTERM.
    worker = activate("starletteapp:app", f"127.0.0.1:{free_port()}")
    assert worker.get().startswith(b"HTTP/1.1 200 ")
    assert worker.messages(timeout=10)[0] == "READY=1"
    worker.notify.close()
    time.sleep(1.5)  # at least one STATUS= refused
    worker.proc.terminate()
    assert worker.proc.wait(10) == 0
    assert "sd_notify(STATUS) failed" in worker.proc.stderr.read()


def test_interface_detection():
    import functools

    from unitgen_worker.loader import detect_interface

    async def asgi(scope, receive, send):
        pass

    def wsgi(environ, start_response):
        pass

    class AsgiApp:
        async def __call__(self, scope, receive, send):
            pass

    class WsgiApp:
        def __call__(self, environ, start_response):
            pass

    assert [detect_interface(a) for a in (asgi, functools.partial(asgi), AsgiApp(), AsgiApp)] == ["asgi"] * 4
    assert [detect_interface(a) for a in (wsgi, functools.partial(wsgi), WsgiApp())] == ["wsgi"] * 3


def test_recycle_is_due_at_the_request_limit_plus_jitter_or_over_the_memory_limit():
    import random

    from unitgen_worker.recycle import Recycle, resident_bytes

    limits = {Recycle(5000, 500, rng=random.Random(seed)).request_limit for seed in range(200)}
    assert min(limits) >= 5000 and max(limits) <= 5500 and len(limits) > 100
    recycle = Recycle(100, 0)
    assert recycle.due(99, 0.0) is None and recycle.due(100, 0.0) == "served 100 requests (limit 100)"
    recycle.failed(100, 0.0)  # the swap failed: the next try after as many requests again
    assert recycle.due(199, 0.0) is None and recycle.due(200, 0.0) is not None
    # MemoryMax=1000M: a process whose fresh self took 200M recycles past 600M (800M, 80%, for both).
    memory = Recycle(memory_max=1000 << 20)
    memory.ready(resident=200 << 20)
    assert memory.due(0, 0.0, resident=600 << 20) is None
    assert memory.due(0, 0.0, resident=601 << 20) == ("resident memory 601 MiB, and 200 MiB for a new process, "
                                                      "over 80% of MemoryMax=1000M")
    memory.failed(0, 10.0)
    assert memory.due(0, 39.0, resident=900 << 20) is None and memory.due(0, 40.0, resident=900 << 20)
    assert not Recycle().wanted and Recycle(memory_max=1).wanted
    assert 5 << 20 < resident_bytes() < 2 << 30  # this interpreter's own, from /proc


def test_a_drain_is_quiet_after_quiet_seconds_with_nothing_in_flight_and_no_request_ended():
    from uvicorn.server import ServerState

    from unitgen_worker.contract import QUIET
    from unitgen_worker.lifecycle import RunState

    # The requests are uvicorn's own count: total_requests grows as each response
    # completes, and tasks holds one for each request in flight.
    state = RunState(uvicorn=ServerState())
    state.begin_drain()
    assert not state.quiet()  # the drain just began
    state.last_activity -= QUIET + 0.01
    state._served_seen = state.served
    assert state.quiet()
    state.uvicorn.total_requests += 1  # a request ended since the last look: activity now
    assert state.served == 1 and not state.quiet()
    state.last_activity -= QUIET + 0.01
    running = object()
    state.uvicorn.tasks.add(running)  # one runs
    assert state.in_flight == 1 and not state.quiet()
    state.uvicorn.tasks.discard(running)
    state.last_activity -= QUIET + 0.01
    assert state.quiet()


def test_metrics_count_status_classes_and_durations_and_the_counters_file_takes_them():
    import asyncio

    from unitgen_worker.contract import DURATION_BUCKETS, Counters
    from unitgen_worker.lifecycle import MeasureRequests, Metrics, RunState

    async def app(scope, receive, send):
        path = scope["path"]
        if path == "/raise":
            raise RuntimeError("boom")
        if path == "/slow":
            await asyncio.sleep(0.03)
        await send({"type": "http.response.start", "status": int(scope["query_string"] or 200)})
        await send({"type": "http.response.body", "body": b""})

    async def nothing(message):
        return None

    metrics = Metrics()
    measured = MeasureRequests(app, metrics)

    async def run():
        for path, query in (("/", b""), ("/", b"404"), ("/", b"503"), ("/slow", b"201"), ("/", b"101")):
            await measured({"type": "http", "path": path, "query_string": query}, None, nothing)
        with pytest.raises(RuntimeError):
            await measured({"type": "http", "path": "/raise", "query_string": b""}, None, nothing)

    asyncio.run(run())
    assert metrics.responses == [1, 2, 0, 1, 1] and metrics.unanswered == 1
    assert sum(metrics.durations) == 6 and len(metrics.durations) == len(DURATION_BUCKETS) + 1
    assert metrics.durations[0] == 5  # all but the slow one within 5 ms
    assert metrics.durations[DURATION_BUCKETS.index(0.05)] == 1  # 30 ms: in the 50 ms bucket
    assert 0.03 <= metrics.duration_sum < 1
    counters = RunState(metrics=metrics, swaps=3, recycles=1).counters()
    again = Counters.from_json(counters.to_json())
    assert again == counters and again.responses == (1, 2, 0, 1, 1) and again.swaps == 3


def test_memory_recycling_is_off_where_two_fresh_processes_do_not_fit():
    from unitgen_worker.recycle import Recycle

    small = Recycle(memory_max=64 << 20)
    small.ready(resident=28 << 20)  # 56 MiB for two, over 80% of 64 MiB: every new one would recycle at once
    assert small.due(0, 0.0, resident=60 << 20) is None and not small.wanted
