"""The systemd side of a worker: the sockets it was passed and notifications it sends."""

from __future__ import annotations

import logging
import os
import socket

from systemd import daemon

log = logging.getLogger("unitgen.worker")
_failing = False


class NoSocketError(Exception):
    pass


def adopt_listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed in (fd 3 onwards), of whatever family.

    listen_fds() checks that LISTEN_PID is this process and unsets LISTEN_* so that a
    child of the app never takes them for its own. The fds belong to systemd's socket
    unit: they are never shut down or unlinked here, only this process's copy closed.
    """
    fds = daemon.listen_fds(unset_environment=True)
    # sd_listen_fds() unsets them in the C environment only; os.environ is Python's
    # copy and is what subprocess hands to the app's children.
    for variable in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(variable, None)
    if not fds:
        raise NoSocketError(
            "no listening socket was passed in (LISTEN_FDS/LISTEN_PID unset or not for this "
            "process); run it as NAME@N.service with Sockets=NAME.socket"
        )
    # socket(fileno=) reads family and type from the fd: IPv4, IPv6 and unix alike.
    return [socket.socket(fileno=fd) for fd in fds]


def notify(state: str) -> bool:
    """sd_notify(); a no-op when NOTIFY_SOCKET is unset (run by hand).

    Never raises: python-systemd raises OSError when the datagram is refused (PID 1
    re-executing, a receiver gone), and a lost STATUS= or ping must not take down the
    loop that drains and pings.
    """
    global _failing
    try:
        sent = bool(daemon.notify(state))
    except OSError as err:
        if not _failing:  # once per outage, not once a second
            log.warning("sd_notify(%s) failed: %s", state.split("=", 1)[0], err)
        _failing = True
        return False
    _failing = False
    return sent


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
