"""`unitgen ... --user`: an app under a non-root user's own systemd, under real systemd 252 and 257.

The user has linger (`loginctl enable-linger`), so user@UID.service runs with no login;
every unitgen command runs as that user through runuser with XDG_RUNTIME_DIR set, as a
login would set it.
"""

from __future__ import annotations

import itertools
import json
import socket
import time
from dataclasses import dataclass

import pytest

from helpers import wait_until
from load import Wrk
from testbed import free_port

pytestmark = pytest.mark.e2e
_names = itertools.count()
_GET_OVER_UNIX = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                  "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); print(s.recv(100).decode())")


@dataclass
class Person:
    """A user of the container, and how to run a command as them."""

    box: object
    name: str
    uid: int

    @property
    def home(self) -> str:
        return f"/home/{self.name}"

    def run(self, *cmd: str, runtime: bool = True, **kwargs):
        env = [f"XDG_RUNTIME_DIR=/run/user/{self.uid}"] if runtime else []
        return self.box.run("runuser", "-u", self.name, "--", "env", *env, *cmd, **kwargs)

    def systemctl(self, *args: str, **kwargs):
        return self.run("systemctl", "--user", *args, **kwargs)


def _user(box, name: str, *, manager: str) -> Person:
    """A new user; manager: "linger" (enable-linger), "started" (user@UID.service started
    by root, as a login does, with no linger) or "none"."""
    box.run("useradd", "--create-home", "--shell", "/bin/sh", name)
    person = Person(box, name, int(box.run("id", "-u", name).stdout))
    if manager == "linger":
        box.run("loginctl", "enable-linger", name)
    elif manager == "started":
        box.run("systemctl", "start", f"user@{person.uid}.service")
    if manager != "none":
        ready = wait_until(lambda: box.run("test", "-S", f"/run/user/{person.uid}/systemd/private",
                                           check=False).returncode == 0, 30, 0.2)
        assert ready, box.run("systemctl", "status", "--no-pager", f"user@{person.uid}.service", check=False).stdout
    return person


@pytest.fixture(scope="module")
def people(box):
    # pam_systemd gives the user manager its XDG_RUNTIME_DIR: without it user@UID.service
    # fails ("$XDG_RUNTIME_DIR is not set"). In the test bed's root file system (mkrootfs.sh).
    box.run("dpkg-query", "-W", "libpam-systemd")
    suffix = next(_names)
    made = {"linger": _user(box, f"ugl{suffix}", manager="linger"),
            "started": _user(box, f"ugs{suffix}", manager="started"),
            "none": _user(box, f"ugn{suffix}", manager="none")}
    yield made
    for person in made.values():
        box.run("loginctl", "disable-linger", person.name, check=False)
        box.run("systemctl", "stop", f"user@{person.uid}.service", check=False)


def _pids(person: Person, name: str, count: int) -> dict[str, int]:
    units = [f"{name}@{i}.service" for i in range(count)]
    values = person.systemctl("show", "-p", "MainPID", "--value", *units).stdout.split()
    return dict(zip(units, map(int, values), strict=True))


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _one_line_error(result, starts: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith(f"unitgen: error: {starts}"), result.stderr
    assert "Traceback" not in result.stderr
    # The last line is the error; a render note before it comes from the render step.
    assert sum(line.startswith("unitgen: error") for line in lines) == 1


def test_user_app_installs_rolls_under_load_scales_logs_and_uninstalls(box, people):
    person = people["linger"]
    name, port = f"u{next(_names)}", free_port()
    unix = f"/run/user/{person.uid}/{name}.sock"  # the user manager creates it in the user's own directory
    marker = person.run("mktemp").stdout.strip()
    bundle = person.run("unitgen", "render", "--app", "lifecycle:app", "--name", name, "--workdir", "/srv/apps",
                        "--cores", "2", "--listen", f"127.0.0.1:{port}", "--listen", unix).stdout
    installed = person.run("unitgen", "install", "--user", "-", input=bundle)
    assert f"see `systemctl --user status {name}.target`" in installed.stderr
    assert person.systemctl("is-active", f"{name}.socket", f"{name}.target").stdout.split() == ["active", "active"]
    assert "WantedBy=default.target" in person.run("cat", f"{person.home}/.config/systemd/user/{name}.target").stdout
    spec = json.loads(person.run("unitgen", "show", "--user", name).stdout)
    assert spec["manager"] == "user"
    assert person.run("test", "-f", f"{person.home}/.local/state/unitgen/{name}.unitgen.json").returncode == 0

    before = _pids(person, name, 2)
    # Load for the whole roll, however long it takes here: wrk stops and reports on SIGINT.
    load = Wrk(f"http://127.0.0.1:{port}/")
    time.sleep(2)
    began = time.monotonic()
    roll = person.run("unitgen", "roll", "--user", name)
    took = time.monotonic() - began
    time.sleep(1)
    assert load.proc.poll() is None, "the load ended before the roll did"
    during = load.stop()
    after = _pids(person, name, 2)
    print(f"{box.suite}: user roll of 2 in {took:.1f} s: {during.requests} requests, {during.failed} failed, "
          f"p99 {during.p99_ms:.2f} ms; pids {before} -> {after}")
    assert f"rolled 2 instances of {name}" in roll.stderr
    assert during.failed == 0, during.output
    assert during.requests > 1000, during.output
    assert all(after[unit] not in (0, before[unit]) for unit in before), (before, after)

    status = json.loads(person.run("unitgen", "status", "--user", name, "--json").stdout)
    assert status["socket"]["state"] == "active" and status["socket"]["listen"] == [f"127.0.0.1:{port}", unix]
    served = person.run("python3", "-c", _GET_OVER_UNIX, unix).stdout
    assert served.startswith("HTTP/1.1 200"), served
    assert [(i["unit"], i["state"], i["pid"]) for i in status["instances"]] == \
        [(unit, "active", pid) for unit, pid in after.items()]
    # The counters files are found below $XDG_RUNTIME_DIR: the load just served shows.
    assert wait_until(lambda: all(i["requests"] for i in json.loads(
        person.run("unitgen", "status", "--user", name, "--json").stdout)["instances"]), 5)
    table = person.run("unitgen", "status", "--user", name).stdout
    assert all(f"{unit}  active/running  {pid}" in table for unit, pid in after.items()), table

    person.run("unitgen", "scale", "--user", name, "3")
    assert person.systemctl("is-active", f"{name}@2.service").stdout.strip() == "active"
    person.run("unitgen", "scale", "--user", name, "1")
    active = person.systemctl("list-units", "--plain", "--no-legend", "--state=active", f"{name}@*").stdout
    assert [line.split()[0] for line in active.splitlines()] == [f"{name}@0.service"]

    logs = person.run("unitgen", "logs", "--user", name, "-n", "200").stdout
    assert f"{name}@0: INFO unitgen.worker: instance 0 serving lifecycle:app" in logs, logs
    assert f"{name}@2: " in logs  # the instance scaled up and down again

    person.run("unitgen", "uninstall", "--user", name)
    assert not _listening(port)
    assert person.run("test", "-e", unix, check=False).returncode == 1
    left = person.run("find", f"{person.home}/.config", f"{person.home}/.local/state", f"/run/user/{person.uid}",
                      "-name", f"{name}*", check=False).stdout.split()
    # No unit, link, saved spec or runtime file is left. The app's own data (StateDirectory=:
    # $XDG_STATE_HOME on 257, $XDG_CONFIG_HOME on 252) stays, as a system uninstall keeps /var/lib.
    assert set(left) <= {f"{person.home}/.local/state/unitgen/{name}", f"{person.home}/.config/unitgen/{name}"}, left
    assert all(person.run("test", "-d", path).returncode == 0 for path in left)
    assert person.systemctl("list-units", "--all", "--plain", "--no-legend", f"{name}*").stdout.strip() == ""
    # Nothing outside the user's own directories was written as the user.
    outside = box.sh(f"find / /run -xdev -user {person.name} -newer {marker} -not -path '{person.home}/*' "
                     f"-not -path '/run/user/{person.uid}/*' -not -path '/proc/*' -not -path {marker} "
                     f"-not -path {person.home} -not -path /run/user/{person.uid} 2>/dev/null",
                     check=False).stdout
    assert outside == "", outside


def test_rendered_user_units_verify_clean_with_the_user_manager(box, people):
    person = people["linger"]
    out = person.run("mktemp", "-d").stdout.strip()
    person.run("unitgen", "render", "--app", "lifecycle:app", "--name", "verified", "--workdir", "/srv/apps",
               "--cores", "2", "--listen", "8123", "--manager", "user", "--memory-max", "256M", "--out", out)
    result = person.run("sh", "-c", f"systemd-analyze --user verify {out}/*.socket {out}/*.service {out}/*.target",
                        check=False)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # root's own user manager is not running here: verify as the user, against the bound golden files.
    golden = person.run("sh", "-c", "systemd-analyze --user verify /srv/golden/user/*.socket "
                        "/srv/golden/user/*.service /srv/golden/user/*.target", check=False)
    assert (golden.returncode, golden.stdout + golden.stderr) == (0, "")


def test_no_linger_is_a_one_line_error_and_installs_nothing(box, people):
    person = people["started"]
    bundle = person.run("unitgen", "render", "--app", "lifecycle:app", "--name", "nolinger", "--workdir",
                        "/srv/apps", "--listen", str(free_port())).stdout
    result = person.run("unitgen", "install", "--user", "-", input=bundle, check=False)
    _one_line_error(result, f"user {person.name} has no linger")
    assert f"loginctl enable-linger {person.name}" in result.stderr
    assert person.run("test", "-e", f"{person.home}/.config/systemd/user/nolinger.target", check=False).returncode


def test_a_privileged_port_is_a_one_line_error_and_installs_nothing(box, people):
    person = people["linger"]
    bundle = person.run("unitgen", "render", "--app", "lifecycle:app", "--name", "port80", "--workdir",
                        "/srv/apps", "--listen", "80").stdout
    result = person.run("unitgen", "install", "--user", "-", input=bundle, check=False)
    _one_line_error(result, "--listen 80: port 80 is below 1024")
    assert "pick a port >= 1024" in result.stderr and "sudo unitgen install" in result.stderr
    assert person.run("test", "-e", f"{person.home}/.config/systemd/user/port80.target", check=False).returncode


def test_no_user_manager_is_a_one_line_error_saying_how_to_get_one(box, people):
    person = people["none"]
    unset = person.run("unitgen", "status", "--user", "x", runtime=False, check=False)
    _one_line_error(unset, "no user manager reachable: XDG_RUNTIME_DIR is not set")
    assert "machinectl shell" in unset.stderr
    gone = person.run("unitgen", "status", "--user", "x", check=False)
    _one_line_error(gone, f"no user manager reachable: /run/user/{person.uid}/systemd/private is not there")
    assert f"loginctl enable-linger {person.name}" in gone.stderr


def test_user_commands_as_root_are_refused(box):
    result = box.run("unitgen", "roll", "--user", "x", check=False)
    _one_line_error(result, "--user manages your own user's units")
