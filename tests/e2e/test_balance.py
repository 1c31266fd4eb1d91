"""Issue 10 end to end: every core serving, steady and after every roll; backpressure;
stuck WSGI handlers. Under real systemd 252 and 257, wrk from the host."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from helpers import wait_until
from load import Wrk

pytestmark = pytest.mark.e2e


def counters(app) -> dict[int, dict]:
    """Each running instance's row of `unitgen status --json`, by instance number."""
    document = json.loads(app.box.run("unitgen", "status", app.name, "--json").stdout)
    return {row["instance"]: row for row in document["instances"] if row["requests"] is not None}


def served_between(before: dict[int, dict], after: dict[int, dict]) -> dict[int, int]:
    """Requests each instance answered between two snapshots (same processes only)."""
    return {i: row["requests"] - (before[i]["requests"] if before.get(i, {}).get("pid") == row["pid"] else 0)
            for i, row in after.items()}


def shares(served: dict[int, int]) -> dict[int, float]:
    total = sum(served.values())
    return {i: round(n / total, 3) for i, n in served.items()}


@pytest.mark.parametrize(("instances", "low", "high"), [(2, 0.40, 0.60), (4, 0.15, 0.35)])
def test_keepalive_clients_spread_again_after_a_roll(box, deploy, instances, low, high):
    app = deploy("lifecycle:app", "--cores", str(instances))
    # Paced to about half of what the instances serve here. Saturated, on this 2-core
    # machine where wrk shares the cores, the shares of requests measured the kernel's
    # placement, not the spread: equal connections (33/31) and equal CPU seconds (9.35
    # and 9.73 s) served 17.3k and 22.0k requests per CPU second, shares 0.43/0.57 (one
    # CI run: 0.36/0.64). Paced, each instance serves what its clients ask: its share of
    # the connections, which is what re-spreading moves (without it: 100% and 0%).
    load = Wrk(f"{app.url}/", seconds=40, pause_ms=4)
    time.sleep(3)
    began = time.monotonic()
    box.run("unitgen", "roll", app.name, "--hold", "1", timeout=120)
    rolled = time.monotonic() - began
    time.sleep(10)
    before = counters(app)
    time.sleep(12)
    after = counters(app)
    result = load.result()
    served = served_between(before, after)
    held = {i: (before[i]["connections"], row["connections"]) for i, row in after.items() if i in before}
    print(f"{box.suite}: {instances} instances, roll {rolled:.1f} s; from 10 s after it: {served} "
          f"-> shares {shares(served)}; connections at start and end of the window {held}; "
          f"{result.requests} requests, {result.failed} failed")
    assert time.monotonic() - began < 40, "wrk ended before the measured window did"
    assert len(served) == instances and sum(served.values()) > 1000
    assert all(low <= share <= high for share in shares(served).values()), shares(served)
    assert result.failed == 0, result.output


def test_new_connections_spread_evenly_and_a_roll_fails_none(box, deploy):
    app = deploy("lifecycle:app", "--cores", "4")
    close = {"Connection": "close"}
    Wrk(f"{app.url}/", seconds=3, headers=close).result()  # warm up
    before = counters(app)
    steady = Wrk(f"{app.url}/", seconds=12, headers=close).result()
    time.sleep(1.2)  # counters are published once a second
    served = served_between(before, counters(app))
    ratio = max(served.values()) / min(served.values())
    seconds = 16  # a roll of 4 took 8 to 11.7 s
    during = Wrk(f"{app.url}/", seconds=seconds, headers=close)
    time.sleep(0.5)
    began = time.monotonic()
    box.run("unitgen", "roll", app.name, "--hold", "1", timeout=120)
    rolled = time.monotonic() - began
    rolling = during.result()
    # Steady before and after: a steady p99 alone drifts by a third between runs of a
    # few seconds here; the roll is held to the higher of the two.
    steady_after = Wrk(f"{app.url}/", seconds=8, headers=close).result()
    reference = max(steady.p99_ms, steady_after.p99_ms)
    print(f"{box.suite}: connection-close load over 4 instances: {served}, max/min {ratio:.2f}; "
          f"steady {steady.requests} requests p99 {steady.p99_ms} ms (after: {steady_after.p99_ms} ms); "
          f"roll {rolled:.1f} s: {rolling.requests} requests, {rolling.failed} failed, p99 {rolling.p99_ms} ms")
    assert steady.failed == 0 and steady.requests > 2000, steady.output
    # Without the board: 1.73-2.05; on shares of open connections alone, 1.09-1.33; on
    # accept counts, 1.01-1.03 (1.02-1.06 since uvloop accepts a burst at each wake).
    assert ratio <= 1.25, served
    assert rolled < seconds - 1, "the roll did not fit in the measured load"
    assert rolling.failed == 0, rolling.output
    assert rolling.p99_ms <= 1.5 * reference, (steady.output, steady_after.output, rolling.output)


def test_status_shares_match_what_each_instance_answered(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    answered: Counter[int] = Counter()
    held: Counter[int] = Counter()
    sessions = [requests.Session() for _ in range(8)]  # kept open: the connections column
    for session in sessions:
        response = session.get(app.url, timeout=5)
        answered[int(response.headers["x-worker-pid"])] += 1
        if response.headers.get("connection") != "close":  # else the balancer moved it on
            held[int(response.headers["x-worker-pid"])] += 1
    for _ in range(300):
        fresh = requests.get(app.url, headers={"Connection": "close"}, timeout=5)
        answered[int(fresh.headers["x-worker-pid"])] += 1
    time.sleep(1.5)  # a counters tick
    rows = {row["pid"]: row for row in counters(app).values()}
    table = box.run("unitgen", "status", app.name).stdout
    print(f"{box.suite}: answered {dict(answered)}, held {dict(held)}\n{table}")
    assert {pid: row["requests"] for pid, row in rows.items()} == {pid: answered[pid] for pid in rows}
    assert {pid: row["connections"] for pid, row in rows.items()} == {pid: held[pid] for pid in rows}
    for pid, row in rows.items():
        assert row["requests_share"] == round(100 * answered[pid] / sum(answered.values()), 1)
        assert re.search(rf"\s{row['requests']} \({row['requests_share']:.0f}%\)\s+{held[pid]} ", table), table
    for session in sessions:
        session.close()


# Requests hung on purpose would hold the uninstall at the end of a test for the whole
# drain timeout (30 s by default: 42 s a test, twice per release).
SHORT_DRAIN = ("--drain-timeout", "3")


def _get(url: str, timeout: float) -> tuple[float, int | str]:
    began = time.monotonic()
    try:
        status = requests.get(url, headers={"Connection": "close"}, timeout=timeout).status_code
    except requests.RequestException as err:
        status = type(err).__name__
    return time.monotonic() - began, status


def _hang(url: str, count: int, seconds: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=_get, args=(f"{url}/hang?s={seconds}", seconds + 10), daemon=True)
               for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def test_an_instance_with_no_free_thread_leaves_new_connections_to_its_sibling(box, deploy):
    threads = 4
    app = deploy("flaskapp:app", "--cores", "2", "--threads", str(threads), "--request-timeout", "0", *SHORT_DRAIN)
    _hang(app.url, threads * 3 // 2, 60)
    assert wait_until(lambda: sum(row["busy_threads"] for row in counters(app).values()) == threads * 3 // 2, 10)
    busy = {i: f"{row['busy_threads']}/{row['threads']}" for i, row in counters(app).items()}
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: _get(app.url, 10), range(80)))
    slowest = max(took for took, _ in results)
    print(f"{box.suite}: threads busy {busy}; 80 new requests: slowest {slowest:.2f} s, "
          f"statuses {Counter(status for _, status in results)}")
    assert all(status == 200 for _, status in results), results
    assert slowest < 2.0


def test_an_instance_whose_threads_are_all_stuck_recycles_and_the_service_recovers(box, deploy):
    app = deploy("flaskapp:app", "--cores", "2", "--request-timeout", "3", *SHORT_DRAIN)
    began = time.monotonic()
    _hang(app.url, 64, 60)
    time.sleep(0.5)

    def journal() -> str:
        return box.run("journalctl", "--no-pager", "-o", "cat", "-u", f"{app.name}@*.service").stdout

    # 10 answers in a row after some instance recycled: with libuv before 1.45 (Debian 12)
    # the instance that wakes first accepts every connection waiting, so one may take all
    # 64 and its sibling answer from the start (CI on 62f9eb3: 10 answers at 0.6 s).
    in_a_row, log, recycled = 0, [], False
    while in_a_row < 10 and time.monotonic() - began < 40:
        recycled = recycled or "recycling this instance" in journal()
        took, status = _get(app.url, 2)
        log.append((round(time.monotonic() - began, 1), status))
        in_a_row = in_a_row + 1 if status == 200 and recycled else 0
    recovered = time.monotonic() - began
    print(f"{box.suite}: 10 answers in a row after a recycle {recovered:.1f} s after 64 stuck requests; "
          f"{len(log)} probes, first ones {log[:6]}")
    text = journal()
    assert in_a_row == 10 and recovered <= 20, (log, text[-6000:])
    assert re.search(r"request 'GET' '/hang' has run for \d+ s in thread \d+", text), text[-3000:]
    assert re.search(r'File "/srv/apps/flaskapp.py", line \d+, in hang', text), text[-3000:]
