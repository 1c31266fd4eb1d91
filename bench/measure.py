"""The measurements, each on one server: wrk for throughput and for failures during
reloads and restarts, the pid client for each worker's share, probes for the recovery
from kill -9, ps for memory. Load always comes from the host (the container shares its
network), with 64 connections.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bed import BenchError, host_background, log
from systems import Server

from load import UNTIL_STOPPED, Wrk

CONNECTIONS = 64
# Load name -> the headers wrk sends: keep-alive connections, or a new one per request.
LOADS = {"keep-alive": {}, "close": {"Connection": "close"}}
PIDCLIENT = Path(__file__).resolve().parent / "pidclient.py"


@dataclass(frozen=True)
class WrkRun:
    rate: float
    requests: int
    p99_ms: float
    connect_errors: int
    other_errors: int  # read, write, timeout errors and non-2xx answers

    @property
    def failed(self) -> int:
        return self.connect_errors + self.other_errors


def start_wrk(server: Server, load: str, seconds: float = UNTIL_STOPPED) -> Wrk:
    wrk = Wrk(server.url, seconds=max(1, round(seconds)), connections=CONNECTIONS, headers=LOADS[load])
    log.debug("+ %s &", shlex.join(wrk.proc.args))
    return wrk


def finish_wrk(wrk: Wrk, *, interrupt: bool = False) -> WrkRun:
    try:
        result = wrk.stop() if interrupt else wrk.result()
    except AttributeError:  # no "N requests in" line: wrk measured nothing
        raise BenchError(f"wrk measured nothing: {wrk.proc.args[-1]}") from None
    rate = re.search(r"Requests/sec:\s+([\d.]+)", result.output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", result.output)
    connect, *others = (int(n) for n in errors.groups()) if errors else (0, 0, 0, 0)
    return WrkRun(rate=float(rate.group(1)) if rate else 0.0, requests=result.requests, p99_ms=result.p99_ms,
                  connect_errors=connect, other_errors=sum(others) + result.non_2xx)


def steady(server: Server, load: str, seconds: float) -> WrkRun:
    return finish_wrk(start_wrk(server, load, seconds))


def answering_pids(url: str, requests: int = 8) -> set[int]:
    """The workers that answer `requests` concurrent requests, each on a new connection."""
    def one(_: int) -> int:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return int(response.headers.get("x-worker-pid", 0))
        except OSError:
            return 0
    with ThreadPoolExecutor(requests) as pool:
        return set(pool.map(one, range(requests))) - {0}


def wait_replaced(server: Server, old: set[int], timeout: float) -> float:
    """Seconds until `server` has its full count of workers again, none of them in old, and answers."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        workers = server.worker_pids()
        if len(workers) == server.workers and not workers & old and answering_pids(server.url, 1):
            return time.monotonic() - start
        time.sleep(0.1)
    raise BenchError(f"{server.label}: not back to {server.workers} new workers within {timeout:g} s")


def wait_ready(server: Server, timeout: float) -> None:
    wait_replaced(server, set(), timeout)


@dataclass(frozen=True)
class ReloadRun:
    load: WrkRun
    durations: list[float]  # of each reload, until all workers were new and it answered
    restarted: bool = False  # the supervisor itself was replaced: a reload that was a restart


def reloads_under_load(server: Server, load: str, reloads: int, margin: float, timeout: float) -> ReloadRun:
    """wrk through `reloads` reloads, with `margin` seconds of load before, between and after."""
    wrk = start_wrk(server, load)
    durations, restarted = [], False
    try:
        time.sleep(margin)
        for _ in range(reloads):
            old, supervisors = server.worker_pids(), server.supervisor_pids()
            start = time.monotonic()
            server.reload()
            wait_replaced(server, old, timeout)
            durations.append(time.monotonic() - start)
            restarted |= server.supervisor_pids() != supervisors
            time.sleep(margin)
    finally:
        run = finish_wrk(wrk, interrupt=True)
    return ReloadRun(run, durations, restarted)


@dataclass(frozen=True)
class RestartRun:
    refused: int  # connections refused
    refused_seconds: float  # from the first refused connection to the last
    errors: int  # every other failure
    answered: int
    p99_ms: float
    duration: float  # until all workers were new and it answered


def restart_under_load(server: Server, margin: float, timeout: float) -> RestartRun:
    """The pid client's connection-close load through a full restart."""
    client = start_pidclient(server, "close")
    try:
        time.sleep(margin)
        old = server.worker_pids()
        start = time.monotonic()
        server.restart()
        wait_replaced(server, old, timeout)
        duration = time.monotonic() - start
        time.sleep(margin)
    finally:
        tally = stop_pidclient(client)
    refused = [tenth for tenth, _ in tally["refused"]]
    return RestartRun(refused=sum(n for _, n in tally["refused"]),
                      refused_seconds=(max(refused) - min(refused) + 1) / 10 if refused else 0.0,
                      errors=sum(n for _, n in tally["errors"]), answered=sum(n for _, _, n in tally["answers"]),
                      p99_ms=tally["p99_ms"], duration=duration)


def kill9_recovery(server: Server, timeout: float) -> float | None:
    """Seconds from kill -9 of one worker until its successor answers beside the others.

    None: no successor answered within timeout (a system that does not replace workers).
    """
    old = server.worker_pids()
    victim = min(old)
    start = time.monotonic()
    server.bed.run("kill", "-9", str(victim))
    while time.monotonic() - start < timeout:
        workers = server.worker_pids()
        new = workers - old
        if len(workers) == server.workers and victim not in workers and new and answering_pids(server.url) & new:
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def start_pidclient(server: Server, load: str) -> subprocess.Popen[str]:
    close = ["--close"] if load == "close" else []
    return host_background([sys.executable, str(PIDCLIENT), server.url, "--connections", str(CONNECTIONS), *close])


def stop_pidclient(client: subprocess.Popen[str]) -> dict:
    client.send_signal(signal.SIGINT)
    out, _ = client.communicate(timeout=60)
    return json.loads(out)


@dataclass(frozen=True)
class Shares:
    counts: list[int]  # requests per worker alive at the window's end, largest first

    @property
    def max_min(self) -> float:
        return self.counts[0] / self.counts[-1] if self.counts and self.counts[-1] else float("inf")

    @property
    def percents(self) -> list[float]:
        total = sum(self.counts) or 1
        return [100 * n / total for n in self.counts]


@dataclass(frozen=True)
class ShareRun:
    steady: Shares
    after_reload: Shares
    errors: int


def shares_around_reload(server: Server, load: str, window: float, settle: float, timeout: float) -> ShareRun:
    """Each worker's share of the pid client's requests: a steady window, then a reload, then
    a window starting `settle` seconds after the reload was done."""
    client = start_pidclient(server, load)
    try:
        time.sleep(1)  # every connection open and busy
        steady_window = _window(window)
        steady_workers = server.worker_pids()
        server.reload()
        wait_replaced(server, steady_workers, timeout)
        time.sleep(settle)
        after_window = _window(window)
        after_workers = server.worker_pids()
    finally:
        tally = stop_pidclient(client)
    return ShareRun(steady=_shares(tally, steady_window, steady_workers),
                    after_reload=_shares(tally, after_window, after_workers),
                    errors=sum(n for _, n in tally["errors"]) + sum(n for _, n in tally["refused"]))


def _window(seconds: float) -> tuple[int, int]:
    """Sleep `seconds`; the window as tenths of wall-clock seconds, the pid client's unit."""
    start = int(time.time() * 10) + 1
    time.sleep(seconds + 0.1)
    return start, int(time.time() * 10)


def _shares(tally: dict, window: tuple[int, int], workers: set[int]) -> Shares:
    counts = dict.fromkeys(workers, 0)
    for tenth, pid, n in tally["answers"]:
        if window[0] <= tenth < window[1] and pid in counts:
            counts[pid] += n
    return Shares(sorted(counts.values(), reverse=True))


@dataclass(frozen=True)
class Memory:
    worker_rss_kb: list[int]
    supervisor_rss_kb: int


def memory(server: Server) -> Memory:
    return Memory(sorted(proc.rss_kb for proc in server.worker_procs()), server.supervisor_rss_kb())
