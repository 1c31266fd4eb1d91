"""Issue 11 end to end, the rest: an instance recycles itself in place (after
--max-requests, or over its memory limit) one at a time and failing nothing, and
WebSocket clients of a draining process get a close frame and reconnect at once; under
real systemd 252 and 257."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections import defaultdict

import pytest
import requests
import websockets

from helpers import apt_install, wait_until
from load import Wrk

pytestmark = pytest.mark.e2e


def journal(box, app) -> list[tuple[int, str]]:
    """The instances' journal lines: (CLOCK_REALTIME in µs, message)."""
    out = box.sh(f"journalctl -u '{app.name}@*.service' -o json --output-fields=MESSAGE --no-pager").stdout
    lines = []
    for line in out.splitlines():
        entry = json.loads(line)
        if isinstance(entry.get("MESSAGE"), str):
            lines.append((int(entry["__REALTIME_TIMESTAMP"]), entry["MESSAGE"]))
    return lines


def swaps(lines: list[tuple[int, str]]) -> list[tuple[int, int, int]]:
    """Each swap as (start, end, old pid): from the old process taking the handover lock
    (it logs "starts a new process" once it has it) to its exit after its drain (uvicorn's
    last line). The lock is held all that time. journald stamps the lines of stdout
    streams as it reads them, hence the 20 ms allowed between one end and the next start."""
    started = {}
    for stamp, message in lines:
        if match := re.search(r"reloading: pid (\d+) starts a new process", message):
            started[int(match.group(1))] = stamp
    ended = {}
    for stamp, message in lines:
        if match := re.search(r"Finished server process \[(\d+)\]", message):
            ended[int(match.group(1))] = stamp
    return sorted((start, ended[pid], pid) for pid, start in started.items() if pid in ended)


def assert_one_at_a_time(intervals: list[tuple[int, int, int]]) -> None:
    for (_, end, pid), (start, _, next_pid) in zip(intervals, intervals[1:], strict=False):
        assert start >= end - 20_000, f"pid {next_pid} began a swap {(end - start) / 1000:.0f} ms before {pid} ended"


def test_max_requests_recycles_every_instance_one_at_a_time(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2", "--max-requests", "5000", "--max-requests-jitter", "500")
    started = time.time()
    result = Wrk(f"{app.url}/", seconds=60).result()
    time.sleep(2)  # the last drains end
    lines = [(stamp, message) for stamp, message in journal(box, app) if stamp >= started * 1e6]
    recycled, pids = defaultdict(int), []
    for _, message in lines:
        if match := re.search(r"recycling instance (\d+), pid (\d+): served (\d+) requests \(limit (\d+)\)", message):
            recycled[int(match.group(1))] += 1
            pids.append(match.group(2))
            assert 5000 <= int(match.group(4)) <= 5500 and int(match.group(3)) >= int(match.group(4)), message
    assert len(pids) == len(set(pids)), "a process asked to recycle twice"
    intervals = swaps(lines)
    print(f"{box.suite}: 60 s, {result.requests} requests, {result.failed} failed; recycles by instance "
          f"{dict(recycled)}; {len(intervals)} swaps")
    assert result.failed == 0, result.output
    assert set(recycled) == {0, 1} and len(intervals) >= 2
    assert_one_at_a_time(intervals)
    assert not [m for _, m in lines if "reload failed" in m]


def test_an_instance_over_its_memory_limit_recycles_before_memory_max(box, deploy):
    # MemoryMax=128M: a process recycles once it and a fresh one (its own size at READY)
    # would pass 80% of it, about 102 MiB, so at about 70 MiB.
    app = deploy("lifecycle:app", "--cores", "2", "--memory-max", "128M")
    assert app.show(f"{app.name}@0.service", "MemoryMax") == str(128 << 20)
    started = time.time()
    load = Wrk(f"{app.url}/", seconds=30)
    peak: dict[int, int] = defaultdict(int)
    until = time.monotonic() + 28
    with requests.Session() as session:
        while time.monotonic() < until:  # about 10 MiB a second leaked across the instances
            response = session.get(f"{app.url}/leak", params={"kb": 512}, timeout=10)
            assert response.status_code == 200
            pid, resident = map(int, re.fullmatch(r"pid (\d+) resident (\d+)\n", response.text).groups())
            peak[pid] = max(peak[pid], resident)
            time.sleep(0.05)
    result = load.result()
    time.sleep(2)
    lines = [(stamp, message) for stamp, message in journal(box, app) if stamp >= started * 1e6]
    recycles = [m for _, m in lines if re.search(r"recycling instance \d+, pid \d+: resident memory", m)]
    # What each recycling process took at READY, as it logged it: the size of the new one.
    fresh = [int(m) << 20 for m in re.findall(r"and (\d+) MiB for a new process", "\n".join(recycles))]
    kernel = box.run("journalctl", "-k", "-g", "oom|Killed process", "--no-pager", check=False).stdout
    print(f"{box.suite}: {len(recycles)} memory recycles, {result.requests} requests, {result.failed} failed; "
          f"peak resident by pid (MiB): {sorted(v >> 20 for v in peak.values())}; "
          f"fresh {sorted(v >> 20 for v in fresh)}")
    assert len(recycles) >= 2 and len(peak) >= 3, recycles
    # The largest old process and a new one together stayed under MemoryMax=. The app
    # reports its resident memory after each leak: the test sees every step of growth.
    assert max(peak.values()) + max(fresh) < 128 << 20
    assert result.failed == 0, result.output
    assert_one_at_a_time(swaps(lines))
    assert not [m for _, m in lines if "oom" in m.lower() or "Killed" in m]
    assert app.name not in kernel
    assert app.show(f"{app.name}@0.service", "NRestarts") == app.show(f"{app.name}@1.service", "NRestarts") == "0"


class WebSocketClients:
    """count clients, each connected to url's /ws; on a close it records the code and the
    process it was connected to, and reconnects at once. Runs in its own thread."""

    def __init__(self, url: str, count: int) -> None:
        self.url = url.replace("http://", "ws://") + "/ws"
        self.count = count
        self.closes: list[tuple[int, int | None, float]] = []  # (pid, close code, when)
        self.connected: dict[int, int] = {}  # client -> pid it is connected to now
        self.errors: list[str] = []
        self.stopping = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._run(),), daemon=True)
        self.thread.start()

    async def _run(self) -> None:
        await asyncio.gather(*(self._client(i) for i in range(self.count)))

    async def _client(self, i: int) -> None:
        while not self.stopping:
            try:
                async with websockets.connect(self.url, open_timeout=10, close_timeout=2) as ws:
                    pid = int(await ws.recv())
                    self.connected[i] = pid
                    while not self.stopping:
                        try:
                            await asyncio.wait_for(ws.recv(), 0.2)
                        except asyncio.TimeoutError:
                            await ws.send("ping")
                    return
            except websockets.ConnectionClosed as closed:
                if not self.stopping:
                    self.closes.append((self.connected.pop(i), getattr(closed.rcvd, "code", None), time.monotonic()))
            except (OSError, asyncio.TimeoutError, websockets.InvalidHandshake) as err:
                self.errors.append(f"client {i}: {err!r}")
                await asyncio.sleep(0.05)

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(timeout=15)


def test_websocket_clients_get_a_close_frame_and_reconnect_across_a_roll_of_4(box, deploy):
    apt_install(box, "python3-websockets")  # uvicorn serves WebSockets with it
    app = deploy("lifecycle:app", "--cores", "4")
    clients = WebSocketClients(app.url, 20)
    try:
        assert wait_until(lambda: len(clients.connected) == 20, 20), clients.errors
        before = app.instance_pids()
        began = time.monotonic()
        # Held 1 s each (the default 3 s holds alone would take 12 s of the 15).
        roll = box.run("unitgen", "roll", app.name, "--hold", "1", timeout=120)
        took = time.monotonic() - began
        assert wait_until(lambda: len(clients.connected) == 20, 10), clients.errors
        after = set(clients.connected.values())
    finally:
        clients.stop()
    codes = [code for _, code, _ in clients.closes]
    print(f"{box.suite}: roll of 4 with 20 WebSockets in {took:.1f} s: {len(clients.closes)} closes, codes "
          f"{sorted(set(codes), key=str)}, {len(clients.errors)} failed connects")
    assert roll.stderr.count(" swapped in ") == 4, roll.stderr
    assert took < 15
    # Every client connected to an old process was closed with a frame (1012) and reconnected.
    assert {pid for pid, _, _ in clients.closes} <= before and len(clients.closes) >= 20
    assert set(codes) == {1012}, clients.closes
    assert not after & before and clients.errors == []



def test_a_roll_holds_through_instances_that_recycle_themselves(box, deploy):
    # An instance that swaps itself (a new MainPID, no restart) during roll's hold is no
    # failed release; and a reload asked while an instance recycles is answered by that swap.
    app = deploy("lifecycle:app", "--cores", "2", "--max-requests", "3000")
    load = Wrk(f"{app.url}/", seconds=20)
    time.sleep(1)
    roll = box.run("unitgen", "roll", app.name, check=False, timeout=120)
    result = load.result()
    print(f"{box.suite}: roll under recycling: rc {roll.returncode}, {result.requests} requests, "
          f"{result.failed} failed")
    assert roll.returncode == 0, roll.stderr
    assert result.failed == 0, result.output
