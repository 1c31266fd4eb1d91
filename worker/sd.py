"""The systemd side of a worker: the sockets it was passed and notifications it sends."""

from __future__ import annotations

import os
import socket

from systemd import daemon


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


def notify(state: str) -> None:
    """sd_notify(); a no-op when NOTIFY_SOCKET is unset (run by hand)."""
    daemon.notify(state)
