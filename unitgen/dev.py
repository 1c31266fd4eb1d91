"""`unitgen dev`: the app in the foreground on a developer's machine, served by the same
worker runtime as under systemd, and served anew when its code changes. No root, no
systemd.

The dev server plays systemd's part for one instance:
- it binds the listening sockets and hands them to the worker as a socket unit does
  (fds from 3, LISTEN_FDS, LISTEN_PID), so the worker runs its production path, and
  the sockets stay open here across every restart: connections queue, none is refused;
- the worker reports READY=1 over NOTIFY_SOCKET, here a datagram socket of this process;
- a change to a .py file under the workdir (watchfiles when importable, else a look at
  every file's mtime each POLL_EVERY seconds) starts a new worker beside the running one,
  and once the new one is ready the old one gets SIGTERM and drains, as `unitgen roll`
  swaps an instance. Starting first costs a moment of two processes, and buys what a
  developer wants: no request fails during the reload, and code that does not import
  (a file saved half-edited) leaves the previous code serving while its error shows;
- Ctrl-C (SIGINT; SIGTERM and SIGHUP alike) sends the workers SIGTERM: requests in flight
  finish, then they exit, then so does this. A second Ctrl-C cuts the drain short.
The workers run in a process group of their own, so that only this process sees the
terminal's signals and decides what the workers get; each gets SIGTERM if this process
dies without asking (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unitgen.errors import die
from unitgen_worker.contract import DRAIN_TIMEOUT, HANDOVER_VARIABLE, WorkerConfig, worker_argv

POLL_EVERY = 0.5  # seconds between looks at the files' mtimes without watchfiles
# Directories never looked into: virtualenvs, caches, version control, dependencies.
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules", "site-packages", "venv"})
# Between fork and exec of each worker, as systemd does for a socket-activated service:
# the listening sockets moved to fds 3 onwards, LISTEN_FDS and LISTEN_PID (this very
# process, which the exec keeps), and SIGTERM should the dev server die. argv: the
# sockets' fds, the dev server's pid, then the worker's command line.
_SOCKET_ACTIVATED_EXEC = """\
import ctypes, fcntl, os, signal, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[2]):
    sys.exit(1)  # the dev server died before prctl()
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for fd in fds:
    os.close(fd)
for number, fd in enumerate(high, start=3):
    os.dup2(fd, number)  # inheritable
    os.close(fd)
os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_PID=str(os.getpid()))
os.execv(sys.argv[3], sys.argv[3:])
"""


@dataclass(frozen=True)
class DevConfig:
    """What `unitgen dev` was asked for, every value checked by spec.py's parsers."""

    app: str  # MODULE:ATTR
    listen: tuple[str, ...]  # ListenStream= forms: PORT, HOST:PORT, [IPV6]:PORT, /path.sock
    workdir: str
    python: str
    interface: str = "auto"
    reload: bool = True
    drain_timeout: int = DRAIN_TIMEOUT


def say(message: str) -> None:
    print(f"unitgen: {message}", file=sys.stderr, flush=True)


# --- the listening sockets ------------------------------------------------------------
def bind(address: str) -> socket.socket:
    """A listening socket for one ListenStream= value, as systemd would bind it."""
    try:
        sock = _bind(address)
    except OSError as err:
        hint = {errno.EADDRINUSE: "something else listens there: stop it, or give another --listen, "
                                  "e.g. --listen 127.0.0.1:8001",
                errno.EACCES: "ports below 1024 need root: give --listen 8000 or another port from 1024"}
        die(f"cannot listen on {address}: {err.strerror}",
            hint=hint.get(err.errno, "give another --listen address"))
    # As the rendered units' NonBlocking=yes: two workers share it during a reload.
    sock.setblocking(False)
    return sock


BOUND: dict[str, int] = {}  # unix socket path -> the inode this process bound there


def _bind(address: str) -> socket.socket:
    if address.startswith("/"):
        if Path(address).is_socket() and _stale(address):  # left by a dev server that was killed
            os.unlink(address)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: object = address
    else:
        host, _, port = address.rpartition(":")
        # A bare port is this machine only, as for uvicorn --port: a dev server is no
        # service for the network (the rendered units bind every address for it).
        host = host or "127.0.0.1"
        if host.startswith("["):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            host = host.strip("[]") or "::"
            if host == "::":  # a bare port is every address, IPv4 too, as ListenStream=PORT
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        target = (host, int(port))
    try:
        sock.bind(target)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    if address.startswith("/"):
        BOUND[address] = os.stat(address).st_ino
    return sock


def _stale(path: str) -> bool:
    """Whether nothing listens on the unix socket at path any more."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False


def unbind(address: str) -> None:
    """Removes the unix socket this process bound at address, and nothing else there."""
    with contextlib.suppress(OSError):
        info = os.lstat(address)
        if stat.S_ISSOCK(info.st_mode) and info.st_ino == BOUND.get(address):
            os.unlink(address)


def url(address: str) -> str:
    if address.startswith("/"):
        return f"unix:{address}"
    host, _, port = address.rpartition(":")
    return f"http://{host or '127.0.0.1'}:{port}"


# --- one worker -----------------------------------------------------------------------
class Worker:
    """One `python -m unitgen_worker` on the dev server's sockets, with a notify socket
    of its own, so that its READY=1 cannot be taken for another's."""

    def __init__(self, process: asyncio.subprocess.Process, notify: socket.socket, notify_path: Path) -> None:
        self.process = process
        self.notify = notify
        self.notify_path = notify_path
        self.ready = asyncio.Event()
        self.follower: asyncio.Future[None] | None = None  # DevServer._follow(self)
        asyncio.get_running_loop().add_reader(notify.fileno(), self._read_notifications)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_notifications(self) -> None:
        # Read every datagram (STATUS= comes once a second): a full queue would block
        # the worker's sd_notify() on its event loop.
        with contextlib.suppress(BlockingIOError, InterruptedError):
            while True:
                if "READY=1" in self.notify.recv(4096).decode(errors="replace").splitlines():
                    self.ready.set()

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signum)

    async def exited(self) -> int:
        code = await self.process.wait()
        asyncio.get_running_loop().remove_reader(self.notify.fileno())
        self.notify.close()
        with contextlib.suppress(OSError):
            self.notify_path.unlink()
        return code


async def start_worker(config: DevConfig, sockets: list[socket.socket], scratch: Path, number: int) -> Worker:
    notify_path = scratch / f"notify-{number}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    notify.bind(str(notify_path))
    env = {**os.environ, "NOTIFY_SOCKET": str(notify_path), "UNITGEN_INSTANCE": "0"}
    # What systemd would not give an instance of ours: an outer service's leftovers.
    for variable in ("WATCHDOG_USEC", "WATCHDOG_PID", "RUNTIME_DIRECTORY", "LISTEN_FDNAMES", HANDOVER_VARIABLE):
        env.pop(variable, None)
    fds = [sock.fileno() for sock in sockets]
    command = worker_argv(config.python, WorkerConfig(app=config.app, interface=config.interface,
                                                      drain_timeout=float(config.drain_timeout)))
    try:
        process = await asyncio.create_subprocess_exec(
            config.python, "-I", "-S", "-c", _SOCKET_ACTIVATED_EXEC, ",".join(map(str, fds)), str(os.getpid()),
            *command, pass_fds=fds, env=env, cwd=config.workdir, stdin=asyncio.subprocess.DEVNULL, process_group=0)
    except OSError as err:
        notify.close()
        notify_path.unlink()
        die(f"cannot run --python {config.python}: {err.strerror}",
            hint="give the interpreter that runs the app, with unitgen installed, e.g. .venv/bin/python")
    return Worker(process, notify, notify_path)


# --- watching the code ----------------------------------------------------------------
def skipped(directory: str, name: str) -> bool:
    """Whether subdirectory name of directory holds no code of the app's own."""
    return (name.startswith(".") or name in SKIPPED_DIRS
            or os.path.exists(os.path.join(directory, name, "pyvenv.cfg")))  # a virtualenv of any name


def watched(root: str, path: str) -> bool:
    """Whether a change to path, under root, is a change to the app's code."""
    directory = root
    for name in os.path.relpath(path, root).split(os.sep)[:-1]:
        if skipped(directory, name):
            return False
        directory = os.path.join(directory, name)
    return path.endswith(".py")


def python_files(root: str) -> dict[str, tuple[int, int]]:
    """Every .py file under root that the app could import: path -> (mtime_ns, size)."""
    seen = {}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if not skipped(directory, name)]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):  # gone meanwhile: the next look sees it
                    status = os.stat(path)
                    seen[path] = (status.st_mtime_ns, status.st_size)
    return seen


def changed(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> set[str]:
    """The files added, removed or modified between two looks."""
    return {path for path in before.keys() | after.keys() if before.get(path) != after.get(path)}


async def poll_changes(root: str, every: float = POLL_EVERY) -> AsyncIterator[set[str]]:
    before = await asyncio.to_thread(python_files, root)
    while True:
        await asyncio.sleep(every)
        after = await asyncio.to_thread(python_files, root)
        if found := changed(before, after):
            yield found
        before = after


async def code_changes(root: str) -> AsyncIterator[set[str]]:
    """Each batch of .py files changed under root, from watchfiles (inotify) where it is
    importable, else by polling."""
    try:
        import watchfiles
    except ImportError:
        async for found in poll_changes(root):
            yield found
        return
    try:
        async for batch in watchfiles.awatch(root, watch_filter=lambda change, path: watched(root, path)):
            yield {path for _, path in batch}
    except OSError as err:  # no inotify watch left, a directory it may not read: poll instead
        say(f"watchfiles cannot watch {root} ({err}): looking at mtimes every {POLL_EVERY:g} s instead")
        async for found in poll_changes(root):
            yield found


def watcher_name() -> str:
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        return f"looked at every {POLL_EVERY:g} s; with watchfiles installed, at once"
    return "watchfiles"


# --- the dev server -------------------------------------------------------------------
class DevServer:
    """Keeps one worker serving the current code; see this module's docstring."""

    def __init__(self, config: DevConfig) -> None:
        self.config = config
        self.sockets: list[socket.socket] = []
        # (what, the worker it is about, a value): ("stop", None, signum), ("change", None,
        # files), ("ready", worker, None), ("exit", worker, exit code).
        self.events: asyncio.Queue[tuple[str, Worker | None, Any]] = asyncio.Queue()
        self.serving: Worker | None = None  # the worker that has the current code, once ready
        self.starting: Worker | None = None  # a new worker, not ready yet
        self.workers: set[Worker] = set()  # every one still running, draining ones too
        self.started = 0  # workers started so far
        self.stops = 0  # how many times a stop was asked for
        self.exit_code = 0  # of the last worker that exited unasked
        # Mode 0700, for the notify sockets; named after this process, which may be killed
        # before it removes it.
        self.scratch = Path(tempfile.mkdtemp(prefix=f"unitgen-dev-{os.getpid()}-"))

    async def run(self) -> int:
        """Serve until asked to stop (0), or with --no-reload until the worker exits (its code)."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, self.events.put_nowait, ("stop", None, signum))
        watcher = asyncio.ensure_future(self._watch()) if self.config.reload else None
        try:
            self.sockets = [bind(address) for address in self.config.listen]
            await self._start("starting")
            say(f"reloading when a .py file under {self.config.workdir} changes ({watcher_name()})"
                if self.config.reload else "not reloading on changes (--no-reload)")
            # Without reloading, nothing would start another worker once the last exits.
            while self.workers or (self.config.reload and not self.stops):
                await self._handle(*await self.events.get())
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            for sock in self.sockets:
                sock.close()
            for address in self.config.listen:
                if address.startswith("/"):
                    unbind(address)
            with contextlib.suppress(OSError):
                self.scratch.rmdir()
        say("stopped")
        return 0 if self.stops else self.exit_code

    async def _handle(self, what: str, worker: Worker | None, value: Any) -> None:
        if what == "stop":
            self._stop()
        elif what == "change" and not self.stops:
            files = sorted(os.path.relpath(path, self.config.workdir) for path in value)
            shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
            await self._start(f"{shown} changed")
        elif what == "ready" and worker is self.starting and not self.stops:
            old, self.serving, self.starting = self.serving, self.starting, None
            if old is None:
                say(f"serving {self.config.app} at {', '.join(map(url, self.config.listen))} "
                    f"(pid {self.serving.pid}); Ctrl-C stops")
            else:
                say(f"pid {self.serving.pid} serves the new code; pid {old.pid} drains")
                old.send_signal(signal.SIGTERM)
        elif what == "exit":
            code = value
            self.workers.discard(worker)
            if worker in (self.starting, self.serving):
                self.exit_code = code
            if worker is self.starting:
                self.starting = None
                if not self.stops:
                    still = (f"pid {self.serving.pid} serves the previous code" if self.serving
                             else "nothing is served")
                    say(f"the worker exited with code {code} before it was ready (see above); {still}"
                        + (" until the next change" if self.config.reload else ""))
            elif worker is self.serving:
                self.serving = None
                if not self.stops:
                    say(f"the worker exited with code {code}"
                        + ("; it starts again at the next change" if self.config.reload else ""))

    async def _start(self, why: str) -> None:
        if self.starting is not None:  # superseded: its code is already out of date
            self.starting.send_signal(signal.SIGTERM)
        if why != "starting":
            say(f"{why}: starting a new worker")
        self.started += 1
        worker = await start_worker(self.config, self.sockets, self.scratch, self.started)
        self.starting = worker
        self.workers.add(worker)
        worker.follower = asyncio.ensure_future(self._follow(worker))  # the loop keeps only a weak reference

    async def _follow(self, worker: Worker) -> None:
        ready = asyncio.ensure_future(worker.ready.wait())
        exited = asyncio.ensure_future(worker.exited())
        await asyncio.wait([ready, exited], return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            self.events.put_nowait(("ready", worker, None))
        else:
            ready.cancel()
        self.events.put_nowait(("exit", worker, await exited))

    def _stop(self) -> None:
        self.stops += 1
        if self.stops == 1:
            say(f"stopping: {len(self.workers)} worker(s) finish their requests (Ctrl-C again to cut that short)"
                if self.workers else "stopping")
        # The first time a drain, as systemd's stop; then SIGINT, which cuts the drain
        # short; then SIGKILL, for an app stuck in its shutdown.
        for worker in self.workers:
            worker.send_signal((signal.SIGTERM, signal.SIGINT, signal.SIGKILL)[min(self.stops, 3) - 1])

    async def _watch(self) -> None:
        async for files in code_changes(self.config.workdir):
            self.events.put_nowait(("change", None, files))


def serve(config: DevConfig) -> int:
    return asyncio.run(DevServer(config).run())
