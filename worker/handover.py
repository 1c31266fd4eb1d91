"""Reload in place: a new process takes an instance over, then the old one drains.

`systemctl reload NAME@I` runs ExecReload=, this module's waiter (main() below), as the
app's user in the instance's sandbox: it sends SIGHUP to the main process and waits for
the outcome, exiting 1 when the swap failed, so that the reload job fails and
`systemctl reload` (and `unitgen roll`) exit non-zero. The old process, on SIGHUP,
runs Swap.run(), in this order:
1. takes the app's handover lock: no two instances of one app swap or drain at once;
2. RELOADING=1: the unit shows "reloading";
3. starts the new process: its own command line, the listening sockets at the same fd
   numbers, one end of a socket pair; it imports the app and runs the lifespan startup
   beside the old process, which serves on. It is started through a short-lived
   intermediate process, so that it is PID 1's child (an orphan) by the handover:
   systemd marks a main process that is not its child "alien" for good, and then
   sends SIGKILL right after SIGTERM at the next stop (no drain), whatever KillMode=;
4. waits for "ready" on the pair (the new process accepts by then), for the new process
   to exit, or for HANDOVER_TIMEOUT;
5. MAINPID=<new> and READY=1: from now on systemd follows the new process (its exit
   restarts the instance; its WATCHDOG=1 counts), then "main" to it, which starts
   pinging the watchdog;
6. writes the outcome (HandoverResult) for the waiter, and drains as on SIGTERM,
   holding the lock until it exits.
A new process that fails is killed; the old one sends READY=1 (the unit is "active"
again), logs why in the journal, writes the failure for the waiter and `unitgen status`,
and serves on. A new process that may be accepting already (it said "ready", or this
process is being stopped mid-swap) is not killed but told to drain (SIGTERM): its
clients' connections would be reset. systemd kills what is left in the cgroup once the
main process is gone (KillMode=mixed), so the main process exits only after the others'
drains (outlive()): the old process's after a swap (a stop right after a roll), the
new one's after a stop mid-swap.

What this relies on in systemd, read in src/core/service.c of v252 and v257 and shown by
tests/e2e/test_reload.py on both:
- MAINPID= from the main process is taken while the unit is reloading (ExecReload=
  running), for a process in the unit's cgroup; READY=1 does not end such a reload,
  the ExecReload= process's exit does, and its failure fails the reload job while the
  unit stays active;
- MAINPID= and READY=1 go in one message: once MAINPID= is taken, the old process's
  messages are refused (NotifyAccess=main);
- WATCHDOG=1 is taken from whichever process is the main one; the watchdog's clock is
  not reset by the change, so the new process pings at once. It gets WATCHDOG_USEC
  again, without WATCHDOG_PID (which names the process systemd started);
- a main process that is systemd's child is watched like any other: its exit restarts
  the unit, and a stop waits for its drain.
Type=notify-reload (253+) is not used: there READY=1 ends a reload as done, and a
failed swap could not fail `systemctl reload`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from unitgen_worker.contract import (
    HANDOVER_TIMEOUT,
    HANDOVER_VARIABLE,
    HandoverResult,
    handover_file,
    handover_lock,
)

# ExecReload='s waiter is unitgen_worker.reload (it must not import this module's
# asyncio at every reload); units rendered before it existed run this module, which
# hands them to that main().
from unitgen_worker.reload import main
from unitgen_worker.sd import NoSocketError, adopt_listen_sockets, notify

log = logging.getLogger("unitgen.worker")
LOCK_POLL = 0.05  # seconds between tries of the handover lock
POLL = 0.02  # seconds between looks for the new process's "ready"
STARTED_IN = os.getcwd()  # WorkingDirectory=: imported before the app can change it
# The intermediate: starts the new process with the listening fds and the pair's end,
# tells its pid on that end, and exits, leaving it an orphan (PID 1's child).
_INTERMEDIATE = ("import os, subprocess, sys; fds = [int(fd) for fd in sys.argv[1].split(',')]; "
                 "new = subprocess.Popen(sys.argv[3:], pass_fds=fds); "
                 "os.write(int(sys.argv[2]), b'pid %d\\n' % new.pid)")


# --- the new process --------------------------------------------------------------
EARLY_SIGHUP: list[float] = []  # a SIGHUP before the serving loop's handler: answered once it runs


def note_early_sighup(signum: int, frame: object) -> None:
    EARLY_SIGHUP.append(time.monotonic())  # only a note: the loop does the work



class Successor:
    """A process started by a reload: where it reports "ready", and the instance's swap
    counts (contract.Counters) before this one; recycle: this one is a recycle."""

    def __init__(self, control: socket.socket, swaps: int = 0, recycles: int = 0, recycle: bool = False) -> None:
        self.control = control
        self.swaps = swaps
        self.recycles = recycles
        self.recycle = recycle
        self.predecessor: _Process | None = None  # the old process, draining, once this one is main


def adopt_sockets() -> tuple[list[socket.socket], Successor | None]:
    """The listening sockets, from systemd (a start) or from the old process (a reload),
    and in the second case what the new process needs for the handover."""
    value = os.environ.pop(HANDOVER_VARIABLE, None)
    if value is None:
        return adopt_listen_sockets(), None
    try:
        fields = dict(item.split("=", 1) for item in value.split())
        fds = [int(fd) for fd in fields["fds"].split(",")]
        control = socket.socket(fileno=int(fields["control"]))
        sockets = [socket.socket(fileno=fd) for fd in fds]
    except (ValueError, KeyError, OSError) as err:
        raise NoSocketError(f"{HANDOVER_VARIABLE}={value!r} is unusable: {err}") from None
    for sock in sockets:
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise NoSocketError(f"fd {sock.fileno()} passed in {HANDOVER_VARIABLE} is not a listening socket")
    for sock in (*sockets, control):
        # pass_fds made them inheritable; as sd_listen_fds() does, no program the app
        # runs may keep them (and the socket accepting) after this instance stops.
        os.set_inheritable(sock.fileno(), False)
    if fields.get("watchdog"):  # for sd.watchdog_interval(): the timeout, now for this process
        os.environ["WATCHDOG_USEC"] = fields["watchdog"]
        os.environ.pop("WATCHDOG_PID", None)
    swaps, recycles, recycle = _swap_counts(fields.get("swaps", ""))
    return sockets, Successor(control, swaps, recycles, recycle)


def _swap_counts(value: str) -> tuple[int, int, bool]:
    """swaps,recycles,recycle from the variable: only counts, so a bad value is 0s."""
    try:
        swaps, recycles, recycle = (int(number) for number in value.split(","))
    except ValueError:
        return 0, 0, False
    return max(swaps, 0), max(recycles, 0), recycle == 1


async def become_main(successor: Successor) -> bool:
    """Tells the old process this one is ready, and waits to be made the main one.
    False when the old process gave up or died first: then this one must go."""
    control = successor.control
    loop = asyncio.get_running_loop()
    control.setblocking(False)
    received = b""
    # The pair was made by the old process before it started this one, and it must be
    # alive to write "main": opened now, the pidfd names it and no later holder of its pid.
    old = _peer(control)
    try:
        await loop.sock_sendall(control, b"ready\n")
        while b"main\n" not in received:
            data = await asyncio.wait_for(loop.sock_recv(control, 64), HANDOVER_TIMEOUT)
            if not data:
                break
            received += data
    except (OSError, TimeoutError):
        pass
    finally:
        control.close()
    if b"main\n" not in received:
        if old is not None:
            os.close(old.pidfd)
        return False
    successor.predecessor = old
    return True


def _peer(control: socket.socket) -> _Process | None:
    """The process at the other end of the pair (its maker: SO_PEERCRED), or None."""
    try:
        pid = struct.unpack("3i", control.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
        return _Process(pid)
    except OSError as err:  # not worth failing the handover for: only the stop's wait is lost
        log.warning("cannot follow the old process (its drain will not be waited for): %s", err)
        return None


async def outlive(processes: list[_Process | None], deadline: float, cut_short: Callable[[], bool]) -> None:
    """Waits, until deadline (CLOCK_MONOTONIC) or cut_short(), for these processes of the
    instance to exit: systemd kills what is left in the cgroup once the main process is
    gone (KillMode=mixed), so the main process exits only after the drains of the others
    (the old process after a swap; a new process told to drain when a stop came mid-swap)."""
    for process in processes:
        if process is None:
            continue
        while not process.exited() and time.monotonic() < deadline and not cut_short():
            await asyncio.sleep(POLL)
        if not process.exited():
            log.warning("pid %d has not ended its drain: exiting without it", process.pid)
        os.close(process.pidfd)


# --- the old process --------------------------------------------------------------
class Swap:
    """One reload of this instance, from SIGHUP to the handover or its failure."""

    def __init__(self, sockets: list[socket.socket], instance: str, runtime: Path | None,
                 watchdog_interval: float | None) -> None:
        self.sockets = sockets
        self.instance = instance
        self.runtime = runtime
        self.watchdog_usec = round(watchdog_interval * 4e6) if watchdog_interval else None
        self.directory = STARTED_IN
        self._lock: int | None = None  # held from the start until this process exits
        self.abandoned: _Process | None = None  # a new process told to drain: waited for before exit
        self._pending: _Process | None = None  # the new process, from its pid on, while the swap runs
        self.handed: _Process | None = None  # the new process once it is the instance

    async def run(self, asked: Callable[[], float], stopping: Callable[[], bool],
                  counts: tuple[int, int, bool] = (0, 0, False)) -> int | None:
        """The new process's pid once it serves as the instance, or None (it failed, or
        stopping() turned true first, and this process serves on). Whatever goes wrong
        ends in _failed(): the new process stopped, READY=1, the failure written, the
        lock released. asked() is when the last SIGHUP came: the outcome answers every
        reload asked until it is written, also one asked while this swap ran (a roll
        reaching an instance that is recycling itself). counts: this process's swaps and
        recycles, and whether this swap is a recycle, for the new process to go on from."""
        ours = new = self._pending = None
        try:
            await self._take_lock()
            notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\n"
                   "STATUS=reloading: starting a new process")
            log.info("reloading: pid %d starts a new process for instance %s", os.getpid(), self.instance)
            ours, theirs = socket.socketpair()
            with theirs:
                intermediate = self._start(theirs, counts)
            ours.setblocking(False)
            new, error = await self._until_ready(intermediate, ours)
            if not error and stopping():
                return self._failed(asked, new, "this process was asked to stop during the reload", stopping=True)
            if not error and new is not None and new.exited():
                error = f"the new process (pid {new.pid}) exited right after it was ready"
            if error or new is None:
                return self._failed(asked, new, error or "no new process")
            self.handed = new  # from here on a stop's SIGTERM is passed on to it (WorkerServer)
            notify(f"MAINPID={new.pid}\nREADY=1")  # one message: after MAINPID=, ours are refused
            with contextlib.suppress(OSError):
                ours.setblocking(True)
                ours.sendall(b"main\n")
            log.info("reloaded: pid %d serves instance %s now; pid %d drains", new.pid, self.instance,
                     os.getpid())
            self._write(HandoverResult(old=os.getpid(), new=new.pid, ok=True, asked=asked()))
            return new.pid
        except asyncio.CancelledError:  # this process is stopping (SIGTERM) mid-swap
            # The new process may accept by now (it does before it says "ready").
            self._failed(asked, self._pending, "the old process was stopped during the reload", stopping=True)
            raise
        except Exception as err:  # noqa: BLE001 - any failure: the old process must serve on
            log.exception("reload failed")
            return self._failed(asked, self._pending, f"cannot start a new process: {err}")
        finally:
            if ours is not None:
                ours.close()
            new = self._pending  # what _until_ready() returned, or knew when interrupted
            if new is not None and new is not self.abandoned and new is not self.handed:
                os.close(new.pidfd)
            self._pending = None

    def answer_done(self, asked: float, new: int) -> None:
        """Answers a SIGHUP that came after this process handed the instance to new."""
        self._write(HandoverResult(old=os.getpid(), new=new, ok=True, asked=asked))

    def refuse(self, asked: float, why: str) -> None:
        """Answers a SIGHUP that cannot start a swap (stopping, or not ready yet)."""
        log.warning("reload refused: %s", why)
        self._write(HandoverResult(old=os.getpid(), new=os.getpid(), ok=False, asked=asked, error=why))

    def _start(self, theirs: socket.socket, counts: tuple[int, int, bool]) -> subprocess.Popen[bytes]:
        fds = [sock.fileno() for sock in self.sockets]
        swaps, recycles, recycle = counts
        variable = f"fds={','.join(map(str, fds))} control={theirs.fileno()} swaps={swaps},{recycles},{int(recycle)}"
        if self.watchdog_usec:
            variable += f" watchdog={self.watchdog_usec}"
        # exec, not fork(): the app's threads make a bare fork unsafe. The same command
        # line (sys.orig_argv: `-m unitgen_worker ...` included), so the new process
        # imports the app anew from its files.
        passed = ",".join(map(str, (*fds, theirs.fileno())))
        # The intermediate isolated (-I -S): nothing from the app's directories is imported.
        # The new process starts where this one started (WorkingDirectory=), not
        # wherever the app has changed to since.
        return subprocess.Popen([sys.executable, "-I", "-S", "-c", _INTERMEDIATE, passed, str(theirs.fileno()),
                                 sys.executable, *sys.orig_argv[1:]], cwd=self.directory,
                                pass_fds=(*fds, theirs.fileno()), env={**os.environ, HANDOVER_VARIABLE: variable})

    async def _until_ready(self, intermediate: subprocess.Popen[bytes],
                           ours: socket.socket) -> tuple[_Process | None, str]:
        """The new process, and "" once it said "ready"; else why not. Its lines come in
        order ("pid N" from the intermediate, then "ready"), one read may hold both."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANDOVER_TIMEOUT
        received = b""
        new = None
        while True:
            while b"\n" in received:
                line, received = received.split(b"\n", 1)
                if new is None:
                    try:
                        new = self._pending = _Process.of(line)
                    except ProcessLookupError as err:
                        return None, str(err) or "the new process exited at once; its lines are above"
                elif line == b"ready":
                    intermediate.wait()
                    return new, ""
            if new is None and intermediate.poll() not in (None, 0):
                return None, f"the new process could not be started (status {intermediate.returncode})"
            if new is not None and new.exited():
                return new, f"the new process (pid {new.pid}) exited before it was ready; its lines are above"
            if loop.time() > deadline:
                return new, f"the new process was not ready within {HANDOVER_TIMEOUT:g} s"
            # Polled, not awaited with a timeout: a sock_recv() cancelled by wait_for() at
            # the moment data came could lose it (seen: "ready" lost, the swap timed out).
            try:
                data = ours.recv(64)
            except BlockingIOError:
                data = None
            if not data:  # nothing yet, or every end closed (exiting: exited() says so)
                await asyncio.sleep(POLL)
                continue
            received += data

    def _failed(self, asked: Callable[[], float], new: _Process | None, error: str, stopping: bool = False) -> None:
        """stopping: this process is stopping, and the new one may hold clients' connections
        already: it drains as well, instead of being killed."""
        then = "stops" if stopping else "serves on"
        if new is not None and not new.exited():
            if stopping:
                new.terminate()
                self.abandoned = new
                then = "stops, the new one drains too"
            else:
                new.kill()
        notify(f"READY=1\nSTATUS=reload failed, the old process {then}: {error}")
        log.error("reload failed, pid %d %s: %s", os.getpid(), then, error)
        self._write(HandoverResult(old=os.getpid(), new=os.getpid(), ok=False, asked=asked(), error=error))
        self._release()
        return None

    async def _take_lock(self) -> None:
        if self.runtime is None:
            return
        self._lock = os.open(handover_lock(self.runtime), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL)  # a sibling is swapping or draining

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _write(self, result: HandoverResult) -> None:
        if self.runtime is None:
            return
        path = handover_file(self.runtime, self.instance)
        scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            scratch.write_text(result.to_json())
            os.replace(scratch, path)
        except OSError as err:
            log.warning("cannot write %s: %s", path, err)


class _Process:
    """The new process, through a pidfd: not this process's child, so no wait(); the
    pidfd is readable once it has exited, and signals never reach a reused pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)

    @classmethod
    def of(cls, line: bytes) -> _Process:
        """From the intermediate's "pid N"; ProcessLookupError when it is gone already."""
        word = line.removeprefix(b"pid ")
        if not (line.startswith(b"pid ") and word.isdigit()):
            raise ProcessLookupError(f"the intermediate process said {line[:40]!r}, not a pid")
        return cls(int(word))

    def terminate(self) -> None:
        """SIGTERM: it drains and exits. Through the pidfd: never another process."""
        with contextlib.suppress(OSError):  # it may have exited meanwhile
            signal.pidfd_send_signal(self.pidfd, signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def exited(self) -> bool:
        poller = select.poll()  # not select(): it cannot take an fd over 1023
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(0))


if __name__ == "__main__":
    sys.exit(main())
