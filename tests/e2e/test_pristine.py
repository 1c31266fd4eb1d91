"""Setup proven on pristine Debian 12 and 13: a root file system with systemd and nothing
else (no python3, no compiler; tests/e2e/mkpristine.sh), booted with systemd as PID 1.

1. tests/bootstrap --host-only installs what it needs with apt, makes .venv (building
   systemd-python), is a no-op the second time, and the unit tests pass in there.
2. With python3 and python3-venv only (no compiler), `pip install` of the wheel built
   from this tree works, and the worker serves under real systemd on the pure-Python
   sd_notify/sd_listen_fds.

The tree copied in is what git has or would add (tracked and untracked, not ignored), as
it is in the work tree now: no .venv, no build output.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import testbed
from helpers import unavailable
from testbed import SUITES, Container, free_port, missing_tools

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
# Not under /etc/ssl/certs: there is none before ca-certificates is installed, and
# update-ca-certificates would then rehash our bind mount along with its own files.
CA_INSIDE = "/etc/host-ca.crt"
PIP_ENV = ["env", f"PIP_CERT={CA_INSIDE}", "PIP_DISABLE_PIP_VERSION_CHECK=1", "PIP_DEFAULT_TIMEOUT=180",
           "HOME=/root"]
APT_ENV = ["env", "DEBIAN_FRONTEND=noninteractive"]
VENV = "/opt/unitgen"  # the no-compiler container's venv


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A clean copy of the checkout."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout
    dest = tmp_path_factory.mktemp("tree") / "unitgen"
    for name in filter(None, listed.split(b"\0")):
        source = ROOT / os.fsdecode(name)
        if source.is_file():  # listed but deleted in the work tree: not part of it
            (dest / os.fsdecode(name)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / os.fsdecode(name))  # keeps the executable bits
    return dest


@pytest.fixture(scope="module")
def wheel(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of this tree, built on the host (pip builds in the source: a scratch copy)."""
    scratch = tmp_path_factory.mktemp("wheel-src") / "unitgen"
    shutil.copytree(tree, scratch)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(scratch)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    (built,) = out.glob("unitgen-*.whl")
    return built


def boot_pristine(suite: str, binds: dict[str, str]) -> Container:
    """A booted pristine container; the caller powers it off."""
    if os.geteuid() != 0:
        unavailable("the e2e tests boot containers and must run as root")
    if missing_tools():
        unavailable(f"missing {', '.join(missing_tools())}: apt-get install systemd-container debootstrap")
    box = Container(suite, {**binds, HOST_CA: CA_INSIDE}, flavour="pristine")
    try:
        box.boot()
    except testbed.TestbedError as err:  # not imported by name: pytest would collect Test*
        box.shutdown()
        unavailable(str(err))
    try:
        # Pristine indeed: whatever is used below was installed by the test or by bootstrap.
        assert box.sh("command -v python3 gcc cc curl", check=False).stdout == ""
    except BaseException:
        box.shutdown()
        raise
    return box


@pytest.fixture
def pristine():
    """pristine(suite, binds) -> a booted pristine container, powered off at teardown."""
    booted: list[Container] = []

    def boot(suite: str, binds: dict[str, str]) -> Container:
        booted.append(boot_pristine(suite, binds))
        return booted[-1]

    yield boot
    for box in booted:
        box.shutdown()


def timed(label: str, started: float) -> None:
    print(f"{label}: {time.monotonic() - started:.0f} s", file=sys.stderr)


@dataclass(frozen=True)
class Bootstrapped:
    first: str  # bootstrap's stderr, the first time and the second
    again: str
    backend: str  # worker/sd.py's implementation in .venv
    tests: str  # pytest's output


def bootstrap_and_unit_tests(suite: str, tree: Path) -> Bootstrapped:
    started = time.monotonic()
    box = boot_pristine(suite, {str(tree): "/src"})
    try:
        # Its own copy on the container's overlay: bootstrap writes .venv into the checkout.
        # Under /srv, not /root (0700): tests/unit/test_dev.py runs the checkout's worker as
        # nobody, and a skip fails this test.
        box.run("cp", "-a", "/src", "/srv/unitgen")
        first = box.run(*PIP_ENV, "/srv/unitgen/tests/bootstrap", "--host-only", timeout=1200).stderr
        timed(f"{suite}: bootstrap --host-only", started)
        again = box.run(*PIP_ENV, "/srv/unitgen/tests/bootstrap", "--host-only", timeout=120).stderr
        backend = box.run("/srv/unitgen/.venv/bin/python", "-c", "from unitgen_worker import sd; print(sd.BACKEND)")
        tests = box.sh("cd /srv/unitgen && HOME=/root .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit",
                       timeout=1200).stdout
        timed(f"{suite}: unit tests", started)
        return Bootstrapped(first, again, backend.stdout.strip(), tests)
    finally:
        box.shutdown()


@pytest.fixture(scope="module")
def bootstraps(request: pytest.FixtureRequest, tree: Path) -> Iterator[dict[str, Future[Bootstrapped]]]:
    """Every selected suite's bootstrap and unit tests, run side by side from the first
    test that asks: apt and pip wait on the network, the tests on a core each (CI ran
    them one after the other: 212 + 197 s)."""
    suites = [item.callspec.params["suite"] for item in request.session.items
              if getattr(item, "originalname", "") == "test_bootstrap_host_part_and_unit_tests"]
    with ThreadPoolExecutor(max(1, len(suites))) as pool:
        yield {suite: pool.submit(bootstrap_and_unit_tests, suite, tree) for suite in suites}


@pytest.mark.parametrize("suite", list(SUITES))
def test_bootstrap_host_part_and_unit_tests(suite: str, bootstraps: dict[str, Future[Bootstrapped]]) -> None:
    run = bootstraps[suite].result()
    assert re.search(r"^\+ apt-get install .*python3-venv.*python3-dev.*libsystemd-dev", run.first, re.M)
    assert "+ python3 -m venv .venv" in run.first
    # Idempotent: the second run finds everything there and says nothing.
    assert run.again == ""
    assert run.backend == "libsystemd"  # systemd-python was built and is used
    # Every unit test, including both implementations of worker/sd.py.
    summary = run.tests.strip().splitlines()[-1]
    assert re.match(r"=* ?\d+ passed", summary) and "skipped" not in summary, run.tests
    print(f"{suite}: {summary.strip('= ')}")


def get(port: int) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.mark.parametrize("suite", list(SUITES))
def test_wheel_without_compiler_serves_under_systemd(suite: str, tree: Path, wheel: Path, pristine) -> None:
    started = time.monotonic()
    box = pristine(suite, {str(wheel.parent): "/wheels", str(tree / "examples"): "/srv/examples"})
    box.run(*APT_ENV, "apt-get", "update", "-q", timeout=600)
    box.run(*APT_ENV, "apt-get", "install", "-y", "-q", "python3", "python3-venv", timeout=600)
    assert box.sh("command -v gcc cc c99 clang", check=False).stdout == ""  # no compiler at all
    box.run("python3", "-m", "venv", VENV)
    box.run(*PIP_ENV, f"{VENV}/bin/pip", "install", "-q", f"/wheels/{wheel.name}", timeout=600)
    timed(f"{suite}: python3 + pip install of the wheel", started)
    unitgen = f"{VENV}/bin/unitgen"
    assert box.run(unitgen, "--version").stdout.strip() == "unitgen 0.1.0"
    probe = "import importlib.util as u; from unitgen_worker import sd; print(u.find_spec('systemd'), sd.BACKEND)"
    assert box.run(f"{VENV}/bin/python", "-c", probe).stdout.split() == ["None", "python"]

    port = free_port()  # the container shares the host's network namespace
    # WatchdogSec=1: an instance whose pings (pure-Python sd_notify) did not arrive
    # would be killed and restarted within the 3 seconds looked at below.
    bundle = box.run(unitgen, "render", "--no-check", "--app", "hello:app", "--name", "hello", "--cores", "2",
                     "--listen", f"127.0.0.1:{port}", "--workdir", "/srv/examples", "--python", f"{VENV}/bin/python",
                     "--watchdog", "1").stdout
    box.run(unitgen, "install", "-", input=bundle, timeout=120)  # returns once both sent READY=1
    for _ in range(20):
        status, body = get(port)
        assert status == 200 and body.startswith("hello from pid "), (status, body)
    before = json.loads(box.run(unitgen, "status", "hello", "--json").stdout)["instances"]
    time.sleep(3)
    after = json.loads(box.run(unitgen, "status", "hello", "--json").stdout)["instances"]
    assert [(i["state"], i["restarts"]) for i in after] == [("active", 0)] * 2, after
    assert [i["pid"] for i in after] == [i["pid"] for i in before]
    # READY=1 came (install waited for it); STATUS= reached systemd too.
    for unit in ("hello@0.service", "hello@1.service"):
        assert box.run("systemctl", "show", "-p", "StatusText", "--value", unit).stdout.strip(), unit
    box.run(unitgen, "uninstall", "hello", timeout=120)  # drains: STOPPING=1, exit 0
    assert box.run("systemctl", "is-active", "hello.socket", check=False).stdout.strip() == "inactive"
    timed(f"{suite}: served under systemd", started)
