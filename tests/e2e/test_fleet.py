"""The Ansible role and playbooks (packaging/ansible) on a fleet of three Debian 12 hosts
(containers with real systemd, reached over ssh) behind HAProxy, under wrk load through
HAProxy (64 keep-alive connections): a fleet roll, a broken release, a host's
maintenance, and a second run that changes nothing.

One release only (bookworm, systemd 252): the role does the same on 257, and this file
takes about 6 minutes."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from fleet import APP, DrainWatch, Fleet, write_release

import testbed
from helpers import unavailable, wait_until
from load import LoadResult, Wrk
from testbed import missing_tools

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(debs: dict[str, Path]):
    if os.geteuid() != 0:
        unavailable("the e2e tests boot containers and must run as root")
    missing = missing_tools() + [tool for tool in ("haproxy", "ssh", "wrk", "curl") if shutil.which(tool) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)}: run tests/bootstrap")
    # A short path: ssh's control sockets live in here (108 bytes at most for a unix socket).
    directory = Path(tempfile.mkdtemp(prefix="fleet-", dir="/tmp"))
    fleet = Fleet(directory, debs["current"])
    try:
        fleet.create()
        try:
            fleet.boot()
        except testbed.TestbedError as err:
            unavailable(str(err))
        fleet.releases = directory / "releases"
        first = write_release(fleet.releases, "r1")
        recap = fleet.playbook("site.yml", "-e", f"unitgen_release_src={first}")
        assert recap.rc == 0, recap.tail()
        assert all(host.body() == "release r1" for host in fleet.hosts)
        fleet.start_haproxy()
        yield fleet
    finally:
        fleet.shutdown()
        # Every playbook's output, kept for a failure's post-mortem.
        if (directory / "ansible.log").exists():
            shutil.copy(directory / "ansible.log", Path(tempfile.gettempdir()) / "unitgen-fleet-ansible.log")
        shutil.rmtree(directory, ignore_errors=True)


def counters(fleet: Fleet) -> dict[str, int]:
    """HAProxy's own error counters: 5xx answers (frontend and backend), response and
    connection errors, retries and redispatches (backend)."""
    stats = fleet.haproxy.stats()
    backend, frontend = stats["BACKEND"], stats["FRONTEND"]
    return {"backend_5xx": int(backend["hrsp_5xx"] or 0), "frontend_5xx": int(frontend["hrsp_5xx"] or 0),
            "eresp": int(backend["eresp"] or 0), "econ": int(backend["econ"] or 0),
            "wretr": int(backend["wretr"] or 0), "wredis": int(backend["wredis"] or 0)}


@contextmanager
def load(fleet: Fleet):
    """wrk through HAProxy for as long as the block runs (stopped with SIGINT, which
    makes wrk print its summary); yields a dict that gets "result" and "haproxy"."""
    before = counters(fleet)
    wrk = Wrk(fleet.haproxy.url)
    time.sleep(2)  # every connection open and busy before anything changes
    outcome: dict = {}
    try:
        yield outcome
        time.sleep(2)  # and still served after it
    finally:
        outcome["result"] = wrk.stop()
        after = counters(fleet)
        outcome["haproxy"] = {key: after[key] - before[key] for key in after}


def no_failure(outcome: dict) -> None:
    result: LoadResult = outcome["result"]
    assert result.requests > 1000, result.output
    assert result.failed == 0, f"{result.failed} failed of {result.requests}\n{result.output}"
    errors = {k: v for k, v in outcome["haproxy"].items() if k in ("backend_5xx", "frontend_5xx", "eresp", "econ")}
    assert not any(errors.values()), f"HAProxy counted errors: {outcome['haproxy']}"


def report(what: str, recap, outcome: dict | None = None) -> None:
    line = f"\n{what}: playbook {recap.seconds:.1f} s, rc {recap.rc}, recap {recap.hosts}"
    if outcome:
        result = outcome["result"]
        line += f"; wrk {result.requests} requests, {result.failed} failed, p99 {result.p99_ms} ms; " \
                f"HAProxy {outcome['haproxy']}"
    print(line)


def test_roll_a_new_release_serial_1(fleet: Fleet):
    """Canary batch of 1 checked at HAProxy, then serial 1, each host drained at the
    balancer while it rolls: no request fails, never two hosts drained at once, and
    every host serves the new release at the end."""
    release = write_release(fleet.releases, "r2")
    watch = DrainWatch(fleet.haproxy)
    with load(fleet) as outcome:
        recap = fleet.playbook("roll.yml", "-e", f"unitgen_release_src={release}", "-e", "fleet_serial=1",
                               "-e", "fleet_canary=1", "-e", "fleet_canary_observe=3", "-e", "fleet_drain=true")
    watch.stop()
    report("roll r2 serial 1", recap, outcome)
    assert recap.rc == 0, recap.tail()
    assert set(recap.hosts) >= {"h1", "h2", "h3"} and not any(r["failed"] for r in recap.hosts.values())
    assert "canary h1: 0 errors in" in recap.output, recap.tail()
    no_failure(outcome)
    assert watch.seen == {"h1", "h2", "h3"}, f"every host is drained in its turn: {watch.seen}"
    assert watch.most == 1, f"{watch.most} hosts were drained at once"
    assert fleet.haproxy.drained() == set()
    assert [host.body() for host in fleet.hosts] == ["release r2"] * 3


def test_broken_release_stops_at_the_first_host(fleet: Fleet):
    """A release that cannot be imported: the first host fails (before any change to what
    it runs), the play stops, the other two hosts are never touched, and all keep serving."""
    release = write_release(fleet.releases, "r3-broken", broken=True)
    bundles = {h.name: h.container.run("stat", "-c", "%Y", f"/var/lib/unitgen-ansible/{APP}.bundle").stdout
               for h in fleet.hosts}
    with load(fleet) as outcome:
        recap = fleet.playbook("roll.yml", "-e", f"unitgen_release_src={release}", "-e", "fleet_serial=1",
                               "-e", "fleet_canary=1", "-e", "fleet_canary_observe=1", "-e", "fleet_drain=true")
    report("broken release", recap, outcome)
    assert recap.rc != 0, recap.tail()
    assert recap.hosts["h1"]["failed"] == 1, recap.tail()
    assert "does not load" in recap.output and "no_such_module_in_this_release" in recap.output, recap.tail()
    # h2 and h3 were never in a batch: not in the recap, no trace of the release on them.
    assert "h2" not in recap.hosts and "h3" not in recap.hosts, recap.hosts
    for host in fleet.hosts[1:]:
        assert host.container.run("test", "-e", f"/srv/unitgen/{APP}/r3-broken", check=False).returncode == 1
    for host in fleet.hosts:
        now = host.container.run("stat", "-c", "%Y", f"/var/lib/unitgen-ansible/{APP}.bundle").stdout
        assert now == bundles[host.name], f"the units of {host.name} were rewritten"
        assert host.body() == "release r2"
    no_failure(outcome)
    assert fleet.haproxy.drained() == set()
    assert fleet.haproxy.all_up()


def test_release_failing_at_startup_is_rolled_back(fleet: Fleet):
    """A release that imports (so render's check passes) but whose startup fails: the roll
    on the first host fails, the role puts the previous units back and rolls onto them,
    the play stops there. No balancer drain this time (fleet_drain off): the host's other
    instance serves meanwhile, and no request fails."""
    release = write_release(fleet.releases, "r4-nostart", fails_startup=True)
    with load(fleet) as outcome:
        recap = fleet.playbook("roll.yml", "-e", f"unitgen_release_src={release}", "-e", "fleet_serial=1",
                               "-e", "fleet_canary=1", "-e", "fleet_canary_observe=1")
    report("release failing at startup", recap, outcome)
    assert recap.rc != 0, recap.tail()
    assert recap.hosts["h1"]["failed"] == 1, recap.tail()
    assert "did not become ready" in recap.output, recap.tail()
    assert "fleetapp: the new release did not take and the previous one was put back" in recap.output, recap.tail()
    assert "h2" not in recap.hosts and "h3" not in recap.hosts, recap.hosts
    h1 = fleet.hosts[0]
    spec = json.loads(h1.container.run("unitgen", "show", APP).stdout)
    assert spec["workdir"] == f"/srv/unitgen/{APP}/r2", spec
    assert h1.container.run("systemctl", "is-active", f"{APP}.target").stdout.strip() == "active"
    for host in fleet.hosts:
        assert host.body() == "release r2"
    for host in fleet.hosts[1:]:
        assert host.container.run("test", "-e", f"/srv/unitgen/{APP}/r4-nostart", check=False).returncode == 1
    no_failure(outcome)
    assert fleet.haproxy.drained() == set()


def test_second_run_changes_nothing(fleet: Fleet):
    """The role run twice with nothing new: the second run reports changed=0 on every host.
    (The first may apply on h1: the failed roll before left it to be applied again.)"""
    release = fleet.releases / "r2"
    first = fleet.playbook("site.yml", "-e", f"unitgen_release_src={release}")
    second = fleet.playbook("site.yml", "-e", f"unitgen_release_src={release}")
    report("site.yml again (1st)", first)
    report("site.yml again (2nd)", second)
    assert first.rc == 0 and second.rc == 0, second.tail()
    assert set(second.hosts) == {"h1", "h2", "h3"}, second.hosts
    assert {h: r["changed"] for h, r in second.hosts.items()} == {"h1": 0, "h2": 0, "h3": 0}, second.tail()
    assert all(r["failed"] == 0 and r["ok"] > 5 for r in second.hosts.values())
    # The roll playbook too: nothing to roll, so no host is drained or rolled.
    watch = DrainWatch(fleet.haproxy)
    roll = fleet.playbook("roll.yml", "-e", f"unitgen_release_src={release}", "-e", "fleet_drain=true")
    watch.stop()
    report("roll.yml with nothing new", roll)
    assert roll.rc == 0, roll.tail()
    assert all(r["changed"] == 0 for r in roll.hosts.values()), roll.tail()
    assert watch.seen == set()


def test_maintenance_power_off_and_boot(fleet: Fleet):
    """h2 drained in HAProxy, powered off, booted again (the playbook's power-on command
    signals this test, which plays the host's power button), READY, ready again: no
    request fails meanwhile."""
    host = fleet.hosts[1]
    flag = fleet.dir / "power-on-h2"
    old_pid = host.container.proc.pid
    booted: dict = {}

    def power_button():
        # Waits for the container to power itself off, then for the power-on request.
        host.container.proc.wait(300)
        host.container.power_off()
        if wait_until(flag.exists, 300, step=0.1):
            try:
                host.container.boot()
                booted["at"] = time.monotonic()
            except testbed.TestbedError as err:
                booted["error"] = str(err)

    button = threading.Thread(target=power_button, daemon=True)
    button.start()
    with load(fleet) as outcome:
        recap = fleet.playbook("maintenance.yml", "-e", json.dumps({
            "maintenance_hosts": "h2", "maintenance_action": "poweroff", "maintenance_power_on": f"touch {flag}"}))
    button.join(30)
    report("maintenance of h2 (power off, boot)", recap, outcome)
    assert recap.rc == 0, recap.tail()
    assert "error" not in booted and "at" in booted, booted
    assert host.container.proc.pid != old_pid
    no_failure(outcome)
    assert host.body() == "release r2"
    assert host.container.run("systemctl", "is-active", f"{APP}.target").stdout.strip() == "active"
    assert fleet.haproxy.drained() == set() and fleet.haproxy.all_up()
