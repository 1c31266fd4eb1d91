"""Issue 3 end to end: roll, status, scale, logs, under real systemd 252 and 257."""

from __future__ import annotations

import json
import re
import time

import pytest
import requests

from helpers import restarted, wait_until
from load import Wrk

pytestmark = pytest.mark.e2e


def active_instances(app) -> list[str]:
    out = app.box.run("systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                      f"{app.name}@*.service").stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


@pytest.mark.parametrize("instances", [2, 8])
def test_roll_under_keepalive_load_fails_nothing(box, deploy, instances):
    app = deploy("lifecycle:app", "--cores", str(instances))
    steady = Wrk(f"{app.url}/", seconds=5).result()
    load = Wrk(f"{app.url}/", seconds=20)
    began, rolls = time.monotonic(), 0
    while time.monotonic() - began < 14 or rolls == 0:
        roll = box.run("unitgen", "roll", app.name, "--hold", "0.5")
        assert f"rolled {instances} instances" in roll.stderr
        rolls += 1
    during = load.result()
    print(f"{box.suite}: roll of {instances} x{rolls}: {during.requests} requests, {during.failed} failed, "
          f"p99 {during.p99_ms:.2f} ms during rolls vs {steady.p99_ms:.2f} ms steady")
    assert during.requests > 10_000
    assert during.failed == 0, during.output


def test_roll_onto_a_broken_release_stops_at_the_first_instance(box, deploy, flags):
    app = deploy("lifecycle:app", "--cores", "3")
    before = {i: app.show(f"{app.name}@{i}.service", "MainPID") for i in (1, 2)}
    load = Wrk(f"{app.url}/", seconds=8)
    time.sleep(1)
    flags("fail-startup-all")  # the new release cannot start
    # Restarts (the swaps in place are tests/e2e/test_reload.py's).
    roll = box.run("unitgen", "roll", "--restart", app.name, check=False)
    result = load.result()
    assert roll.returncode != 0
    assert f"unitgen: error: roll stopped at {app.name}@0.service" in roll.stderr
    assert "failing on purpose" in roll.stderr  # the instance's own journal lines
    assert "the 2 instances not reached still run the old release" in roll.stderr
    assert {i: app.show(f"{app.name}@{i}.service", "MainPID") for i in (1, 2)} == before
    assert result.failed == 0, result.output
    status = json.loads(box.run("unitgen", "status", app.name, "--json").stdout)
    broken = status["instances"][0]
    assert broken["state"] != "active" and broken["failures"] >= 1


def test_two_rolls_of_8_back_to_back_hit_no_limit(box, deploy):
    app = deploy("lifecycle:app", "--cores", "8")
    for _ in range(2):
        box.run("unitgen", "roll", "--restart", "--hold", "0", app.name)
    socket = app.box.run("systemctl", "show", "-p", "ActiveState", "-p", "Result", f"{app.name}.socket").stdout
    assert sorted(socket.split()) == ["ActiveState=active", "Result=success"]
    assert len(active_instances(app)) == 8
    assert requests.get(app.url, timeout=5).status_code == 200


def test_all_at_once_and_target_restart_refuse_nothing(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    load = Wrk(f"{app.url}/", seconds=10)
    time.sleep(2)
    box.run("unitgen", "roll", "--all-at-once", app.name)
    time.sleep(2)
    box.run("systemctl", "restart", f"{app.name}.target")
    result = load.result()
    print(f"{box.suite}: all at once + target restart: {result.requests} requests, {result.failed} failed, "
          f"p99 {result.p99_ms:.2f} ms")
    assert result.requests > 10_000
    assert (result.socket_errors, result.non_2xx) == (0, 0), result.output


def test_status_matches_systemctl_show_and_the_counters(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    pid1 = int(app.show(f"{app.name}@1.service", "MainPID"))
    box.run("kill", "-9", str(pid1))
    assert wait_until(restarted(app, f"{app.name}@1.service", pid1), timeout=10)
    for _ in range(30):
        requests.get(app.url, headers={"Connection": "close"}, timeout=5)
    time.sleep(1.3)
    status = json.loads(box.run("unitgen", "status", app.name, "--json").stdout)
    assert status["schema"] == 1 and status["name"] == app.name and status["app"] == "lifecycle:app"
    assert status["socket"] == {"unit": f"{app.name}.socket", "state": "active", "listen": [f"127.0.0.1:{app.port}"]}
    served = 0
    for row in status["instances"]:
        unit = row["unit"]
        shown = dict(line.split("=", 1) for line in box.run(
            "systemctl", "show", "-p", "MainPID,NRestarts,MemoryCurrent,StatusText", unit).stdout.splitlines())
        assert row["pid"] == int(shown["MainPID"])
        assert row["restarts"] == int(shown["NRestarts"])
        assert row["memory_bytes"] == (int(shown["MemoryCurrent"]) if shown["MemoryCurrent"].isdigit() else None)
        assert row["rss_bytes"] > 1_000_000
        assert shown["StatusText"].startswith(f"serving: {row['requests']} requests, {row['in_flight']} in flight")
        assert row["state"] == "active" and row["wanted"] and row["uptime_seconds"] >= 0
        served += row["requests"]
    assert [row["restarts"] for row in status["instances"]] == [0, 1]
    assert served == 30
    table = box.run("unitgen", "status", app.name).stdout.splitlines()
    assert table[1].split() == ["UNIT", "STATE", "PID", "UPTIME", "MEMORY", "RESTARTS", "REQUESTS", "CONNS",
                                "IN-FLIGHT", "BUSY", "NOTE"]
    assert [line.split()[0] for line in table[2:]] == [f"{app.name}@0.service", f"{app.name}@1.service"]


def test_status_watch_shows_a_frame_a_second_with_requests_per_second_under_load(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    load = Wrk(app.url, seconds=6, connections=8)
    time.sleep(1)
    # Ctrl-C (SIGINT) after 3.5 s: it ends there, exit 0 (--preserve-status: not timeout's 124).
    watched = box.run("timeout", "--preserve-status", "-s", "INT", "3.5",
                      "unitgen", "status", app.name, "--watch", "1", check=False)
    assert load.result().failed == 0
    assert watched.returncode == 0, watched.stderr
    frames = watched.stdout.split("every 1 s; Ctrl-C stops")[1:]
    assert 3 <= len(frames) <= 5, watched.stdout
    lines = frames[-1].splitlines()
    header = next(line for line in lines if line.startswith("UNIT "))
    column = header.index("REQ/S")
    rates = [int(line[column:].split()[0]) for line in lines if line.startswith(f"{app.name}@")]
    assert len(rates) == 2 and all(rate > 50 for rate in rates), frames[-1]  # under load, counted per second


def test_scale_2_4_1_survives_daemon_reload_and_target_restart(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    for count in (4, 1):
        box.run("unitgen", "scale", app.name, str(count))
        expected = [f"{app.name}@{i}.service" for i in range(count)]
        assert active_instances(app) == expected
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "restart", f"{app.name}.target")
        assert active_instances(app) == expected, f"after scale {count}, daemon-reload and target restart"
        assert requests.get(app.url, timeout=5).status_code == 200
    status = json.loads(box.run("unitgen", "status", app.name, "--json").stdout)
    assert [row["unit"] for row in status["instances"] if row["wanted"]] == [f"{app.name}@0.service"]


def test_show_prints_the_saved_spec_and_a_rerender_reproduces_the_installed_units(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2", "--drain-timeout", "7")
    box.run("unitgen", "scale", app.name, "3")
    saved = box.run("unitgen", "show", app.name).stdout
    spec = json.loads(saved)
    assert (spec["schema"], spec["name"], spec["app"], spec["instances"], spec["drain_timeout"]) == (
        1, app.name, "lifecycle:app", 3, 7)
    bundle = box.run("unitgen", "render", "--spec", "-", "--no-check", input=saved).stdout
    sections = re.split(r"^==> (\S+) <==\n", bundle, flags=re.M)[1:]
    rendered = {name: text.rstrip("\n") + "\n" for name, text in zip(sections[::2], sections[1::2], strict=True)}
    assert sorted(rendered) == sorted([f"{app.name}.socket", f"{app.name}@.service", f"{app.name}.target",
                                       f"{app.name}.unitgen.json"])
    for name, text in rendered.items():
        assert box.run("cat", f"/etc/systemd/system/{name}").stdout == text, name


def test_scale_rejects_bad_counts(box, deploy):
    app = deploy("lifecycle:app", "--cores", "1")
    for bad in ("0", "-1", "abc"):
        result = box.run("unitgen", "scale", app.name, bad, check=False)
        assert result.returncode != 0 and result.stderr.count("\n") == 1 and "unitgen: error:" in result.stderr


def test_logs_interleave_every_instance_tagged(box, deploy):
    app = deploy("lifecycle:app", "--cores", "2")
    out = box.run("unitgen", "logs", app.name, "-n", "200").stdout
    for i in (0, 1):
        stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
        assert re.search(rf"^{stamp} {app.name}@{i}: INFO unitgen.worker: instance {i} serving",
                         out, re.M), out
    # -f keeps printing: a restart of instance 1 shows up while it follows.
    follow = box.sh(f"(sleep 1; systemctl restart {app.name}@1.service) & timeout 4 unitgen logs {app.name} -f -n 0",
                    check=False)
    assert re.search(rf"{app.name}@1: INFO unitgen.worker: drained", follow.stdout), follow.stdout + follow.stderr
