"""Small helpers for the e2e tests."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from testbed import Container

FLAGS = "/run/unitgen-test"  # flag files that make the lifecycle app fail on purpose


def unavailable(message: str) -> None:
    """No test bed: a failure, unless a developer opted out outside CI."""
    if os.environ.get("UNITGEN_E2E") == "skip" and os.environ.get("CI") != "true":
        pytest.skip(message)
    pytest.fail(f"the e2e test bed cannot start: {message}", pytrace=False)


def wait_until(predicate, timeout: float, step: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    return None


def restarted(app, unit: str, old_pid: int):
    """The new MainPID once unit is active again with another process."""
    def check():
        # `--value` prints in systemd's property order, not ours: read KEY=VALUE.
        out = app.box.run("systemctl", "show", "-p", "ActiveState", "-p", "MainPID", unit).stdout
        props = dict(line.split("=", 1) for line in out.splitlines())
        pid = int(props["MainPID"])
        return pid if props["ActiveState"] == "active" and pid not in (0, old_pid) else None
    return check


def apt_install(container: Container, *debs: str) -> None:
    """apt-get install ./x.deb, pulling the dependencies from Debian's archive."""
    cmd = ["apt-get", "install", "-y", "-q", "--allow-downgrades", *debs]
    env = ["env", "DEBIAN_FRONTEND=noninteractive"]
    if container.run(*env, *cmd, check=False, timeout=600).returncode != 0:
        container.run("apt-get", "update", "-q", timeout=600)  # package lists may be stale
        container.run(*env, *cmd, timeout=600)
