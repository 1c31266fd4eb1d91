"""Issue 5 end to end: drain, watchdog, crash policy, under real systemd 252 and 257."""

from __future__ import annotations

import re
import threading
import time

import pytest
import requests

from helpers import FLAGS, restarted, wait_until
from load import Wrk

pytestmark = pytest.mark.e2e


def test_stop_start_restart_under_keepalive_load_fail_nothing(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    load = Wrk(f"{app.url}/", seconds=12)
    time.sleep(2)
    for action in (["stop", f"{app.name}@0.service"], ["start", f"{app.name}@0.service"],
                   ["restart", f"{app.name}@1.service"]):
        box.run("systemctl", *action)
        time.sleep(1.5)
    result = load.result()
    print(f"{box.suite}: {result.requests} requests, {result.failed} failed, p99 {result.p99_ms} ms")
    assert result.requests > 10_000
    assert (result.socket_errors, result.non_2xx) == (0, 0), result.output


def test_request_in_flight_at_sigterm_completes(box, deploy):
    app = deploy("lifecycle:app", "--cores", "1")
    responses = []
    slow = threading.Thread(target=lambda: responses.append(requests.get(f"{app.url}/sleep?s=2", timeout=30)))
    slow.start()
    time.sleep(0.5)
    began = time.monotonic()
    box.run("systemctl", "restart", f"{app.name}@0.service")
    took = time.monotonic() - began
    slow.join()
    assert responses[0].status_code == 200
    assert responses[0].text.endswith("slept 2.0\n")
    assert took >= 1.3, "the restart did not wait for the request in flight"
    # while draining, the response told the client to close
    assert responses[0].headers.get("connection") == "close"


def test_watchdog_kills_a_blocked_loop_and_the_sibling_serves_throughout(box, deploy):
    watchdog = 2
    # --no-rebalance: the sessions pinned below must stay where they are.
    app = deploy("lifecycle:app", "--cores", "2", "--watchdog", str(watchdog), "--no-rebalance")
    unit = f"{app.name}@0.service"
    victim_pid = int(app.show(unit, "MainPID"))
    # Keep-alive sessions pinned to each instance: the victim's and the sibling's. The
    # others stay open meanwhile: an instance over its share leaves new connections to
    # its sibling.
    victim, healthy, others = None, [], []
    for _ in range(60):
        session = requests.Session()
        pid = int(session.get(app.url, timeout=5).headers["x-worker-pid"])
        if pid == victim_pid and victim is None:
            victim = session
        elif pid != victim_pid and len(healthy) < 4:
            healthy.append(session)
        else:
            others.append(session)
        if victim and len(healthy) == 4:
            break
    for session in others:
        session.close()
    assert victim is not None and len(healthy) == 4

    def block_the_loop():
        try:
            victim.get(f"{app.url}/block?s={3 * watchdog}", timeout=30)
        except requests.RequestException:
            pass  # its instance is killed under it: expected

    blocked = threading.Thread(target=block_the_loop, daemon=True)
    began = time.monotonic()
    blocked.start()
    failures = served = 0
    new_pid = None
    while time.monotonic() - began < 3 * watchdog + 1:
        for session in healthy:
            try:
                failures += session.get(app.url, timeout=5).status_code != 200
                served += 1
            except requests.RequestException:
                failures += 1
        if new_pid is None:
            new_pid = restarted(app, unit, victim_pid)()
            took = time.monotonic() - began
        time.sleep(0.02)
    assert (failures, served > 100) == (0, True)
    assert new_pid is not None, "the blocked instance was not restarted"
    assert took <= watchdog + 2, f"restarted after {took:.2f} s"
    journal = box.run("journalctl", "--no-pager", "-o", "cat", f"_PID={victim_pid}").stdout
    assert "Fatal Python error: Aborted" in journal
    assert re.search(r"line \d+ in block", journal), journal
    assert "Watchdog timeout" in box.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout


def test_kill_9_only_fails_what_was_in_flight_and_comes_back_fast(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    unit = f"{app.name}@0.service"
    pid = int(app.show(unit, "MainPID"))
    load = Wrk(f"{app.url}/", seconds=6)
    time.sleep(2)
    began = time.monotonic()
    box.run("kill", "-9", str(pid))
    assert wait_until(restarted(app, unit, pid), timeout=10)
    took = time.monotonic() - began
    during = load.result()
    after = Wrk(f"{app.url}/", seconds=3).result()
    print(f"{box.suite}: READY again after {took:.2f} s; {during.failed} of {during.requests} failed")
    assert took < 2.0
    # Each of the 64 connections has at most one request in flight: only those on
    # the killed instance can fail.
    assert during.failed <= 64, during.output
    assert after.failed == 0, after.output


def test_crash_loop_backs_off_never_fails_the_socket_and_recovers(box, deploy, flags):
    app = deploy("lifecycle:app", "--cores", "2")
    socket_unit = f"{app.name}.socket"
    socket_since = app.show(socket_unit, "ActiveEnterTimestampMonotonic")
    load = Wrk(f"{app.url}/", seconds=26)
    time.sleep(1)
    flags("fail-startup-1")
    assert box.run("systemctl", "restart", f"{app.name}@1.service", check=False).returncode != 0
    time.sleep(17)  # failures at about 0, 0.5, 1.5, 3.5, 7.5 and 15.5 s
    journal = box.run("journalctl", "--no-pager", "-o", "cat", "-u", f"{app.name}@1.service").stdout
    pauses = [float(p) for p in re.findall(r"starting again in ([\d.]+) s", journal)]
    assert len(pauses) >= 4, journal
    assert pauses == sorted(pauses) and pauses[-1] >= 4 * pauses[0], pauses
    assert app.show(socket_unit, "ActiveState") == "active"
    assert int(app.show(f"{app.name}@1.service", "NRestarts")) >= 4

    box.run("rm", f"{FLAGS}/fail-startup-1")  # the fix is deployed: roll
    for i in (1, 0):
        began = time.monotonic()
        box.run("systemctl", "restart", f"{app.name}@{i}.service")
        assert time.monotonic() - began < 5, "a restart after the fix waited out the backoff"
    result = load.result()
    print(f"{box.suite}: crash loop {pauses}; {result.requests} requests, {result.failed} failed")
    assert result.failed == 0, result.output
    assert app.show(socket_unit, "ActiveEnterTimestampMonotonic") == socket_since
    assert app.show(socket_unit, "Result") == "success"


def test_import_error_exits_78_without_restart_while_siblings_serve(box, deploy, flags):
    app = deploy("lifecycle:app", "--cores", "2")
    unit = f"{app.name}@1.service"
    load = Wrk(f"{app.url}/", seconds=8)
    time.sleep(1)
    flags("import-error-1")
    assert box.run("systemctl", "restart", unit, check=False).returncode != 0
    time.sleep(3)
    assert app.show(unit, "ExecMainStatus") == "78"
    assert app.show(unit, "NRestarts") == "0"
    assert app.show(unit, "ActiveState") == "failed"
    failed_pid = app.show(unit, "ExecMainPID")
    lines = box.run("journalctl", "--no-pager", "-o", "cat", f"_PID={failed_pid}").stdout.splitlines()
    assert lines == ["unitgen-worker: cannot import 'lifecycle': No module named 'a_module_that_is_not_installed'"]
    result = load.result()
    assert result.failed == 0, result.output


def test_a_stream_that_never_ends_is_closed_at_the_drain_timeout(box, deploy):
    app = deploy("lifecycle:app", "--cores", "1", "--drain-timeout", "2")
    unit = f"{app.name}@0.service"
    pid = app.show(unit, "MainPID")
    lines = []

    def read_stream():
        try:
            with requests.get(f"{app.url}/forever", stream=True, timeout=30) as stream:
                for line in stream.iter_lines():
                    lines.append(line)
        except requests.RequestException:
            pass  # closed under it mid-stream: what the drain timeout does

    reader = threading.Thread(target=read_stream)
    reader.start()
    assert wait_until(lambda: len(lines) >= 3, timeout=5)
    began = time.monotonic()
    box.run("systemctl", "restart", unit)
    took = time.monotonic() - began
    reader.join(5)
    assert not reader.is_alive(), "the stream was not closed"
    assert 2 <= took < 2 + 5, f"restart took {took:.2f} s with --drain-timeout 2"
    journal = box.run("journalctl", "--no-pager", "-o", "cat", f"_PID={pid}").stdout
    assert "drain timeout (2 s): closed 1 connections" in journal
    # the instance exited by itself, well before TimeoutStopSec= (17 s) would kill it
    assert "timed out" not in box.run("journalctl", "--no-pager", "-o", "cat", "-u", unit).stdout


def test_status_counters_are_live_in_systemctl_status(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    for _ in range(50):
        assert requests.get(app.url, headers={"Connection": "close"}, timeout=5).status_code == 200
    time.sleep(1.3)  # STATUS= is sent at least once a second
    served = 0
    for i in range(2):
        text = app.show(f"{app.name}@{i}.service", "StatusText")
        match = re.fullmatch(r"serving: (\d+) requests, 0 in flight, \d+ connections, "
                             r"up since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text)
        assert match, text
        served += int(match.group(1))
    assert served == 50
    status = box.run("systemctl", "status", "--no-pager", f"{app.name}@0.service").stdout
    assert 'Status: "serving: ' in status


def test_on_failure_unit_alerts_on_a_crash_loop_and_on_exit_78(box, deploy, flags):
    alert_unit = "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo %i >> /run/unitgen-test/alerts'\n"
    box.run("tee", "/etc/systemd/system/alert@.service", input=alert_unit)
    box.run("systemctl", "daemon-reload")
    app = deploy("lifecycle:app", "--cores", "2", "--on-failure", "alert@%n.service")
    flags("fail-startup-1")
    box.run("systemctl", "restart", f"{app.name}@1.service", check=False)
    def alerts():
        return box.run("cat", f"{FLAGS}/alerts", check=False).stdout.split()

    assert wait_until(lambda: alerts() == [f"{app.name}@1.service"], timeout=10), alerts()
    box.run("rm", f"{FLAGS}/fail-startup-1")
    flags("import-error-1")
    box.run("systemctl", "restart", f"{app.name}@1.service", check=False)
    assert wait_until(lambda: len(alerts()) == 2, timeout=10), alerts()
    assert app.show(f"{app.name}@1.service", "ActiveState") == "failed"
    box.run("rm", "-f", "/etc/systemd/system/alert@.service")


def test_a_startup_longer_than_the_watchdog_is_not_killed(box, deploy):
    # The watchdog covers the running instance; startup is bounded by TimeoutStartSec=.
    app = deploy("slowstart:app", "--cores", "1", "--watchdog", "1")
    unit = f"{app.name}@0.service"
    assert app.show(unit, "ActiveState") == "active"
    assert app.show(unit, "NRestarts") == "0"
    time.sleep(2.5)  # and once running, the pings keep it alive
    assert app.show(unit, "NRestarts") == "0"
    assert requests.get(app.url, timeout=5).status_code == 200
