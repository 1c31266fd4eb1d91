"""Which systemd manager unitgen talks to: the system's (root) or the invoking user's (--user).

A command picks one once (cli.py) and every path and systemctl/journalctl call follows
it. A user manager runs everything as its user, without privileges: its units, the
saved spec and the runtime files all live in that user's own directories, which no
command that root runs ever reads.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from unitgen.errors import die
from unitgen_worker.contract import runtime_directory

if TYPE_CHECKING:
    from unitgen.spec import AppSpec

MANAGERS = ("system", "user")
LINGER_DIR = Path("/var/lib/systemd/linger")  # logind keeps `loginctl enable-linger` here
_UNPRIVILEGED_PORT_START = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start")


@dataclass(frozen=True)
class Manager:
    """Where one systemd manager keeps what unitgen installs, and how to reach it."""

    user: bool
    unit_dir: Path  # where install writes the units
    spec_dir: Path  # where install saves the spec (the truth later commands read)
    runtime_dir: Path  # what RuntimeDirectory= is relative to: /run, or $XDG_RUNTIME_DIR

    @property
    def flags(self) -> list[str]:
        """systemctl's, journalctl's and systemd-analyze's flag for this manager."""
        return ["--user"] if self.user else []

    def app_runtime_dir(self, name: str) -> Path:
        """Where app name's instances keep their runtime files (counters, board, handover)."""
        return self.runtime_dir / runtime_directory(name)

    @property
    def sudo(self) -> str:
        """How the docs and hints spell a command for this manager."""
        return "unitgen --user" if self.user else "sudo unitgen"


SYSTEM = Manager(user=False, unit_dir=Path("/etc/systemd/system"), spec_dir=Path("/etc/systemd/system"),
                 runtime_dir=Path("/run"))
_current = SYSTEM


def current() -> Manager:
    return _current


def _xdg(variable: str, home: str, default: str) -> Path:
    # As the XDG base directory spec and systemd: a relative value is ignored.
    value = os.environ.get(variable, "")
    return Path(value) if value.startswith("/") else Path(home) / default


def user_manager() -> Manager:
    """The invoking user's manager, once it is known to be there; one-line errors if not."""
    if os.geteuid() == 0:
        die("--user manages your own user's units, and root has no business there",
            hint="run it as the user who owns the app, or install system-wide without --user")
    home = pwd.getpwuid(os.geteuid()).pw_dir
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    how = ("log in as that user (ssh, or `machinectl shell USER@` from root) rather than su/sudo, "
           "or set XDG_RUNTIME_DIR=/run/user/$(id -u)")
    if not runtime.startswith("/"):
        die("no user manager reachable: XDG_RUNTIME_DIR is not set", hint=how)
    private = Path(runtime) / "systemd" / "private"
    try:
        reachable = stat.S_ISSOCK(os.stat(private).st_mode)
    except OSError:
        reachable = False
    if not reachable:
        die(f"no user manager reachable: {private} is not there (user@{os.geteuid()}.service is not running)",
            hint=f"`loginctl enable-linger {_login()}` starts it now and at every boot; or log in as that user "
                 "(ssh, or `machinectl shell USER@`)")
    return Manager(user=True, unit_dir=_xdg("XDG_CONFIG_HOME", home, ".config") / "systemd" / "user",
                   spec_dir=_xdg("XDG_STATE_HOME", home, ".local/state") / "unitgen",
                   runtime_dir=Path(runtime))


# What a user manager cannot do: the spec's field, its flag, and why.
_NEEDS_ROOT = (("user", "--user", "runs the instances as another user"),
               ("on_failure", "--on-failure", "needs root to start the alert unit"),
               ("allow", "--allow", "needs a BPF firewall only root can attach"),
               ("deny", "--deny", "needs a BPF firewall only root can attach"))


def check_manager(spec: AppSpec) -> str:
    """spec.manager, where a user manager can do everything spec asks."""
    if spec.manager not in MANAGERS:
        die(f"--manager {spec.manager!r} is unknown", hint="use system (the default) or user")
    for field, flag, why in _NEEDS_ROOT if spec.manager == "user" else ():
        if getattr(spec, field):
            die(f"{flag} {why}, which a user manager cannot do",
                hint="a user manager runs everything as its user, unprivileged: render without it")
    return spec.manager


def use(manager: Manager) -> None:
    global _current
    _current = manager


def _login() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name


def check_linger() -> None:
    """A user manager without linger stops, with every unit in it, at the user's last
    logout, and starts only at their next login: an app installed so would go down
    with the ssh session that installed it, and stay down after a reboot. That is an
    error, not a warning: it would look fine until the operator logs out."""
    user = _login()
    if not (LINGER_DIR / user).exists():
        die(f"user {user} has no linger: the app would stop at your last logout and not start at boot",
            hint=f"run `loginctl enable-linger {user}` (or ask an admin to), then install again")


def unprivileged_port_start() -> int:
    """The lowest port a user may bind (the kernel's ip_unprivileged_port_start)."""
    try:
        return int(_UNPRIVILEGED_PORT_START.read_text())
    except (OSError, ValueError):
        return 1024


def check_user_install(listen: tuple[str, ...]) -> None:
    """What stops an install under a user manager, said before anything is written."""
    check_linger()
    lowest = unprivileged_port_start()
    for address in listen:
        if address.startswith("/"):
            # The user manager creates and removes the socket file: only in a directory
            # of the user's own, so that nothing outside them is ever written.
            directory = os.path.dirname(address)
            try:
                owner = os.stat(directory).st_uid
            except OSError as err:
                die(f"--listen {address}: {directory}: {err.strerror}", hint="create the directory first")
            if owner != os.geteuid():
                die(f"--listen {address}: {directory} is not yours, and a user install writes only in your "
                    "own directories", hint="give a path under $XDG_RUNTIME_DIR, e.g. $XDG_RUNTIME_DIR/app.sock")
            continue
        port = int(address.rpartition(":")[2])
        if port < lowest:
            die(f"--listen {address}: port {port} is below {lowest}, which only a privileged process may bind "
                "(net.ipv4.ip_unprivileged_port_start)",
                hint="pick a port >= 1024 (and a proxy in front for 80/443), or install system-wide: "
                     "`sudo unitgen install`")
