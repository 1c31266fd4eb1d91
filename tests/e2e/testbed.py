"""Real systemd as PID 1 of a Debian container (systemd-nspawn), for the e2e tests.

Root file systems are built once by mkrootfs.sh (mkpristine.sh for the "pristine"
flavour) and cached outside the checkout (UNITGEN_TESTBED_CACHE, default
/var/cache/unitgen-testbed). Each boot runs on a throwaway overlay
(--volatile=overlay), so the cache is never changed by a test. The container shares
the host's network namespace: a socket unit listening on 127.0.0.1:PORT inside is
reachable from the test on the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("UNITGEN_TESTBED_CACHE", "/var/cache/unitgen-testbed"))
# Debian release -> the systemd version it ships.
SUITES = {"bookworm": 252, "trixie": 257}
# Flavour of root file system -> the script that builds it, and its cache name after SUITE:
# "e2e" has what the e2e test apps import, "pristine" only what booting needs.
FLAVOURS = {"e2e": ("mkrootfs.sh", ""), "pristine": ("mkpristine.sh", "-pristine")}
CLEAN_ENV = ["env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]


class TestbedError(Exception):
    pass


def missing_tools() -> list[str]:
    return [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter") if shutil.which(tool) is None]


def ensure_rootfs(suite: str, flavour: str = "e2e") -> Path:
    """The cached root file system of suite, built on first use (about 2 minutes)."""
    script, suffix = FLAVOURS[flavour]
    name = suite + suffix
    rootfs = CACHE / name
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stamp = hashlib.sha256((HERE / script).read_bytes()).hexdigest()
        try:
            current = (rootfs / ".unitgen-rootfs").read_text().strip()
        except OSError:
            current = ""
        if current != stamp:
            log = CACHE / f"{name}.log"
            with open(log, "w") as out:
                result = subprocess.run([str(HERE / script), suite, str(rootfs)],
                                        stdout=out, stderr=subprocess.STDOUT)
            if result.returncode != 0:
                raise TestbedError(f"debootstrap of {name} failed; see {log}")
    return rootfs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


class Container:
    """One booted container; run() executes a command inside it as root."""

    def __init__(self, suite: str, binds: dict[str, str], flavour: str = "e2e", *,
                 name: str | None = None, persistent: Path | None = None) -> None:
        """name: the machine's name (default unitgen-SUITE-PID), for several at once.
        persistent: a directory of this container's own where an overlay of the cached
        root file system keeps its changes across power-offs (upper/, work/, merged/),
        instead of the throwaway --volatile=overlay; boot() again after power_off()."""
        self.suite = suite
        self.systemd_version = SUITES[suite]
        self.rootfs = ensure_rootfs(suite, flavour)
        self.binds = binds
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.machine = name or f"unitgen-{suite}-{os.getpid()}"
        self.console = CACHE / (f"{name}-{os.getpid()}.console.log" if name else f"{suite}-{os.getpid()}.console.log")
        self.persistent = persistent
        self.root = self.rootfs
        if persistent is not None:
            self.root = persistent / "merged"
            for sub in ("upper", "work", "merged"):
                (persistent / sub).mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                            f"lowerdir={self.rootfs},upperdir={persistent / 'upper'},workdir={persistent / 'work'}",
                            str(self.root)], check=True, capture_output=True)

    def boot(self, timeout: float = 90) -> None:
        self.pid1 = 0
        cmd = [
            "systemd-nspawn", "-D", str(self.root), "-b", "-q",
            "--register=no", "--keep-unit", *(["--volatile=overlay"] if self.persistent is None else []),
            f"--machine={self.machine}",
            # systemd's IP firewall (IPAddressAllow=/Deny=) attaches BPF programs to
            # cgroups; nspawn's default filter blocks bpf(), and systemd then ignores
            # the rules without a word. Allow it, as on a real host.
            "--system-call-filter=bpf", "--capability=CAP_BPF,CAP_NET_ADMIN",
        ]
        cmd += [f"--bind-ro={host}:{inside}" for host, inside in self.binds.items()]
        env = {**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"}
        with open(self.console, "wb") as console:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                         env=env)
        deadline = time.monotonic() + timeout
        while not self.pid1:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.shutdown()
                raise TestbedError(f"{self.suite} container did not boot; see {self.console}")
            self.pid1 = self._find_init()
            time.sleep(0.1)
        # PID 1 exists before it can answer: ask until it says how the boot went. Before
        # its private socket is up, systemctl says "offline" (CI once, booting two at once).
        state = ""
        while state in ("", "offline") and time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", "--wait", check=False, timeout=timeout).stdout.strip()
            time.sleep(0.1)
        if state not in ("running", "degraded"):
            self.shutdown()
            raise TestbedError(f"{self.suite} container booted into state {state!r}; see {self.console}")

    def _find_init(self) -> int:
        # nspawn forks a child that becomes the container's PID 1 parent; systemd is below it.
        assert self.proc is not None
        for child in _children(self.proc.pid):
            for grandchild in [child, *_children(child)]:
                try:
                    if Path(f"/proc/{grandchild}/comm").read_text().strip() == "systemd":
                        return grandchild
                except OSError:
                    pass
        return 0

    def run(self, *cmd: str, check: bool = True, input: str | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        full = ["nsenter", "-t", str(self.pid1), "-a", *CLEAN_ENV, *cmd]
        result = subprocess.run(full, input=input, text=True, capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"in {self.suite}: {' '.join(cmd)} exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def sh(self, script: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kwargs)

    def shutdown(self) -> None:
        self.power_off()
        if self.persistent is not None and os.path.ismount(self.root):
            subprocess.run(["umount", str(self.root)], check=False)

    def power_off(self) -> None:
        """Stops the container; a persistent one keeps its files and can boot() again."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM powers the container off
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.console.unlink(missing_ok=True)


if __name__ == "__main__":
    # `testbed.py build`: make sure every cached root file system is there, in parallel.
    import sys
    from concurrent.futures import ThreadPoolExecutor

    if sys.argv[1:] != ["build"]:
        sys.exit("usage: testbed.py build")
    with ThreadPoolExecutor(len(SUITES)) as pool:
        for rootfs in pool.map(ensure_rootfs, SUITES):
            print(f"test bed: {rootfs} ready", file=sys.stderr)
