"""Issue 8 end to end: no path to root, sandboxed instances, names that cannot clobber
the system, client filtering, a socket that survives a crash storm. Real systemd 252
and 257, the installed .deb, attacked as the app's own user would."""

from __future__ import annotations

import re
import socket
import time

import pytest
import requests

from helpers import FLAGS, wait_until
from load import Wrk

pytestmark = pytest.mark.e2e
APP_USER = "appuser"
VENV_APP = "/srv/venvapp"


@pytest.fixture
def venv_app(box):
    """An app in a virtualenv under /srv that its own user owns, with a .pth file that
    records the uid of every interpreter that starts from that venv."""
    box.sh(f"id {APP_USER} >/dev/null 2>&1 || useradd --system --home-dir {VENV_APP} --shell /usr/sbin/nologin "
           f"{APP_USER}")
    box.sh(f"rm -rf {VENV_APP} /srv/probe && mkdir -p {VENV_APP} /srv/probe && cp /srv/examples/hello.py {VENV_APP}/ "
           f"&& chown -R {APP_USER}: {VENV_APP} /srv/probe")
    # --system-site-packages: uvicorn and unitgen_worker come from Debian and the .deb.
    box.run("runuser", "-u", APP_USER, "--", "python3", "-m", "venv", "--system-site-packages", f"{VENV_APP}/.venv")
    site = box.run("runuser", "-u", APP_USER, "--", f"{VENV_APP}/.venv/bin/python", "-c",
                   "import site; print(site.getsitepackages()[0])").stdout.strip()
    probe = "import os; open('/srv/probe/uids', 'a').write(f'{os.getuid()} {os.getpid()}\\n')\n"
    box.run("runuser", "-u", APP_USER, "--", "tee", f"{site}/zz-probe.pth", input=probe)
    yield f"{VENV_APP}/.venv/bin/python"
    box.run("rm", "-rf", VENV_APP, "/srv/probe")


def probe_uids(box) -> list[int]:
    text = box.run("cat", "/srv/probe/uids", check=False).stdout
    return [int(line.split()[0]) for line in text.splitlines()]


def test_a_pth_file_in_the_apps_venv_never_runs_as_root(box, deploy, venv_app):
    uid = int(box.run("id", "-u", APP_USER).stdout)
    box.run("tee", "/etc/systemd/system/alert@.service",
            input="[Service]\nType=oneshot\nExecStart=/bin/true\n")
    box.run("systemctl", "daemon-reload")
    # Rendered as root: the render-time import check runs as the app's user too.
    app = deploy("hello:app", "--cores", "2", "--python", venv_app, "--user", APP_USER,
                 "--on-failure", "alert@%n.service", "--writable", "/srv/probe", workdir=VENV_APP)
    unit = f"{app.name}@0.service"
    assert requests.get(app.url, timeout=10).status_code == 200
    box.run("systemctl", "restart", unit)
    pid = int(app.show(unit, "MainPID"))
    box.run("kill", "-9", str(pid))  # a failure: the root alert helper runs
    assert wait_until(lambda: app.show(unit, "ActiveState") == "active" and app.show(unit, "MainPID") != str(pid),
                      timeout=15)
    box.run("systemctl", "stop", unit)
    box.run("systemctl", "start", unit)
    uids = probe_uids(box)
    # The probe is live (every worker and backoff helper start from the venv ran it)...
    assert uids.count(uid) >= 8, uids
    # ...and never as root: not the helpers, not the alert, not render's check.
    assert set(uids) == {uid}, uids
    box.run("rm", "-f", "/etc/systemd/system/alert@.service")


def test_install_refuses_a_root_helper_the_apps_user_can_write(box, venv_app):
    before = box.run("ls", "-R", "/etc/systemd/system").stdout
    render = (f"unitgen render --no-check --app hello:app --name tvenv --workdir {VENV_APP} --python {venv_app} "
              f"--user {APP_USER} --on-failure alert@%n.service --helper-python {venv_app}")
    result = box.sh(f"{render} | unitgen install - --no-start", check=False)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [result.stderr.strip()], result.stderr  # one line
    assert "alert helper's interpreter" in result.stderr and result.stderr.startswith("unitgen: error: ")
    assert box.run("ls", "-R", "/etc/systemd/system").stdout == before
    assert probe_uids(box) == []  # the probe of the helper's interpreter ran nothing from the venv


def test_install_refuses_root_instances_and_sockets_in_directories_others_write(box):
    box.sh("mkdir -p /srv/open && chmod 1777 /srv/open")
    for args, expected in (
        (["--user", "root"], "--user root: the instances would run as root"),
        (["--user", "0"], "--user root: the instances would run as root"),
        (["--listen", "/srv/open/app.sock"], "/srv/open is writable by its group or by others"),
        (["--on-failure", "x.service", "--helper-script", "/srv/open/alert.py"], "alert helper"),
    ):
        bundle = box.run("unitgen", "render", "--no-check", "--app", "x:app", "--name", "zzroot", *args).stdout
        result = box.run("unitgen", "install", "-", "--no-start", input=bundle, check=False)
        assert result.returncode != 0 and len(result.stderr.splitlines()) == 1, result.stderr
        assert expected in result.stderr, result.stderr
    assert box.run("test", "-e", "/etc/systemd/system/zzroot.socket", check=False).returncode != 0


def test_render_as_root_imports_the_app_in_a_transient_unit(box):
    result = box.run("unitgen", "render", "--app", "nosuchmodule:app", "--workdir", "/srv/apps", check=False)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        "unitgen: error: --app nosuchmodule:app does not load in /srv/apps: cannot import 'nosuchmodule': No module "
        "named 'nosuchmodule'; fix the module, --workdir, --python or --env, or pass --no-check to render for "
        "another host"], result.stderr
    ok = box.run("unitgen", "render", "--app", "stateapp:app", "--workdir", "/srv/apps")
    assert ok.stderr == "" and "==> stateapp.socket <==" in ok.stdout


SYSTEM_UNITS = ["dbus.service", "dbus.socket", "ssh.service", "systemd-journald.service",
                "systemd-journald.socket", "multi-user.target"]


def test_system_unit_names_are_refused_and_nothing_is_written(box):
    before = box.run("ls", "-lR", "/etc/systemd/system").stdout
    states = box.run("systemctl", "is-active", *SYSTEM_UNITS, check=False).stdout.split()
    assert states == ["active"] * len(SYSTEM_UNITS), states
    for name in ("dbus", "ssh", "systemd-journald", "multi-user", "default"):
        piped = box.sh(f"unitgen render --no-check --app x:app --name {name} | unitgen install - --no-start",
                       check=False)
        assert piped.returncode != 0
        assert all(line.startswith("unitgen: error: ") for line in piped.stderr.splitlines()), piped.stderr
        # install's own check, whatever render lets through: a bundle renamed by hand.
        bundle = box.run("unitgen", "render", "--no-check", "--app", "x:app", "--name", "zzname").stdout
        result = box.run("unitgen", "install", "-", "--no-start", input=bundle.replace("zzname", name), check=False)
        assert result.returncode != 0
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("unitgen: error: "), result.stderr
    assert box.run("ls", "-lR", "/etc/systemd/system").stdout == before
    assert box.run("systemctl", "is-active", *SYSTEM_UNITS, check=False).stdout.split() == states


def test_a_unit_in_another_directory_of_the_search_path_is_not_shadowed(box):
    box.sh("mkdir -p /run/systemd/system && printf '[Unit]\\nDescription=theirs\\n' > /run/systemd/system/zzrun.target")
    try:
        bundle = box.run("unitgen", "render", "--no-check", "--app", "x:app", "--name", "zzrun").stdout
        result = box.run("unitgen", "install", "-", "--no-start", input=bundle, check=False)
        assert result.returncode != 0
        assert "/run/systemd/system/zzrun.target exists and was not written by unitgen" in result.stderr
        assert box.run("test", "-e", "/etc/systemd/system/zzrun.socket", check=False).returncode != 0
    finally:
        box.run("rm", "-f", "/run/systemd/system/zzrun.target")


def test_another_apps_name_needs_replace(box, deploy):
    app = deploy("hello:app", "--cores", "1", workdir="/srv/examples")
    other = box.run("unitgen", "render", "--app", "stateapp:app", "--name", app.name, "--workdir", "/srv/apps",
                    "--listen", f"127.0.0.1:{app.port}", "--cores", "1").stdout
    refused = box.run("unitgen", "install", "-", input=other, check=False)
    assert refused.returncode != 0 and len(refused.stderr.splitlines()) == 1
    assert "is installed for hello:app in /srv/examples, not stateapp:app in /srv/apps" in refused.stderr
    assert "hello from pid" in requests.get(app.url, timeout=5).text
    box.run("unitgen", "install", "-", "--replace", input=other)
    box.run("unitgen", "roll", app.name)
    assert requests.get(app.url, timeout=5).text.startswith("count 1 uid ")
    assert '"app": "stateapp:app"' in box.run("unitgen", "show", app.name).stdout


def test_exposure_is_2_or_less(box, deploy):
    for args in ((), ("--user", "www-data")):
        app = deploy("hello:app", "--cores", "1", *args, workdir="/srv/examples")
        out = box.run("systemd-analyze", "security", "--no-pager", f"{app.name}@0.service").stdout
        exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", out).group(1))
        print(f"{box.suite}: exposure {exposure} with {args or 'a dynamic user'}")
        assert exposure <= 2.0, out


def test_an_app_writes_its_state_directory_and_writable_paths_only(box, deploy):
    box.sh("mkdir -p /srv/writable /srv/outside && chmod 0777 /srv/writable /srv/outside && rm -f /srv/writable/file")
    app = deploy("stateapp:app", "--cores", "2", "--writable", "/srv/writable",
                 "--env", "WRITABLE_FILE=/srv/writable/file")
    counts = [requests.get(app.url, headers={"Connection": "close"}, timeout=5).text for _ in range(4)]
    assert [c.split()[1] for c in counts] == ["1", "2", "3", "4"], counts  # one directory for every instance
    uid = counts[0].split()[3]
    assert uid != "0"
    assert requests.get(f"{app.url}/writable", timeout=5).text == "size 1"
    assert requests.get(f"{app.url}/tmp", timeout=5).text == "tmp ok"
    # The state survives a roll, and the app's user cannot write elsewhere (read-only system).
    box.run("unitgen", "roll", app.name)
    assert requests.get(app.url, timeout=5).text.startswith("count 5 ")
    # A directory anyone may write, but not listed: the read-only system holds.
    assert requests.get(f"{app.url}/outside", timeout=5).text == "denied: Read-only file system"
    box.run("unitgen", "uninstall", app.name)
    assert box.sh(f"cat /var/lib/unitgen/{app.name}/count").stdout == "5"  # the app's data stays
    box.sh(f"rm -rf /var/lib/unitgen/{app.name} /var/lib/private/unitgen/{app.name}")


def test_an_app_on_a_unix_socket_serves_sandboxed(box, deploy):
    path = "/run/unitgen-test-app.sock"
    app = deploy("hello:app", "--cores", "2", "--listen", path, workdir="/srv/examples")
    out = box.run("curl", "-sf", "--unix-socket", path, "http://app/").stdout
    assert out.startswith("hello from pid")
    assert app.show(f"{app.name}@0.service", "ProtectSystem") == "strict"


def client(source: str, port: int) -> bool:
    """True if a request from source address gets a response."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3, source_address=(source, 0)) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            return conn.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def test_clients_outside_allow_get_no_response(box, deploy):
    app = deploy("hello:app", "--cores", "1", "--allow", "127.0.0.1/32", workdir="/srv/examples")
    assert client("127.0.0.1", app.port)
    assert not client("127.0.0.2", app.port)
    denied = deploy("hello:app", "--cores", "1", "--deny", "127.0.0.2", workdir="/srv/examples")
    assert client("127.0.0.1", denied.port)
    assert not client("127.0.0.2", denied.port)


def test_eight_instances_crash_looping_under_load_never_fail_the_socket(box, deploy, flags):
    app = deploy("lifecycle:app", "--cores", "8")
    socket_unit = f"{app.name}.socket"
    since = app.show(socket_unit, "ActiveEnterTimestampMonotonic")
    flags("fail-startup-all")
    load = Wrk(f"{app.url}/", seconds=20, headers={"Connection": "close"})
    time.sleep(0.5)
    box.run("unitgen", "roll", "--all-at-once", app.name, check=False)  # the broken release everywhere
    time.sleep(12)
    assert app.show(socket_unit, "ActiveState") == "active"
    assert sum(int(app.show(f"{app.name}@{i}.service", "NRestarts")) for i in range(8)) >= 16
    box.run("rm", f"{FLAGS}/fail-startup-all")  # the fix
    began = time.monotonic()
    box.run("unitgen", "roll", app.name)
    print(f"{box.suite}: roll after the fix {time.monotonic() - began:.1f} s")
    load.result()
    socket_props = box.run("systemctl", "show", "-p", "ActiveState,Result,ActiveEnterTimestampMonotonic",
                           socket_unit).stdout.split()
    assert sorted(socket_props) == sorted(["ActiveState=active", "Result=success",
                                           f"ActiveEnterTimestampMonotonic={since}"])
    pids = {requests.get(app.url, headers={"Connection": "close"}, timeout=10).headers["x-worker-pid"]
            for _ in range(400)}
    assert len(pids) == 8, pids
