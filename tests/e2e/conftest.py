"""Fixtures: one booted container per Debian release, with unitgen installed in it."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

from helpers import FLAGS, apt_install, unavailable
from testbed import SUITES, Container, TestbedError, free_port, missing_tools

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
_names = itertools.count()


UPGRADE_VERSION = "0.1.0+upgrade1"


def build_deb(*args: str) -> Path:
    result = subprocess.run([str(ROOT / "packaging/build-deb"), *args], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"packaging/build-deb failed:\n{result.stderr}", pytrace=False)
    return ROOT / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The .deb built from this tree ("current"), and the same as a newer version ("upgrade")."""
    out = tmp_path_factory.mktemp("debs")
    built = {}
    for role, args in (("current", ()), ("upgrade", ("--version", UPGRADE_VERSION))):
        deb = build_deb(*args)
        built[role] = deb.rename(out / deb.name)
    return built


@pytest.fixture(scope="session", params=list(SUITES))
def box(request: pytest.FixtureRequest, debs: dict[str, Path]):
    if os.geteuid() != 0:
        unavailable("the e2e tests boot containers and must run as root")
    if missing_tools():
        unavailable(f"missing {', '.join(missing_tools())}: apt-get install systemd-container debootstrap util-linux")
    binds = {str(debs["current"].parent): "/debs", str(HERE / "apps"): "/srv/apps",
             str(ROOT / "examples"): "/srv/examples",
             str(ROOT / "tests/golden"): "/srv/golden"}
    try:
        container = Container(request.param, binds)
        container.boot()
    except TestbedError as err:
        unavailable(str(err))
    try:
        # The whole suite runs against the installed package, not the source tree.
        apt_install(container, f"/debs/{debs['current'].name}")
        yield container
    finally:
        container.shutdown()


class App:
    """One app installed with unitgen in a container; uninstalled at teardown."""

    def __init__(self, box: Container, name: str, port: int) -> None:
        self.box, self.name, self.port = box, name, port
        self.url = f"http://127.0.0.1:{port}"

    def show(self, unit: str, prop: str) -> str:
        return self.box.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()

    def instance_pids(self) -> set[int]:
        out = self.box.sh(f"systemctl show -p MainPID --value '{self.name}@*.service'").stdout
        return {int(pid) for pid in out.split() if pid != "0"}


@pytest.fixture
def deploy(box: Container):
    """deploy(app_spec, *render_args, start=True) -> App, rendered and installed in box."""
    installed: list[App] = []

    def _deploy(app: str, *args: str, start: bool = True, workdir: str = "/srv/apps") -> App:
        name = f"t{next(_names)}"
        port = free_port()
        render = ["unitgen", "render", "--app", app, "--name", name, "--listen", f"127.0.0.1:{port}",
                  "--workdir", workdir, *args]
        bundle = box.run(*render).stdout
        install = ["unitgen", "install", "-"] + (["--no-start"] if not start else [])
        installed.append(App(box, name, port))
        box.run(*install, input=bundle)
        return installed[-1]

    yield _deploy
    for app in installed:
        box.run("unitgen", "uninstall", app.name, check=False)


@pytest.fixture
def flags(box):
    box.run("mkdir", "-p", FLAGS)
    yield lambda name: box.run("touch", f"{FLAGS}/{name}")
    box.run("rm", "-rf", FLAGS)
