"""The benchmark's test bed: one Debian container booted with real systemd
(tests/e2e/testbed.py), unitgen installed in it from the .deb built from this tree, the
Python peers from Debian's own packages (the same interpreter, uvicorn, httptools and
uvloop for everyone), Node from Debian and PM2 from npm; and the one place that runs
commands, on the host or in the container, logging each with --debug.
"""

from __future__ import annotations

import logging
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/e2e"))

from testbed import Container  # noqa: E402

log = logging.getLogger("bench")

APPS = ROOT / "bench/apps"
APPS_INSIDE = "/srv/bench"
DEBS_INSIDE = "/debs"
# npm inside the container has to trust what the host trusts (a proxy may re-sign TLS).
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
HOST_CA_INSIDE = "/srv/host-ca.crt"
# The peers and what they serve with. --no-install-recommends keeps npm from pulling a
# compiler in; unitgen's own recommends (httptools, uvloop) are named instead.
PACKAGES = ("python3-gunicorn", "python3-uvicorn", "python3-httptools", "python3-uvloop", "python3-flask",
            "nodejs", "npm", "procps")
VERSIONED_PACKAGES = ("unitgen", "systemd", "python3", "python3-uvicorn", "python3-gunicorn", "python3-httptools",
                      "python3-uvloop", "python3-flask", "nodejs")


class BenchError(Exception):
    pass


def _failure(cmd: list[str], result: subprocess.CompletedProcess[str]) -> BenchError:
    tail = "\n".join((result.stderr or result.stdout or "").strip().splitlines()[-5:])
    return BenchError(f'"{shlex.join(cmd)}" returned non-zero exit code {result.returncode}.\n{tail}')


def host(cmd: list[str], *, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """Run cmd on the host and wait for it."""
    log.debug("+ %s", shlex.join(cmd))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise _failure(cmd, result)
    return result


def host_background(cmd: list[str]) -> subprocess.Popen[str]:
    """Start cmd on the host; its standard output is read when it ends."""
    log.debug("+ %s &", shlex.join(cmd))
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def build_deb(out: Path) -> Path:
    """packaging/build-deb, its .deb moved to out (dist/ is shared with the tests)."""
    built = host([str(ROOT / "packaging/build-deb")])
    deb = ROOT / built.stdout.strip().splitlines()[-1]
    return deb.rename(out / deb.name)


class Bed:
    """The booted container; run() executes a command inside it as root."""

    def __init__(self, suite: str, debs: Path) -> None:
        binds = {str(debs): DEBS_INSIDE, str(APPS): APPS_INSIDE}
        if HOST_CA.exists():
            binds[str(HOST_CA)] = HOST_CA_INSIDE
        self.box = Container(suite, binds)
        self.suite = suite

    def boot(self) -> None:
        self.box.boot()

    def shutdown(self) -> None:
        self.box.shutdown()

    def run(self, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        log.debug("+ [%s] %s", self.suite, shlex.join(cmd))
        result = self.box.run(*cmd, check=False, input=input, timeout=timeout)
        if check and result.returncode != 0:
            raise _failure(list(cmd), result)
        return result

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kwargs)

    def install(self, *packages: str) -> None:
        """apt-get install, from Debian's archive or a .deb path inside the container."""
        cmd = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
               "--no-install-recommends", *packages]
        if self.run(*cmd, check=False, timeout=900).returncode != 0:
            self.run("apt-get", "update", "-q", timeout=600)  # the cached package lists may be stale
            self.run(*cmd, timeout=900)

    def install_peers(self) -> str | None:
        """Every peer; None when PM2 installed too, else why it did not."""
        self.install(*PACKAGES)
        return self.install_pm2()

    def install_unitgen(self, deb: Path) -> None:
        self.install(f"{DEBS_INSIDE}/{deb.name}")

    def install_pm2(self) -> str | None:
        """npm install -g pm2; None when it worked, else why it did not."""
        result = self.run("env", f"NODE_EXTRA_CA_CERTS={HOST_CA_INSIDE}", "npm", "install", "-g", "--no-audit",
                          "--no-fund", "--fetch-retries=1", "pm2", check=False, timeout=300)
        if result.returncode == 0:
            return None
        errors = [line for line in (result.stderr + result.stdout).splitlines() if "ERR!" in line]
        return "npm install -g pm2 failed: " + " / ".join(errors[:3] or ["exit code " + str(result.returncode)])

    def versions(self) -> dict[str, str]:
        """What the run ran on: the host, the container and every server's version."""
        found = {
            "machine": _cpu_model(),
            "cores": str(os.cpu_count()),
            "memory": _memory(),
            "kernel": platform.release(),
            "wrk": host(["wrk", "-v"], check=False).stdout.split(" [")[0].strip(),
            "debian": f"{self.suite} " + self.run("cat", "/etc/debian_version").stdout.strip(),
        }
        query = self.run("dpkg-query", "-W", "-f", "${Package}=${Version}\\n", *VERSIONED_PACKAGES, check=False)
        for line in query.stdout.splitlines():
            package, _, version = line.partition("=")
            found[package] = version
        found["systemd"] = self.run("systemctl", "--version").stdout.split("\n")[0]
        found["python3"] = self.run("python3", "--version").stdout.strip()
        found["node"] = self.run("node", "--version", check=False).stdout.strip() or "not installed"
        pm2 = self.run("env", "PM2_HOME=/tmp/pm2-version", "pm2", "--version", check=False)
        found["pm2"] = pm2.stdout.strip().splitlines()[-1] if pm2.returncode == 0 else "not installed"
        return found


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _memory() -> str:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"
