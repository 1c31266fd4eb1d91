"""Reload in place (unitgen_worker.handover) with real processes: the worker on a socket
passed as systemd passes it, a real datagram socket receiving its notifications (with
the sender's pid, SO_PASSCRED, as systemd sees it), and the ExecReload= waiter run as
systemd runs it. tests/e2e/test_reload.py covers systemd's side on 252 and 257."""

from __future__ import annotations

import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest
from test_drain import APPS, Notifications, ask, free_port, keep_asking

pytestmark = pytest.mark.skipif(not Path("/usr/bin/systemd-socket-activate").exists()
                                and not Path("/bin/systemd-socket-activate").exists(),
                                reason="needs systemd-socket-activate (package systemd)")
BROKEN_LATER = """
import os
from lifecycle import app as _app
if os.path.exists(os.environ["BREAK_MARK"]):
    raise RuntimeError("this release is broken")
app = _app
"""
SLOW_LATER = """
import asyncio
import os
from lifecycle import app as _app

async def app(scope, receive, send):
    async def slow_send(message):
        if message["type"] == "lifespan.startup.complete" and os.path.exists(os.environ["SLOW_MARK"]):
            await asyncio.sleep(1.5)
        await send(message)
    await _app(scope, receive, slow_send if scope["type"] == "lifespan" else send)
"""


def first(notes: Notifications, prefix: str, timeout: float = 20) -> tuple[int, list[str]]:
    """The first datagram with a line starting with prefix, and its sender's pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, lines in notes.sent_by():
            if any(line.startswith(prefix) for line in lines):
                return pid, lines
        time.sleep(0.02)
    pytest.fail(f"no {prefix} in {notes.received}")


@pytest.fixture
def instance(tmp_path):
    """instance(app, env) -> (the worker's Popen, Notifications, port, runtime directory)."""
    started = []

    def _start(app: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
        notes = Notifications(tmp_path / "notify")
        runtime = tmp_path / "run"
        runtime.mkdir()
        port = free_port()
        variables = {"NOTIFY_SOCKET": str(notes.path), "RUNTIME_DIRECTORY": str(runtime),
                     "WATCHDOG_USEC": "2000000", "PYTHONPATH": str(APPS), **(env or {})}
        cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
               *[arg for name, value in variables.items() for arg in ("-E", f"{name}={value}")],
               sys.executable, "-m", "unitgen_worker", "--app", app, "--instance", "0", *args]
        proc = subprocess.Popen(cmd, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        assert "Listening on" in proc.stderr.readline()
        ask(HTTPConnection("127.0.0.1", port, timeout=15), "/")  # systemd-socket-activate starts it now
        first(notes, "READY=1")
        started.append((proc, notes))
        return proc, notes, port, runtime

    yield _start
    for proc, notes in started:
        for _when, lines in notes.received:  # the processes that took the instance over
            if any(line.startswith("MAINPID=") for line in lines):
                new = int(next(line for line in lines if line.startswith("MAINPID="))[8:])
                with_suppressed_kill(new)
        with_suppressed_kill(proc.pid)
        proc.wait(15)
        notes.close()


def with_suppressed_kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def log_so_far(proc: subprocess.Popen[str]) -> str:
    """What the worker wrote to stderr so far. Not read to the end: the new process holds
    the same pipe open while it serves."""
    fd = proc.stderr.fileno()
    os.set_blocking(fd, False)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks).decode(errors="replace")


def waiter(runtime: Path, pid: int, module: str = "unitgen_worker.reload") -> subprocess.CompletedProcess[str]:
    """ExecReload=, as the unit runs it (units rendered before unitgen_worker.reload ran unitgen_worker.handover)."""
    return subprocess.run([sys.executable, "-m", module, "app@0.service", str(pid)],
                          env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)}, capture_output=True, text=True,
                          timeout=120)


def test_a_reload_hands_the_instance_to_a_new_process_and_fails_no_request(instance):
    proc, notes, port, runtime = instance("lifecycle:app")
    old = proc.pid
    replies, errors, done = [], [], threading.Event()
    clients = [threading.Thread(target=keep_asking, args=(HTTPConnection("127.0.0.1", port, timeout=15), replies,
                                                          errors, done)) for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(0.5)
    result = waiter(runtime, old)
    assert result.returncode == 0, result.stderr
    sender, lines = first(notes, "MAINPID=")
    new = int(lines[0].removeprefix("MAINPID="))
    # One datagram, from the old (main) process: after MAINPID=, its own are refused.
    assert sender == old and lines[:2] == [f"MAINPID={new}", "READY=1"] and new != old
    assert first(notes, "RELOADING=1")[0] == old
    assert f"app@0.service: pid {new} serves now; pid {old} drains" in result.stdout
    # The new process is PID 1's (or a subreaper's) child by then, never the old one's.
    with open(f"/proc/{new}/stat") as stat:
        assert int(stat.read().rsplit(")", 1)[1].split()[1]) != old
    assert proc.wait(15) == 0  # the old one drained and exited
    time.sleep(1)
    done.set()
    for client in clients:
        client.join(15)
    assert errors == []
    assert {reply.pid for reply in replies} == {old, new} and replies[-1].pid == new
    # The watchdog: pinged by the new process once it is the main one.
    pings = [pid for pid, lines in notes.sent_by() if "WATCHDOG=1" in lines]
    assert new in pings and pings[-1] == new
    recorded = json.loads((runtime / "0.handover.json").read_text())
    assert recorded["ok"] is True and (recorded["old"], recorded["new"]) == (old, new)


def test_a_release_that_cannot_start_leaves_the_old_process_serving(instance, tmp_path):
    (tmp_path / "brokenlater.py").write_text(BROKEN_LATER)
    mark = tmp_path / "broken"
    proc, notes, port, runtime = instance("brokenlater:app", {"BREAK_MARK": str(mark)})
    mark.write_text("")
    result = waiter(runtime, proc.pid)
    assert result.returncode == 1
    assert "reload failed, pid" in result.stderr and "exited before it was ready" in result.stderr
    assert "MAINPID=" not in [line[:8] for _, lines in notes.received for line in lines]
    # READY=1 again after RELOADING=1: the unit is active again, with the failure in STATUS=.
    sender, lines = first(notes, "STATUS=reload failed")
    assert sender == proc.pid and "READY=1" in lines
    assert ask(HTTPConnection("127.0.0.1", port, timeout=15), "/").pid == proc.pid
    assert proc.poll() is None
    recorded = json.loads((runtime / "0.handover.json").read_text())
    assert recorded["ok"] is False and recorded["new"] == proc.pid


def test_max_requests_swaps_the_process_in_place_and_fails_no_request(instance):
    proc, notes, port, runtime = instance("lifecycle:app", args=("--max-requests", "200",
                                                                 "--max-requests-jitter", "20"))
    replies, errors, done = [], [], threading.Event()
    clients = [threading.Thread(target=keep_asking, args=(HTTPConnection("127.0.0.1", port, timeout=15), replies,
                                                          errors, done)) for _ in range(4)]
    for client in clients:
        client.start()
    sender, lines = first(notes, "MAINPID=")
    new = int(lines[0].removeprefix("MAINPID="))
    assert sender == proc.pid and new != proc.pid
    assert proc.wait(15) == 0
    done.set()
    for client in clients:
        client.join(15)
    assert errors == []
    # The limit starts the swap; the old process serves on until the new one is ready.
    assert sum(reply.pid == proc.pid for reply in replies) >= 200
    assert any(reply.pid == new for reply in replies)
    limit = int(re.search(rf"recycling instance 0, pid {proc.pid}: served \d+ requests \(limit (\d+)\)",
                          log_so_far(proc)).group(1))
    assert 200 <= limit <= 220


def test_a_process_over_its_memory_limit_swaps_itself(instance):
    # MemoryMax=150M: the fresh worker and a new one (about 2 x 30 MiB here) fit in 80% of
    # it, not once this one has leaked 60 MiB more.
    proc, notes, port, runtime = instance("lifecycle:app", args=("--memory-max", str(150 << 20)))
    client = HTTPConnection("127.0.0.1", port, timeout=15)
    for _ in range(30):  # up to 150 MiB more, in 5 MiB steps
        reply = ask(client, "/leak?kb=5120")
        assert reply.status == 200
        if reply.pid != proc.pid:
            break
    sender, lines = first(notes, "MAINPID=")
    assert sender == proc.pid
    assert proc.wait(15) == 0
    log = log_so_far(proc)
    assert f"recycling instance 0, pid {proc.pid}: resident memory" in log, log
    assert ask(HTTPConnection("127.0.0.1", port, timeout=15), "/").pid == int(lines[0].removeprefix("MAINPID="))


def test_a_reload_asked_of_the_old_process_after_its_handover_is_answered_as_done(instance):
    # systemd may start a waiter with the old $MAINPID just before it takes MAINPID=.
    proc, notes, port, runtime = instance("lifecycle:app")
    slow = threading.Thread(target=ask, args=(HTTPConnection("127.0.0.1", port, timeout=15), "/sleep?s=3"))
    slow.start()  # keeps the old process draining for a while
    time.sleep(0.3)
    assert waiter(runtime, proc.pid).returncode == 0
    new = int(first(notes, "MAINPID=")[1][0].removeprefix("MAINPID="))
    # As units rendered before unitgen_worker.reload existed ask it: the same answer.
    again = waiter(runtime, proc.pid, module="unitgen_worker.handover")
    assert proc.poll() is None, "the old process was not draining any more: nothing tested"
    assert again.returncode == 0 and f"pid {new} serves now" in again.stdout, again.stderr
    slow.join(15)
    assert proc.wait(15) == 0


def gone_or_zombie(pid: int) -> bool:
    """Whether pid has exited (an orphan's zombie waits for whoever reaps orphans here)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def slow_to_swap(instance, tmp_path: Path):
    """An instance whose next processes take 1.5 s more to start than its first."""
    (tmp_path / "slowlater.py").write_text(SLOW_LATER)
    mark = tmp_path / "slow"
    started = instance("slowlater:app", {"SLOW_MARK": str(mark)})
    mark.write_text("")
    return started


# nanosleep and clock_nanosleep, as /proc/PID/syscall numbers them on each architecture.
SLEEP_SYSCALLS = {"x86_64": ("35", "230"), "aarch64": ("101", "115")}


def loop_sleeping(pid: int, timeout: float = 10) -> None:
    """Waits until the process's event loop thread sleeps in /block (time.sleep():
    clock_nanosleep or nanosleep, by /proc/PID/syscall), not in epoll_wait."""
    sleeping = SLEEP_SYSCALLS.get(platform.machine())
    if sleeping is None:
        pytest.fail(f"no syscall numbers for {platform.machine()} in SLEEP_SYSCALLS")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Path(f"/proc/{pid}/syscall").read_text().split()[0] in sleeping:
            return
        time.sleep(0.01)
    pytest.fail(f"pid {pid} never blocked its loop")


def ask_until_told_to_close(conn: HTTPConnection, replies: list, errors: list[Exception]) -> None:
    """A keep-alive client that asks until a response says `Connection: close`."""
    while True:
        try:
            reply = ask(conn, "/")
        except Exception as err:  # noqa: BLE001 - any failure is what this test looks for
            errors.append(err)
            return
        replies.append(reply)
        if (reply.connection or "").lower() == "close":
            return


def test_a_process_stopped_mid_swap_lets_the_new_one_drain_what_it_accepted(instance, tmp_path):
    # A stop or restart that reaches an instance mid-swap, after the new process began
    # accepting: that process was killed, with its clients' connections (a roll that
    # restarted an instance recycling itself, CI on e0c0600: 11 and 31 requests failed).
    # It drains them now, and the old process exits only once it has.
    proc, notes, port, runtime = slow_to_swap(instance, tmp_path)
    old = proc.pid
    os.kill(old, signal.SIGHUP)
    # The swap begins as the loop handles the signal: blocked before, it would start the
    # new process only once released (seen on a busy CI host: it served the request
    # below itself).
    started = new_process_of(old, "slowlater:app")
    blocked, release = [], tmp_path / "release"
    blocker = threading.Thread(target=lambda: blocked.append(
        ask(HTTPConnection("127.0.0.1", port, timeout=60), f"/block?s=50&until={release}")))
    # The old process's loop stops until the test releases it, after the stop: it cannot
    # read "ready" before. Not a fixed time, which a busy host may outlast.
    blocker.start()
    loop_sleeping(old)  # not a fixed wait: in a busy container 0.5 s was not always enough
    # New connections wait in the socket's queue until the new process accepts them.
    new = ask(HTTPConnection("127.0.0.1", port, timeout=40), "/").pid
    assert new == started
    replies, errors = [], []
    clients = [threading.Thread(target=ask_until_told_to_close,
                                args=(HTTPConnection("127.0.0.1", port, timeout=15), replies, errors))
               for _ in range(4)]
    for client in clients:
        client.start()
    time.sleep(0.5)
    os.kill(old, signal.SIGTERM)  # as systemd stops the unit: to the main process only
    time.sleep(0.2)
    release.write_text("")
    assert proc.wait(30) == 0
    for client in (blocker, *clients):
        client.join(15)
    log = log_so_far(proc)
    assert blocked[0].pid == old and blocked[0].status == 200
    assert errors == [], log
    assert f"reload failed, pid {old} stops, the new one drains too" in log, log
    assert {reply.pid for reply in replies} == {new} and len(replies) > 4
    # The old process waited for the new one's drain; the new one, never the main
    # process, sent systemd nothing.
    assert gone_or_zombie(new), log
    assert new not in {pid for pid, _ in notes.sent_by()}


def worker_pids(app: str) -> set[int]:
    """The worker processes serving app (not the intermediate that starts a new one)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (FileNotFoundError, NotADirectoryError, PermissionError, ProcessLookupError):
            continue
        if b"unitgen_worker" in argv and app.encode() in argv and b"-c" not in argv:
            pids.add(int(entry.name))
    return pids


def parent_of(pid: int) -> int | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))


def new_process_of(old: int, app: str, timeout: float = 10) -> int:
    """The process a swap of old started (once the old one's loop has handled SIGHUP).
    Not a child of old: the intermediate old forks shows old's command line until it
    execs (CI in a bookworm container took that pid for the new process); the new one
    is the intermediate's child."""
    deadline = time.monotonic() + timeout
    while not (new := {pid for pid in worker_pids(app) - {old} if parent_of(pid) not in (old, None)}) \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    assert new, "no new process started"
    return new.pop()


def test_a_process_stopped_while_its_new_one_starts_takes_that_one_down_too(instance, tmp_path):
    # The stop cancels the swap while it waits for "ready": the new process, not yet
    # known as the swap's outcome, was left running, to accept connections with nobody
    # to hand it the instance (and systemd's kill at the old one's exit ahead of it).
    proc, notes, port, runtime = slow_to_swap(instance, tmp_path)
    old = proc.pid
    os.kill(old, signal.SIGHUP)
    new = new_process_of(old, "slowlater:app")
    time.sleep(0.3)  # it imports the app, or waits in its startup
    os.kill(old, signal.SIGTERM)
    assert proc.wait(30) == 0
    log = log_so_far(proc)
    assert "stops, the new one drains too: the old process was stopped during the reload" in log, log
    assert gone_or_zombie(new), log


def test_a_stop_that_reaches_the_old_process_as_it_hands_over_reaches_the_new_one(instance):
    # systemd sends a stop's SIGTERM to the main process only (KillMode=mixed). One that
    # came just before systemd read MAINPID= reached the old process, and the new one
    # served on (until TimeoutStopSec, if systemd took it as main; killed with its
    # clients when the old one exited, if not). The old process passes it on and waits
    # for it; the new one, main or not, waits for the old one too, so the stop takes up
    # to the drain timeout in this race (3 s here, against 32 s per default), failing nothing.
    proc, notes, port, runtime = instance("lifecycle:app", args=("--drain-timeout", "3"))
    old = proc.pid
    slow = threading.Thread(target=ask, args=(HTTPConnection("127.0.0.1", port, timeout=15), "/sleep?s=3"))
    slow.start()  # keeps the old process draining after the handover
    time.sleep(0.3)
    assert waiter(runtime, old).returncode == 0
    new = int(first(notes, "MAINPID=")[1][0].removeprefix("MAINPID="))
    os.kill(old, signal.SIGTERM)  # as that stop would
    assert proc.wait(15) == 0
    slow.join(15)
    deadline = time.monotonic() + 10
    while not gone_or_zombie(new) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone_or_zombie(new), log_so_far(proc)
