"""The drain, the STATUS= counters and the watchdog pings, with real sockets and real processes.

Most workers here are started by systemd-socket-activate, which passes the listening fd
(LISTEN_FDS/LISTEN_PID) and starts the worker at the first connection; a real datagram
socket receives sd_notify messages. The last test holds the listening socket itself, as
systemd does, and shares it with two workers, as siblings do.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from typing import NamedTuple

import pytest

from unitgen_worker.balance import SETTLE
from unitgen_worker.contract import Counters
from unitgen_worker.lifecycle import FORCE_AFTER, QUIET

APPS = Path(__file__).resolve().parents[1] / "e2e" / "apps"
STATUS = re.compile(r"STATUS=(serving|draining): \d+ requests, \d+ in flight, \d+ connections, "
                    r"(\d+/\d+ threads busy, )?up since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC")
pytestmark = pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                                reason="needs systemd-socket-activate (package systemd)")


class Notifications:
    """The sd_notify datagrams one worker sends, each with the time it arrived, and the
    pid that sent each (SO_PASSCRED: what systemd checks NotifyAccess=main against)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, list[str]]] = []
        self.senders: list[int] = []  # one per datagram received
        self.listening = True
        self.thread = threading.Thread(target=self._receive, daemon=True)
        self.thread.start()

    def _receive(self) -> None:
        while self.listening:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            self.senders.append(next((int.from_bytes(d[:4], sys.byteorder) for level, kind, d in ancillary
                                      if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)), 0))
            self.received.append((time.monotonic(), data.decode().split("\n")))

    def sent_by(self) -> list[tuple[int, list[str]]]:
        """Each datagram's lines with the pid that sent it."""
        return list(zip(self.senders, (lines for _, lines in self.received), strict=False))

    def when(self, line: str, timeout: float = 10) -> float:
        """When the first datagram holding this line arrived (waits for it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for when, lines in list(self.received):
                if line in lines:
                    return when
            time.sleep(0.02)
        pytest.fail(f"no {line} in {self.received}")

    def lines(self) -> list[str]:
        return [line for _, lines in self.received for line in lines]

    def close(self) -> None:
        self.listening = False
        self.thread.join()
        self.sock.close()


class Worker:
    def __init__(self, proc: subprocess.Popen[str], notes: Notifications, address: str | tuple[str, int]) -> None:
        self.proc, self.notes, self.address = proc, notes, address

    def connect(self) -> socket.socket:
        family = socket.AF_UNIX if isinstance(self.address, str) else socket.AF_INET
        client = socket.socket(family)
        client.settimeout(15)
        client.connect(self.address)
        return client

    def ready(self) -> None:
        """Starts the worker with a first request, as a client would, and waits for READY=1."""
        with self.connect() as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert client.recv(4096).startswith(b"HTTP/1.1 200 ")
        self.notes.when("READY=1")

    def http(self) -> HTTPConnection:
        """A keep-alive connection (HTTP/1.1)."""
        return HTTPConnection(*self.address, timeout=15)

    def stop(self, sig: int = signal.SIGTERM) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def exit(self, timeout: float = 15) -> tuple[int, float]:
        """The exit code, and when the worker exited."""
        code = self.proc.wait(timeout)
        return code, time.monotonic()

    def log(self) -> str:
        return self.proc.stderr.read() if self.proc.stderr else ""


class Reply(NamedTuple):
    status: int
    connection: str | None  # the Connection: header
    pid: int | None  # the worker that answered (x-worker-pid)
    body: bytes


def ask(conn: HTTPConnection, path: str) -> Reply:
    conn.request("GET", path)
    response = conn.getresponse()
    pid = response.getheader("x-worker-pid")
    return Reply(response.status, response.getheader("connection"), int(pid) if pid else None, response.read())


def keep_asking(conn: HTTPConnection, replies: list[Reply], errors: list[Exception], done: threading.Event) -> None:
    """Asks until done, like any keep-alive client: after `Connection: close` the next
    request reconnects. Stops at the first failure, which goes into errors."""
    while not done.is_set():
        try:
            replies.append(ask(conn, "/"))
        except Exception as err:  # noqa: BLE001 - any failure is what these tests look for
            errors.append(err)
            return


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def start(tmp_path):
    started: list[Worker] = []

    def _start(app: str, *args: str, env: dict[str, str] | None = None, listen: str | None = None,
               cwd: Path = APPS) -> Worker:
        notes = Notifications(tmp_path / "notify")
        listen = listen or f"127.0.0.1:{free_port()}"
        variables = [arg for name, value in {"NOTIFY_SOCKET": str(notes.path), **(env or {})}.items()
                     for arg in ("-E", f"{name}={value}")]
        cmd = ["systemd-socket-activate", "-l", listen, *variables,
               sys.executable, "-m", "unitgen_worker", "--app", app, *args]
        proc = subprocess.Popen(cmd, cwd=cwd, stderr=subprocess.PIPE, text=True)
        # systemd-socket-activate prints "Listening on ..." once the socket is bound.
        assert "Listening on" in proc.stderr.readline()
        host, _, port = listen.rpartition(":")
        worker = Worker(proc, notes, listen if listen.startswith("/") else (host, int(port)))
        started.append(worker)
        return worker

    yield _start
    stop_for_good(started)


def stop_for_good(workers: list[Worker]) -> None:
    """Stops every worker, then fails if one did not exit on SIGTERM."""
    stuck = []
    for worker in workers:
        worker.proc.terminate()
        try:
            worker.proc.wait(10)
        except subprocess.TimeoutExpired:
            worker.proc.send_signal(signal.SIGABRT)  # faulthandler: every thread's stack to stderr
            try:
                worker.proc.wait(10)
            except subprocess.TimeoutExpired:
                worker.proc.kill()  # SIGABRT blocked as well: leave no process behind
                worker.proc.wait(10)
            stuck.append(worker.log())
        worker.notes.close()
    if stuck:
        pytest.fail("a worker did not exit on SIGTERM:\n" + "\n".join(stuck))


def test_a_keepalive_client_answered_during_the_drain_is_told_to_close(start):
    worker = start("lifecycle:app")
    worker.ready()
    keepalive = worker.http()
    assert ask(keepalive, "/")[:2] == (200, None)
    with ThreadPoolExecutor() as pool:
        slow = pool.submit(ask, worker.http(), "/sleep?s=2")  # keeps the drain going
        time.sleep(0.5)
        worker.stop()
        worker.notes.when("STOPPING=1")
        stopped = time.monotonic()
        # Told at its first response after the drain began (one of uvicorn's default headers).
        while True:
            probe = keepalive.sock.dup()  # http.client drops its socket after `Connection: close`
            reply = ask(keepalive, "/")
            assert reply.status == 200
            if reply.connection == "close":
                break
            probe.close()
            assert time.monotonic() - stopped < 0.5, "never told to close"
            time.sleep(0.02)
        probe.settimeout(5)
        assert probe.recv(1) == b"", "the worker did not close the connection after its response"
        probe.close()
        assert slow.result()[:2] == (200, "close")
    assert worker.exit()[0] == 0


def test_websocket_clients_get_a_close_frame_1012_when_the_drain_begins(start):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    worker = start("lifecycle:app", "--drain-timeout", "20")
    worker.ready()
    host, port = worker.address
    with connect(f"ws://{host}:{port}/ws", open_timeout=10) as ws:
        assert int(ws.recv(timeout=10)) == worker.proc.pid
        stopped = worker.stop()
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    code, exited = worker.exit()
    # Not the drain timeout (20 s): the WebSocket ended the moment its client answered.
    assert code == 0 and exited - stopped < QUIET + 3
    assert "asked 1 WebSocket clients to reconnect" in worker.log()


def test_a_request_in_flight_at_sigterm_completes(start):
    worker = start("lifecycle:app")
    worker.ready()
    with ThreadPoolExecutor() as pool:
        connection = worker.http()
        slow = pool.submit(ask, connection, "/sleep?s=2.5")
        time.sleep(0.5)
        stopped = worker.stop()
        reply = slow.result()
    # In flight when the drain began, answered 2 s into it: it says `Connection: close`.
    assert reply == (200, "close", worker.proc.pid, f"pid {worker.proc.pid} slept 2.5\n".encode())
    code, exited = worker.exit()
    assert code == 0
    assert exited - stopped >= 2.0 + QUIET - 0.2, "the worker did not wait for the request and QUIET after it"
    assert "drained: 2 requests served" in worker.log()


def test_an_idle_worker_exits_0_at_once_and_leaves_the_socket_to_systemd(start, tmp_path):
    path = str(tmp_path / "app.sock")
    worker = start("lifecycle:app", listen=path)
    worker.ready()
    stopped = worker.stop()
    code, exited = worker.exit()
    assert code == 0
    assert exited - stopped < QUIET + 1.0
    # Closed, not unlinked: the socket file belongs to systemd (here systemd-socket-activate).
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert "drained: 1 requests served" in worker.log()


def test_a_stream_that_never_ends_is_closed_at_the_drain_timeout_and_the_worker_exits(start):
    drain_timeout = 1
    worker = start("lifecycle:app", "--drain-timeout", str(drain_timeout))
    worker.ready()
    with worker.connect() as stream:
        stream.sendall(b"GET /forever HTTP/1.1\r\nHost: t\r\n\r\n")
        received = b""
        while b"tick" not in received:
            received += stream.recv(4096)
        stopped = worker.stop()
        try:
            while stream.recv(4096):  # the ticks go on during the drain
                assert time.monotonic() - stopped < drain_timeout + 5, "the stream was not closed"
        except ConnectionResetError:
            pass
        closed = time.monotonic()
    code, exited = worker.exit(timeout=drain_timeout + FORCE_AFTER + 5)
    assert drain_timeout - 0.05 <= closed - stopped < drain_timeout + 1.0
    assert code == 0
    # The app's task never ends (uvicorn's send() ignores a closed connection): the
    # worker must give up on it by itself, long before systemd's TimeoutStopSec=.
    assert exited - stopped < drain_timeout + FORCE_AFTER + 1.0
    assert "drain timeout (1 s): closed 1 connections, 1 requests unfinished" in worker.log()


def test_notifications_come_in_order_with_live_status(start):
    worker = start("lifecycle:app")
    worker.ready()
    time.sleep(2.2)
    worker.stop()
    assert worker.exit()[0] == 0
    datagrams = [lines for _, lines in worker.notes.received]
    firsts = [lines[0] for lines in datagrams]
    assert firsts[0] == "READY=1"
    assert firsts.count("READY=1") == 1 and firsts.count("STOPPING=1") == 1
    stopping = firsts.index("STOPPING=1")
    assert datagrams[stopping][1].startswith("STATUS=draining: ")
    statuses = [(i, line) for i, lines in enumerate(datagrams) for line in lines if line.startswith("STATUS=")]
    assert all(STATUS.fullmatch(line) for _, line in statuses), statuses
    assert all(line.startswith("STATUS=draining") == (i >= stopping) for i, line in statuses), statuses
    assert len([i for i, _ in statuses if 0 < i < stopping]) >= 2, "STATUS= not sent once a second"
    assert [line for i, line in statuses if i < stopping][-1].startswith("STATUS=serving: 1 requests, 0 in flight")
    assert "WATCHDOG=1" not in worker.notes.lines()  # WATCHDOG_USEC unset: no pings


def test_watchdog_pings_come_from_the_event_loop_and_stop_while_it_is_blocked(start):
    worker = start("lifecycle:app", env={"WATCHDOG_USEC": "400000"})  # a ping every 0.1 s
    worker.ready()
    time.sleep(1)
    blocked = time.monotonic()
    assert ask(worker.http(), "/block?s=1")[0] == 200
    time.sleep(0.5)
    assert ask(worker.http(), "/")[0] == 200  # the drain waits QUIET after it: pings go on meanwhile
    stopping = worker.stop()
    assert worker.exit()[0] == 0
    pings = [when for when, lines in worker.notes.received if "WATCHDOG=1" in lines]
    assert len([p for p in pings if p < blocked]) >= 6
    gaps = [(later - earlier, earlier) for earlier, later in zip(pings, pings[1:], strict=False)]
    longest, began = max(gaps)
    assert longest >= 0.9 and began >= blocked - 0.2, "pings went on while the event loop was blocked"
    assert any(p > stopping for p in pings), "no pings during the drain"


def test_a_second_sigint_ends_the_drain_at_once(start):
    worker = start("lifecycle:app")
    worker.ready()
    with ThreadPoolExecutor() as pool:
        endless = pool.submit(ask, worker.http(), "/sleep?s=30")
        time.sleep(0.5)
        worker.stop(signal.SIGINT)
        worker.notes.when("STOPPING=1")
        forced = worker.stop(signal.SIGINT)
        code, exited = worker.exit()
        assert endless.exception(10) is not None  # cut off: that is what a second Ctrl-C asks for
    log = worker.log()
    assert code == 0, log
    assert exited - forced < 2.0, log  # not the 30 s the request and the drain timeout would take


def test_a_signal_during_startup_only_stops_the_startup(start):
    worker = start("slowstart:app")
    with worker.connect() as first:  # starts the worker
        first.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        for line in worker.proc.stderr:
            if "Waiting for application startup" in line:
                break
        worker.stop()
        code, _ = worker.exit()
    assert code == 0
    assert not {"READY=1", "STOPPING=1"} & set(worker.notes.lines())


def test_a_failed_startup_exits_3_without_ready(start):
    worker = start("failstart:app", cwd=Path(__file__).parent / "apps")
    with worker.connect() as first:  # starts the worker
        first.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        code, _ = worker.exit()
    assert code == 3  # EXIT_STARTUP: systemd restarts it, with backoff
    assert "startup failed: the app never became ready" in worker.log()
    assert "READY=1" not in worker.notes.lines()


# python -c: the socket as fd 3 and LISTEN_PID this process, then exec the worker (same pid).
SHIM = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); fd != 3 and os.close(fd); "
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid())); "
        "os.execv(sys.executable, [sys.executable, '-m', 'unitgen_worker', *sys.argv[2:]])")


def pinned(address: tuple[str, int], pid: int) -> HTTPConnection:
    """A keep-alive connection that worker pid accepted (both accept from one queue).
    The others stay open until then, so that the one that took them is busier."""
    others = []
    try:
        for _ in range(200):
            conn = HTTPConnection(*address, timeout=15)
            if ask(conn, "/").pid == pid:
                return conn
            others.append(conn)
    finally:
        for conn in others:
            conn.close()
    pytest.fail(f"no connection reached worker {pid}")


def test_siblings_serve_on_through_a_drain_and_nothing_fails(tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))  # held here, as systemd holds it
    address = listener.getsockname()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_", "LISTEN_"))}
    workers = []
    for i in range(2):
        # A runtime directory each: no shared load board, so no instance stops accepting
        # for its share while the connections are pinned (tests/e2e covers the board).
        runtime = tmp_path / f"run{i}"
        runtime.mkdir()
        notes = Notifications(tmp_path / f"notify{i}")
        proc = subprocess.Popen([sys.executable, "-c", SHIM, str(listener.fileno()), "--app", "lifecycle:app",
                                 "--instance", str(i)],
                                cwd=APPS, stderr=subprocess.PIPE, text=True, pass_fds=(listener.fileno(),),
                                env={**env, "NOTIFY_SOCKET": str(notes.path), "RUNTIME_DIRECTORY": str(runtime)})
        workers.append(Worker(proc, notes, address))
    draining, sibling = workers
    replies: list[Reply] = []
    errors: list[Exception] = []
    done = threading.Event()

    try:
        for worker in workers:
            worker.notes.when("READY=1")
        conns = [pinned(address, worker.proc.pid) for worker in (draining, draining, sibling, sibling)]
        clients = [threading.Thread(target=keep_asking, args=(conn, replies, errors, done), daemon=True)
                   for conn in conns]
        for client in clients:
            client.start()
        time.sleep(1)
        draining.stop()
        code, _ = draining.exit()
        time.sleep(0.3)
        done.set()
        for client in clients:
            client.join(15)
        assert code == 0
        assert errors == []
        assert {reply.status for reply in replies} == {200}
        assert Reply(200, "close", draining.proc.pid, b"") in [r._replace(body=b"") for r in replies]
        # The worker closed only its own copy: the socket still takes connections, for the sibling.
        assert ask(HTTPConnection(*address, timeout=15), "/")[:3] == (200, None, sibling.proc.pid)
    finally:
        done.set()
        listener.close()
        stop_for_good(workers)


def test_counters_are_published_in_the_runtime_directory_as_data(start, tmp_path):
    runtime = tmp_path / "run"
    runtime.mkdir()
    worker = start("lifecycle:app", "--instance", "3", env={"RUNTIME_DIRECTORY": str(runtime)})
    worker.ready()
    for _ in range(5):
        ask(worker.http(), "/")
    time.sleep(1.3)  # at least one STATUS= tick after the requests
    counters = Counters.from_json((runtime / "3.counters.json").read_text())
    assert counters == Counters(pid=worker.proc.pid, requests=6, in_flight=0, draining=False)
    # no temporary file left; the load board the instances share is there too
    assert sorted(p.name for p in runtime.iterdir()) == ["3.counters.json", "board"]


def test_an_asgi_request_past_the_request_timeout_is_logged_once_with_its_path_and_stack(start):
    worker = start("lifecycle:app", "--request-timeout", "1")
    worker.ready()
    with ThreadPoolExecutor() as pool:
        slow = pool.submit(ask, worker.http(), "/sleep?s=2.5")
        assert ask(worker.http(), "/")[0] == 200  # a quick one beside it is never reported
        assert slow.result()[0] == 200
    worker.stop()
    assert worker.exit()[0] == 0
    log = worker.log()
    reports = [line for line in log.splitlines() if "has run for" in line]
    assert len(reports) == 1, log
    assert "request 'GET' '/sleep' has run for 1 s (--request-timeout 1)" in reports[0]
    assert "asyncio.sleep" in log.split(reports[0], 1)[1], log  # the task's stack follows


def test_an_instance_over_its_share_asks_as_many_keepalive_clients_as_it_holds_over_it_to_move(start, tmp_path):
    from unitgen_worker.board import Board

    runtime = tmp_path / "run"
    runtime.mkdir()
    worker = start("lifecycle:app", "--instance", "0", env={"RUNTIME_DIRECTORY": str(runtime)})
    worker.ready()
    clients = [worker.http() for _ in range(8)]
    assert all(ask(client, "/")[:2] == (200, None) for client in clients)  # alone: nobody to move to
    # A sibling (this test, on the real board file) that accepts and holds `held`
    # connections; its heartbeat must stay fresh.
    sibling, held, beating = Board(runtime / "board", 1), [0], threading.Event()

    def heartbeat() -> None:
        sibling.claim()
        while not beating.is_set():
            sibling.publish(connections=held[0], in_flight=0)
            time.sleep(0.05)

    beat = threading.Thread(target=heartbeat, daemon=True)
    beat.start()
    try:
        # A few ticks once the sibling's arrival has settled (no client moves before).
        time.sleep(SETTLE + 1.0)

        def ask_and_follow(client: HTTPConnection) -> str | None:
            said = ask(client, "/").connection
            if said == "close":
                with following:
                    held[0] += 1  # it reconnects to the sibling, as a real client would
            return said

        # 8 against 0: the mean is 4, the limit 4 + max(1, 5%): 3 asked to move, once each.
        # As they leave, 7 against 1, then 6 against 2, and 5 against 3 are within it.
        following = threading.Lock()
        with ThreadPoolExecutor(len(clients)) as pool:
            told = list(pool.map(ask_and_follow, clients))
        assert told.count("close") == 3, told
        # They leave the sibling: 5 against 0, and the next ticks ask 2 more (limit 2.5 + 1)
        # to move, who send nothing yet. Then the sibling holds many more: the instance is
        # within its share again, and those 2 stay.
        held[0] = 0
        time.sleep(0.5)
        held[0] = 20
        time.sleep(0.5)
        staying = [client for client, said in zip(clients, told, strict=True) if said != "close"]
        assert [ask(client, "/").connection for client in staying] == [None] * 5
    finally:
        beating.set()
        beat.join()
