"""A fleet for the Ansible e2e test: Debian containers reached over ssh, HAProxy in front.

Each host is a container with real systemd (testbed.Container) on a persistent overlay of
the cached root file system, so that it keeps what Ansible put there across a power-off.
They share the host's network namespace: each has its own sshd port and app port on
127.0.0.1. HAProxy runs on this host, in the foreground, from a config written here, with
its admin socket in the fleet's directory.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from helpers import wait_until
from testbed import Container, free_port

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "packaging/ansible"
SUITE = "bookworm"  # one release only: the fleet test is long, and the role is the same on 257
APP = "fleetapp"
BACKEND = "app"

RELEASE_APP = '''"""A tiny ASGI app whose answer names its release."""
{prelude}
RELEASE = {release!r}


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({{"type": "lifespan.startup.{startup}"}})
            elif message["type"] == "lifespan.shutdown":
                await send({{"type": "lifespan.shutdown.complete"}})
                return
    await send({{"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}})
    await send({{"type": "http.response.body", "body": f"release {{RELEASE}}\\n".encode()}})
'''

HAPROXY_CFG = """global
    stats socket {socket} level admin
    maxconn 4096

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    # A request whose server went away is sent again, to another server.
    retries 2
    option redispatch

frontend web
    bind 127.0.0.1:{port}
    default_backend {backend}

backend {backend}
    balance roundrobin
    option httpchk GET /
    http-check expect status 200
    default-server inter 300 fall 2 rise 2
{servers}
"""


def write_release(directory: Path, release: str, *, broken: bool = False, fails_startup: bool = False) -> Path:
    """A release directory with fleetapp.py; a broken one raises ImportError at import,
    one that fails_startup imports fine and fails its ASGI lifespan startup."""
    path = directory / release
    path.mkdir(parents=True)
    prelude = "\nimport no_such_module_in_this_release  # noqa: F401\n" if broken else ""
    startup = "failed" if fails_startup else "complete"
    (path / f"{APP}.py").write_text(RELEASE_APP.format(release=release, prelude=prelude, startup=startup))
    return path


@dataclass
class Host:
    name: str
    container: Container
    ssh_port: int
    app_port: int

    def body(self) -> str:
        return subprocess.run(["curl", "-sS", "-m", "5", f"http://127.0.0.1:{self.app_port}/"],
                              capture_output=True, text=True).stdout.strip()


@dataclass
class Recap:
    rc: int
    output: str
    seconds: float
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP: host -> {ok, changed, unreachable, failed, skipped, rescued, ignored}."""
    recap = output.rpartition("PLAY RECAP")[2]
    hosts = {}
    for line in recap.splitlines():
        match = re.match(r"^(\S+)\s+:\s+(.*)$", line)
        if match:
            hosts[match.group(1)] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return hosts


class HAProxy:
    def __init__(self, directory: Path, servers: dict[str, int]) -> None:
        self.socket = directory / "haproxy.sock"
        self.port = free_port()
        self.config = directory / "haproxy.cfg"
        lines = "\n".join(f"    server {name} 127.0.0.1:{port} check" for name, port in servers.items())
        self.config.write_text(HAPROXY_CFG.format(socket=self.socket, port=self.port, backend=BACKEND,
                                                  servers=lines))
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(self.config)], capture_output=True, text=True)
        assert check.returncode == 0, f"haproxy -c: {check.stderr}"
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(directory / "haproxy.log", "wb"))
        self.url = f"http://127.0.0.1:{self.port}/"

    def ask(self, command: str) -> str:
        with socket.socket(socket.AF_UNIX) as conn:
            conn.settimeout(5)
            conn.connect(str(self.socket))
            conn.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> dict[str, dict[str, str]]:
        """show stat of the backend: svname (h1, ..., BACKEND) -> its columns."""
        lines = [line for line in self.ask("show stat").splitlines() if line]
        columns = lines[0].lstrip("# ").split(",")
        rows = (dict(zip(columns, line.split(","), strict=False)) for line in lines[1:])
        return {row["svname"]: row for row in rows if row.get("pxname") in (BACKEND, "web")
                and not (row["pxname"] == "web" and row["svname"] != "FRONTEND")}

    def all_up(self) -> bool:
        try:
            return all(row["status"] == "UP" for name, row in self.stats().items()
                       if name not in ("FRONTEND", "BACKEND"))
        except OSError:
            return False

    def drained(self) -> set[str]:
        """Servers in drain or maintenance (admin state), from `show servers state`."""
        found = set()
        for line in self.ask(f"show servers state {BACKEND}").splitlines():
            fields = line.split()
            if len(fields) > 6 and not line.startswith("#") and int(fields[6]) & 0x7F:
                found.add(fields[3])
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class DrainWatch:
    """Polls HAProxy during a playbook run: the most servers ever drained at once."""

    def __init__(self, haproxy: HAProxy) -> None:
        self.haproxy, self.most, self.seen = haproxy, 0, set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.wait(0.05):
            try:
                drained = self.haproxy.drained()
            except OSError:
                continue
            self.seen |= drained
            self.most = max(self.most, len(drained))

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()


class Fleet:
    """Three hosts (h1, h2, h3), HAProxy in front, and ansible-playbook to drive them."""

    def __init__(self, directory: Path, deb: Path) -> None:
        self.dir = directory
        self.deb = deb
        self.hosts: list[Host] = []
        self.haproxy: HAProxy | None = None
        self.inventory = directory / "inventory.yml"

    def create(self, count: int = 3) -> None:
        """The hosts' file systems (mounted overlays: shutdown() unmounts them), ssh keys, inventory."""
        directory = self.dir
        key = directory / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        ports: set[int] = set()
        while len(ports) < 2 * count:
            ports.add(free_port())
        ssh_ports, app_ports = sorted(ports)[:count], sorted(ports)[count:]
        for i in range(count):
            name = f"h{i + 1}"
            container = Container(SUITE, {}, name=f"fleet-{name}", persistent=directory / name)
            self.hosts.append(Host(name, container, ssh_ports[i], app_ports[i]))
            # sshd on a port of its own (the containers share the host's network), root
            # by the test's key only.
            root = container.root
            (root / "etc/ssh/sshd_config.d/fleet.conf").write_text(
                f"Port {ssh_ports[i]}\nListenAddress 127.0.0.1\nPasswordAuthentication no\n"
                "PermitRootLogin prohibit-password\n")
            ssh_dir = root / "root/.ssh"
            ssh_dir.mkdir(mode=0o700, exist_ok=True)
            (ssh_dir / "authorized_keys").write_text((directory / "id_ed25519.pub").read_text())
            os.chmod(ssh_dir / "authorized_keys", 0o600)
        self.inventory.write_text(json.dumps(self._inventory(key), indent=2))

    def _inventory(self, key: Path) -> dict:
        # ServerAlive: a connection to a host that went away fails in seconds, not never.
        ssh_args = (f"-o StrictHostKeyChecking=no -o UserKnownHostsFile={self.dir}/known_hosts "
                    "-o ServerAliveInterval=5 -o ServerAliveCountMax=3")
        return {"all": {
            "vars": {"ansible_user": "root", "ansible_ssh_private_key_file": str(key),
                     "ansible_ssh_common_args": ssh_args, "unitgen_deb": str(self.deb),
                     "unitgen_name": APP, "unitgen_app": f"{APP}:app", "unitgen_cores": 2,
                     "unitgen_roll_hold": 1, "haproxy_socket": str(self.dir / "haproxy.sock"),
                     "haproxy_backend": BACKEND},
            "children": {
                "app": {"hosts": {h.name: {"ansible_host": "127.0.0.1", "ansible_port": h.ssh_port,
                                           "ansible_python_interpreter": "/usr/bin/python3",
                                           "unitgen_listen": [f"127.0.0.1:{h.app_port}"]}
                                  for h in self.hosts}},
                "balancers": {"hosts": {"lb": {"ansible_connection": "local",
                                               "ansible_python_interpreter": sys.executable}}},
            },
        }}

    def boot(self) -> None:
        with ThreadPoolExecutor(len(self.hosts)) as pool:
            list(pool.map(lambda h: h.container.boot(), self.hosts))
        for host in self.hosts:
            assert wait_until(lambda h=host: _connects(h.ssh_port), 30), f"sshd of {host.name} does not answer"

    def start_haproxy(self) -> HAProxy:
        self.haproxy = HAProxy(self.dir, {h.name: h.app_port for h in self.hosts})
        assert wait_until(self.haproxy.all_up, 30), f"HAProxy does not find every host UP: {self.haproxy.stats()}"
        return self.haproxy

    def playbook(self, name: str, *extra: str, timeout: float = 600) -> Recap:
        env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_HOME": str(self.dir / "ansible-home"), "ANSIBLE_LOCAL_TEMP": str(self.dir / "ansible-tmp"),
               "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.dir / "cp"), "ANSIBLE_FORKS": "5",
               "ANSIBLE_HOST_KEY_CHECKING": "False", "ANSIBLE_CALLBACK_RESULT_FORMAT": "yaml"}
        cmd = [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(self.inventory),
               str(ANSIBLE_DIR / "playbooks" / name), *extra]
        began = time.monotonic()
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ANSIBLE_DIR)
        seconds = time.monotonic() - began
        output = result.stdout + result.stderr
        log = self.dir / "ansible.log"
        with open(log, "a") as out:
            out.write(f"\n===== {' '.join(cmd)} (rc {result.returncode}, {seconds:.1f} s)\n{output}")
        return Recap(result.returncode, output, seconds, parse_recap(output))

    def shutdown(self) -> None:
        if self.haproxy is not None:
            self.haproxy.stop()
        for host in self.hosts:
            host.container.shutdown()


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
