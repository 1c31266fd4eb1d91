"""Issue 2 end to end, under real systemd 252 (Debian 12) and 257 (Debian 13)."""

from __future__ import annotations

import os
import re
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

pytestmark = pytest.mark.e2e
CLOSE = {"Connection": "close"}  # a new connection per request: any instance may take it


def test_golden_units_verify_clean(box):
    for case in box.run("ls", "/srv/golden").stdout.split():
        result = box.sh(f"systemd-analyze verify /srv/golden/{case}/*.socket /srv/golden/{case}/*.service "
                        f"/srv/golden/{case}/*.target", check=False)
        assert (result.returncode, result.stdout + result.stderr) == (0, ""), f"{case} on {box.suite}"


def test_two_instances_share_one_port(box, deploy):
    app = deploy("hello:app", "--cores", "2", workdir="/srv/examples")
    for unit in (f"{app.name}.socket", f"{app.name}@0.service", f"{app.name}@1.service", f"{app.name}.target"):
        assert app.show(unit, "ActiveState") == "active", unit
    pids = set()
    for _ in range(200):
        response = requests.get(app.url, headers=CLOSE, timeout=10)
        assert response.status_code == 200
        pids.add(int(response.headers["x-worker-pid"]))
    assert pids == app.instance_pids()
    assert len(pids) == 2


def test_cores_auto_is_one_instance_per_usable_cpu(box, deploy):
    cpus = int(box.run("nproc").stdout)
    app = deploy("hello:app", "--cores", "auto", workdir="/srv/examples")
    wants = app.show(f"{app.name}.target", "Wants").split()
    assert sorted(wants) == sorted(f"{app.name}@{i}.service" for i in range(cpus))
    assert len(app.instance_pids()) == cpus


@pytest.mark.parametrize("limit,expected", [
    ("CPUAffinity=1", 1), ("CPUAffinity=0-1", 2), ("CPUQuota=100%", 1), ("CPUQuota=50%", 1), ("CPUQuota=150%", 2)])
def test_cores_auto_follows_a_real_cpu_limit(box, limit, expected):
    # Fixed expectations, never nproc (which reads the same affinity mask as unitgen).
    assert int(box.run("nproc").stdout) == 2, "these cases assume a 2-CPU machine"
    if limit.startswith("CPUQuota") and "cpu" not in box.run("cat", "/sys/fs/cgroup/cgroup.controllers").stdout.split():
        # This host runs cgroup v1, so the containers' cgroup v2 tree has no cpu
        # controller: systemd cannot enforce CPUQuota= and 2 CPUs really are usable.
        pytest.skip("the test bed has no cgroup v2 cpu controller (host on cgroup v1); see test_spec's cpu.max tests")
    out = box.run("systemd-run", "--wait", "--pipe", "-q", "-p", limit, "unitgen", "render", "--no-check",
                  "--app", "x:app", "--name", "cores", "--cores", "auto").stdout
    wants = re.search(r"^Wants=(.*)$", out, re.M).group(1).split()
    assert len(wants) == expected, (limit, wants)


@pytest.mark.parametrize("module", ["flaskapp", "starletteapp"])
def test_wsgi_and_asgi_apps_serve_correctly(box, deploy, module):
    app = deploy(f"{module}:app", "--cores", "2")
    body = os.urandom(10 * 1024 * 1024)
    echoed = requests.post(f"{app.url}/echo", data=body, timeout=60)
    assert echoed.status_code == 200
    assert echoed.content == body

    with requests.get(f"{app.url}/stream", stream=True, timeout=30) as streamed:
        assert streamed.headers.get("transfer-encoding") == "chunked"
        assert streamed.text == "".join(f"chunk {i}\n" for i in range(100))

    for code in (201, 404, 418, 500):
        assert requests.get(f"{app.url}/status/{code}", timeout=10).status_code == code
    headers = requests.get(f"{app.url}/headers", headers={"X-Test": "abc 42"}, timeout=10)
    assert headers.headers["x-echo"] == "abc 42"
    assert headers.headers["x-interface"] == ("wsgi" if module == "flaskapp" else "asgi")


def test_start_waits_for_lifespan_startup_and_fails_no_request(box, deploy):
    app = deploy("slowstart:app", "--cores", "2", start=False)
    box.run("systemctl", "start", f"{app.name}.socket")
    with ThreadPoolExecutor(20) as pool:
        # Connections made before any instance is ready queue in the socket.
        pending = [pool.submit(requests.get, app.url, headers=CLOSE, timeout=30) for _ in range(20)]
        began = time.monotonic()
        box.run("systemctl", "start", f"{app.name}.target")
        took = time.monotonic() - began
        statuses = [future.result().status_code for future in pending]
    assert took >= 2.0, f"systemctl start returned after {took:.2f}s, before the 2 s startup"
    assert statuses == [200] * 20
    for i in range(2):
        assert app.show(f"{app.name}@{i}.service", "ActiveState") == "active"


def test_user_module_named_worker_loads(box, deploy):
    app = deploy("worker:app", "--cores", "1")
    assert requests.get(app.url, timeout=10).text == "the user's own worker module\n"


def test_import_error_exits_78_once_with_one_line(box, deploy):
    app = deploy("nosuchmodule:app", "--cores", "1", "--no-check", start=False)
    unit = f"{app.name}@0.service"
    assert box.run("systemctl", "start", unit, check=False).returncode != 0
    time.sleep(3)  # longer than RestartSec=: a restart would have happened by now
    assert app.show(unit, "ExecMainStatus") == "78"
    assert app.show(unit, "NRestarts") == "0"
    assert app.show(unit, "ActiveState") == "failed"
    lines = box.run("journalctl", f"_SYSTEMD_UNIT={unit}", "-o", "cat", "--no-pager").stdout.splitlines()
    assert lines == ["unitgen-worker: cannot import 'nosuchmodule': No module named 'nosuchmodule'"]


def test_bad_input_installs_nothing(box):
    before = box.run("ls", "/etc/systemd/system").stdout
    for bad in ("--app nocolon", "--app hello:app --cores 0", "--app hello:app --name 'a/b'",
                "--app hello:app --env 'A B=1'", "--app hello:app --listen 1.2.3:80"):
        result = box.sh(f"cd /srv/examples && unitgen render {bad} | unitgen install -", check=False)
        assert result.returncode != 0
        errors = result.stderr.strip().splitlines()
        assert len(errors) == 2 and all(e.startswith("unitgen: error: ") for e in errors), result.stderr
    assert box.run("ls", "/etc/systemd/system").stdout == before


def test_uninstall_leaves_nothing(box, deploy):
    app = deploy("hello:app", "--cores", "2", workdir="/srv/examples")
    assert requests.get(app.url, timeout=10).status_code == 200
    pids = app.instance_pids()
    box.run("unitgen", "uninstall", app.name)
    assert box.sh(f"ls /etc/systemd/system | grep -c '^{app.name}[.@]' || true").stdout.strip() == "0"
    assert box.sh(f"ls /etc/systemd/system/*/ | grep -c '^{app.name}[.@]' || true").stdout.strip() == "0"
    for pid in pids:
        assert box.run("test", "-e", f"/proc/{pid}", check=False).returncode != 0
    assert box.run("pgrep", "-f", "unitgen_worker", check=False).stdout == ""
    # The backoff's runtime directory goes too (a DynamicUser= one lives under /run/private).
    for leftover in (f"/run/unitgen/{app.name}", f"/run/private/unitgen/{app.name}",
                     f"/etc/systemd/system/{app.name}.unitgen.json"):
        assert box.run("test", "-e", leftover, check=False).returncode != 0, leftover
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", app.port), timeout=5)
