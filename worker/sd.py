"""The systemd side of a worker: the sockets it was passed and notifications it sends.

libsystemd's own implementation (python3-systemd, or the `systemd` extra from PyPI) is
used where it is importable. Without it, which is what `pip install unitgen` gives on
a host with no compiler, the few lines below speak the same protocol, as gunicorn's
systemd.py does. The sdnotify package is not used: it connects once (so every
datagram after PID 1 re-executes is lost), swallows every error and cannot say
whether a message was sent.
"""

from __future__ import annotations

import logging
import os
import socket

try:
    from systemd import daemon
except ImportError:
    daemon = None

log = logging.getLogger("unitgen.worker")
_failing = False
# Which implementation this process speaks with, for logs and tests.
BACKEND = "libsystemd" if daemon is not None else "python"
SD_LISTEN_FDS_START = 3
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class NoSocketError(Exception):
    pass


def adopt_listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed in (fd 3 onwards), of whatever family.

    LISTEN_* count only when LISTEN_PID is this process, and are unset either way so
    that a child of the app never takes them for its own. The fds belong to systemd's
    socket unit: they are never shut down or unlinked here, only this process's copy
    closed.
    """
    try:
        fds = daemon.listen_fds(unset_environment=True) if daemon is not None else _listen_fds()
    except OSError as err:  # LISTEN_* malformed, or an fd that is not open: either implementation
        raise NoSocketError(f"the listening sockets passed in are unusable: {err}") from None
    finally:
        # sd_listen_fds() unsets them in the C environment only; os.environ is Python's
        # copy and is what subprocess hands to the app's children.
        for variable in _LISTEN_VARIABLES:
            os.environ.pop(variable, None)
    if not fds:
        raise NoSocketError(
            "no listening socket was passed in (LISTEN_FDS/LISTEN_PID unset or not for this "
            "process); run it as NAME@N.service with Sockets=NAME.socket"
        )
    # socket(fileno=) reads family and type from the fd: IPv4, IPv6 and unix alike.
    return [socket.socket(fileno=fd) for fd in fds]


def _listen_fds() -> list[int]:
    # sd_listen_fds() without libsystemd; the caller unsets LISTEN_* for both.
    # Unset means none; set but not a number is an error, checked in libsystemd's order.
    pid = os.environ.get("LISTEN_PID")
    if pid is None:
        return []
    if _number("LISTEN_PID", pid) != os.getpid():  # for the process that exec'ed us
        return []
    count = os.environ.get("LISTEN_FDS")
    if count is None:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + _number("LISTEN_FDS", count)))
    if not fds:
        raise OSError("LISTEN_FDS=0")
    for fd in fds:
        # FD_CLOEXEC, as sd_listen_fds() sets: a program the app runs must not keep
        # systemd's socket open (and accepting) after this instance has stopped.
        os.set_inheritable(fd, False)  # OSError (EBADF) for an fd that is not open
    return fds


def _number(variable: str, value: str) -> int:
    if not (value.isascii() and value.isdigit()):
        raise OSError(f"{variable}={value!r} is not a number")
    return int(value)


def notify(state: str) -> bool:
    """sd_notify(): True if the message was sent, False when NOTIFY_SOCKET is unset
    (run by hand) or sending failed.

    Never raises: a datagram can be refused (PID 1 re-executing, a receiver gone), and
    a lost STATUS= or ping must not take down the loop that drains and pings.
    """
    global _failing
    try:
        sent = bool(daemon.notify(state)) if daemon is not None else _notify(state)
    except OSError as err:
        if not _failing:  # once per outage, not once a second
            log.warning("sd_notify(%s) failed: %s", state.split("=", 1)[0], err)
        _failing = True
        return False
    _failing = False
    return sent


def _notify(state: str) -> bool:
    # sd_notify() without libsystemd: one datagram on a fresh socket each time, so a
    # socket that PID 1 has bound anew (daemon-reexec) is found again.
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # the abstract namespace: a leading NUL, no file
        target = b"\0" + os.fsencode(address[1:])
    elif address.startswith("/"):
        target = os.fsencode(address)
    else:  # vsock: and the like, which only libsystemd speaks
        raise OSError(f"NOTIFY_SOCKET={address!r} is not a unix socket address")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), target)
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings, or None when systemd expects none.

    As sd_watchdog_enabled(): WATCHDOG_USEC, for this process if WATCHDOG_PID is set.
    Pinging at a quarter of the timeout leaves room for a slow tick or two. The
    variables are removed so that a child of the app does not take them as its own.
    """
    usec = os.environ.pop("WATCHDOG_USEC", None)
    pid = os.environ.pop("WATCHDOG_PID", None)
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 1) / 4e6
    except ValueError:
        return None
