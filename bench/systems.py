"""The systems compared, each serving one workload with N workers in the bed.

A Server knows the commands its users type (start, reload, restart, stop) and which
processes are its workers. unitgen is installed with its own CLI; every peer runs as a
transient service (systemd-run, Restart=always as a deployment would have it), so that
systemd stops it cleanly, whatever it left running.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from bed import APPS_INSIDE, Bed


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    app: str  # MODULE:ATTR in bench/apps
    wsgi: bool
    node: bool  # whether the Node servers serve it too (hello world only)


WORKLOADS = {
    "hello": Workload("hello", "hello world (ASGI)", "asgi:hello", wsgi=False, node=True),
    "flask": Workload("flask", "Flask JSON endpoint (WSGI)", "flaskjson:app", wsgi=True, node=False),
    "sleep": Workload("sleep", "ASGI handler awaiting 5 ms", "asgi:sleep5", wsgi=False, node=False),
}


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    rss_kb: int
    args: str


class Server:
    """One system serving one workload with `workers` workers on 127.0.0.1:port."""

    key = ""
    title = ""  # the system's name in results.md
    single = ""  # what its one-worker variant is
    node = False  # a Node server: serves only the workloads marked node

    def __init__(self, bed: Bed, workload: Workload, workers: int, port: int, *,
                 roll_hold: float | None = None) -> None:
        self.bed, self.workload, self.workers, self.port = bed, workload, workers, port
        self.url = f"http://127.0.0.1:{port}/"
        self.roll_hold = roll_hold  # unitgen roll --hold; None: its default

    @classmethod
    def serves(cls, workload: Workload) -> bool:
        return workload.node or not cls.node

    @property
    def label(self) -> str:
        return f"{self.title} x{self.workers}"

    # What each system's users type; shown in results.md as it was run.
    def start_command(self) -> str:
        raise NotImplementedError

    def reload_command(self) -> str:
        raise NotImplementedError

    def restart_command(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def units(self) -> list[str]:
        raise NotImplementedError

    def reload(self) -> None:
        self.bed.sh(self.reload_command(), timeout=300)

    def restart(self) -> None:
        self.bed.sh(self.restart_command(), timeout=300)

    def processes(self) -> tuple[list[int], list[Proc]]:
        """The MainPIDs of this server's units, and every process of the container."""
        script = 'systemctl show -p MainPID --value "$@"; echo --; ps -e -o pid=,ppid=,rss=,args='
        out = self.bed.run("sh", "-c", script, "sh", *self.units()).stdout
        mains, _, table = out.partition("--\n")
        procs = []
        for line in table.splitlines():
            pid, ppid, rss, args = (line.split(None, 3) + [""])[:4]
            procs.append(Proc(int(pid), int(ppid), int(rss), args))
        return [int(pid) for pid in mains.split() if pid != "0"], procs

    def worker_pids(self) -> set[int]:
        return {proc.pid for proc in self.worker_procs()}

    def supervisor_pids(self) -> list[int]:
        """The master process: when a reload replaces it, the reload was a restart."""
        return self.processes()[0]

    def worker_procs(self) -> list[Proc]:
        mains, procs = self.processes()
        return [proc for proc in procs if proc.ppid in mains and not _helper(proc)]

    def supervisor_rss_kb(self) -> int:
        """Memory of what supervises the workers (their master and its helpers)."""
        mains, procs = self.processes()
        return sum(proc.rss_kb for proc in procs if proc.pid in mains or (proc.ppid in mains and _helper(proc)))


def _helper(proc: Proc) -> bool:
    # uvicorn --workers starts its workers with multiprocessing's spawn, which adds a
    # resource tracker process beside them: part of the supervisor, not a worker.
    return "resource_tracker" in proc.args


class Unitgen(Server):
    key, title, single = "unitgen", "unitgen", "1 instance"

    @property
    def name(self) -> str:
        return f"{self.workload.key}{self.workers}"

    def start_command(self) -> str:
        return (f"unitgen render --app {self.workload.app} --name {self.name} --cores {self.workers} "
                f"--listen 127.0.0.1:{self.port} --workdir {APPS_INSIDE} | unitgen install -")

    def reload_command(self) -> str:
        hold = [] if self.roll_hold is None else ["--hold", f"{self.roll_hold:g}"]
        return shlex.join(["unitgen", "roll", self.name, *hold])

    def restart_command(self) -> str:
        # The socket is held by PID 1 and not restarted: the instances are (PartOf=).
        return f"systemctl restart {self.name}.target"

    def start(self) -> None:
        self.bed.sh(self.start_command(), timeout=300)

    def stop(self) -> None:
        self.bed.run("unitgen", "uninstall", self.name, check=False, timeout=120)

    def units(self) -> list[str]:
        return [f"{self.name}@{i}.service" for i in range(self.workers)]

    def worker_procs(self) -> list[Proc]:
        # Each instance's main process is a worker; systemd (PID 1) supervises them.
        mains, procs = self.processes()
        return [proc for proc in procs if proc.pid in mains]

    def supervisor_pids(self) -> list[int]:
        return []  # systemd; each instance's MainPID is a worker, handed over at each reload

    def supervisor_rss_kb(self) -> int:
        return 0


class Transient(Server):
    """A peer run as `systemd-run --unit=...` with its own master process."""

    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return {}

    @property
    def unit(self) -> str:
        return f"bench-{self.key}-{self.workload.key}-{self.workers}"

    def units(self) -> list[str]:
        return [f"{self.unit}.service"]

    def start_command(self) -> str:
        env = [f"--setenv={key}={value}" for key, value in self.env().items()]
        # No start limit: a run restarts some peers more often than systemd's default allows.
        return shlex.join(["systemd-run", f"--unit={self.unit}", "--property=Restart=always",
                           "--property=StartLimitIntervalSec=0",
                           f"--property=WorkingDirectory={APPS_INSIDE}", *env, *self.argv()])

    def reload_command(self) -> str:
        return f"kill -HUP $(systemctl show -p MainPID --value {self.unit})"

    def restart_command(self) -> str:
        return f"systemctl restart {self.unit}"

    def start(self) -> None:
        self.bed.sh(self.start_command())

    def stop(self) -> None:
        self.bed.run("systemctl", "stop", self.unit, check=False, timeout=120)
        self.bed.run("systemctl", "reset-failed", self.unit, check=False)


class Gunicorn(Transient):
    key, title, single = "gunicorn", "gunicorn", "-w 1"

    def argv(self) -> list[str]:
        # Sync workers for the WSGI app, uvicorn's worker class for the ASGI ones.
        worker_class = [] if self.workload.wsgi else ["--worker-class", "uvicorn.workers.UvicornWorker"]
        return ["python3", "-m", "gunicorn", "--workers", str(self.workers), *worker_class,
                "--bind", f"127.0.0.1:{self.port}", self.workload.app]


class Uvicorn(Transient):
    """uvicorn --workers N, and with one worker a bare uvicorn (one process, no supervisor)."""

    key, title, single = "uvicorn", "uvicorn", "bare, 1 process"

    @property
    def label(self) -> str:
        return f"uvicorn --workers {self.workers}" if self.workers > 1 else "uvicorn (bare)"

    def worker_procs(self) -> list[Proc]:
        if self.workers > 1:
            return super().worker_procs()
        mains, procs = self.processes()
        return [proc for proc in procs if proc.pid in mains]

    def supervisor_pids(self) -> list[int]:
        return super().supervisor_pids() if self.workers > 1 else []

    def supervisor_rss_kb(self) -> int:
        return super().supervisor_rss_kb() if self.workers > 1 else 0

    def argv(self) -> list[str]:
        workers = ["--workers", str(self.workers)] if self.workers > 1 else []
        interface = ["--interface", "wsgi"] if self.workload.wsgi else []
        return ["python3", "-m", "uvicorn", *workers, *interface, "--host", "127.0.0.1", "--port", str(self.port),
                "--no-access-log", self.workload.app]


class NodeCluster(Transient):
    key, title, single = "node", "Node cluster", "1 worker"
    node = True

    def env(self) -> dict[str, str]:
        return {"PORT": str(self.port), "BENCH_CLUSTER_WORKERS": str(self.workers)}

    def argv(self) -> list[str]:
        return ["node", f"{APPS_INSIDE}/hello.js"]


class Pm2(Transient):
    key, title, single = "pm2", "PM2", "-i 1"
    node = True

    def env(self) -> dict[str, str]:
        return {"PORT": str(self.port), "HOME": "/root", "PM2_HOME": f"/run/{self.unit}"}

    def argv(self) -> list[str]:
        # pm2-runtime: PM2 in the foreground, as a service manager runs it.
        return ["pm2-runtime", "start", f"{APPS_INSIDE}/hello.js", "--instances", str(self.workers),
                "--name", "hello"]

    def reload_command(self) -> str:
        return f"PM2_HOME=/run/{self.unit} HOME=/root pm2 reload hello"


SYSTEMS: dict[str, type[Server]] = {cls.key: cls for cls in (Unitgen, Gunicorn, Uvicorn, NodeCluster, Pm2)}
