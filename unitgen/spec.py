"""The app spec: one frozen dataclass from the command line to the templates.

Every parser here takes the user's raw string and either returns a checked value or
stops with a one-line error that says how to fix it. Nothing reaches a unit file
without passing through one of them.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from unitgen.errors import die
from unitgen.escape import check_text

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
_APP = re.compile(rf"({_DOTTED}):({_DOTTED})")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_ENV_KEY = re.compile(_IDENT)
# useradd's portable set (what systemd accepts for User= without warning) or a uid.
# A unit name, where %n, %N, %i and %p (this instance's names) may stand, as in
# systemd's own OnFailure=failure-handler@%N.service.
# As systemd's unit_name_is_valid(): PREFIX[@INSTANCE].SUFFIX, both parts non-empty.
_UNIT_PART = r"(?:[A-Za-z0-9_.:-]|%[nNip])+"
_UNIT = re.compile(rf"(?=.{{1,200}}$){_UNIT_PART}(?:@{_UNIT_PART})?\.(?:service|target)")
_USER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]{0,30}|[0-9]{1,10}")
INTERFACES = ("auto", "asgi", "wsgi")
MAX_INSTANCES = 1024
# sun_path holds 108 bytes including the terminating NUL.
_UNIX_PATH_MAX = 107


@dataclass(frozen=True)
class AppSpec:
    """What to run and how; rendered into NAME.socket, NAME@.service, NAME.target."""

    name: str
    app: str  # MODULE:ATTR
    instances: int
    listen: tuple[str, ...]  # ListenStream= values, normalised
    workdir: str
    python: str
    env: tuple[tuple[str, str], ...] = ()
    user: str | None = None
    interface: str = "auto"
    watchdog: int = 10  # WatchdogSec=; 0 turns the watchdog off
    drain_timeout: int = 30  # seconds in-flight requests get after SIGTERM
    on_failure: str | None = None  # OnFailure= unit, e.g. an alerting service

    @property
    def instance_names(self) -> list[str]:
        return [f"{self.name}@{i}.service" for i in range(self.instances)]


def parse_app(value: str) -> str:
    hint = "give it as MODULE:ATTR, for example --app myapp:app or --app pkg.web:application"
    check_text("--app", value, hint=hint)
    if ":" not in value:
        die(f"--app {value!r} has no colon", hint=hint)
    if not _APP.fullmatch(value):
        die(f"--app {value!r} is not a dotted module and attribute name", hint=hint)
    return value


def default_name(app: str) -> str:
    """The unit name from the app: the top-level package of MODULE."""
    return app.split(":", 1)[0].split(".", 1)[0]


def parse_name(value: str) -> str:
    hint = "use letters, digits, '_', '.' and '-' (at most 64), for example --name shop-api"
    check_text("--name", value, hint=hint)
    if not _NAME.fullmatch(value) or ".." in value or value.endswith("."):
        die(f"--name {value!r} is not a valid unit name", hint=hint)
    return value


def parse_cores(value: str, *, usable: int, what: str = "--cores") -> int:
    """'auto' is the number of CPUs this process may use; otherwise a whole number >= 1."""
    hint = f"use {what} auto (here {usable}) or a whole number from 1 to {MAX_INSTANCES}"
    if value == "auto":
        return max(1, usable)
    if not re.fullmatch(r"[0-9]+", value or ""):
        die(f"{what} {value!r} is not a number", hint=hint)
    count = int(value)
    if not 1 <= count <= MAX_INSTANCES:
        die(f"{what} {value} is out of range", hint=hint)
    return count


def _check_path(what: str, value: str, hint: str) -> str:
    check_text(what, value, hint=hint)
    if not value.startswith("/"):
        die(f"{what} {value!r} is not an absolute path", hint=hint)
    # systemd takes these values as they are: a backslash or surrounding white space
    # would be read differently, and a non-normalised path is refused by some keys.
    if "\\" in value or value != value.strip():
        die(f"{what} {value!r} has a backslash or surrounding white space", hint=hint)
    if os.path.normpath(value) != value or value.startswith("//"):
        die(f"{what} {value!r} is not a normalised path", hint=hint)
    return value


def parse_path(what: str, value: str) -> str:
    return _check_path(what, value, f"give {what} as an absolute path such as /srv/myapp")


def parse_executable(what: str, value: str) -> str:
    path = parse_path(what, value)
    # systemd refuses to exec a path with quotes or backslashes (string_is_safe()).
    if "'" in path or '"' in path:
        die(f"{what} {value!r} has a quote, which systemd does not accept in a program's path",
            hint="use a path without quotes, e.g. a symlink to the interpreter")
    return path


def parse_listen(value: str) -> str:
    """[HOST:]PORT, [IPV6]:PORT or /path.sock -> the ListenStream= value."""
    hint = "use --listen PORT, HOST:PORT, [IPV6]:PORT or /run/NAME.sock"
    check_text("--listen", value, hint=hint)
    if value.startswith("/"):
        _check_path("--listen", value, hint)
        if len(value.encode()) > _UNIX_PATH_MAX:
            die(f"--listen {value!r} is longer than a unix socket path may be", hint=hint)
        return value
    host, sep, port = value.rpartition(":")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        die(f"--listen {value!r} has no port from 1 to 65535", hint=hint)
    if not sep:
        return port
    if host.startswith("[") and host.endswith("]"):
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]:{int(port)}"
        except ValueError:
            die(f"--listen {value!r} has an invalid IPv6 address", hint=hint)
    try:
        return f"{ipaddress.IPv4Address(host)}:{int(port)}"
    except ValueError:
        die(f"--listen {value!r} needs a numeric IPv4 address or [IPv6] before the port", hint=hint)


def parse_env(value: str) -> tuple[str, str]:
    hint = "use --env KEY=VALUE with KEY made of letters, digits and '_'"
    check_text("--env", value, hint=hint)
    key, sep, val = value.partition("=")
    if not sep or not _ENV_KEY.fullmatch(key):
        die(f"--env {value!r} is not KEY=VALUE", hint=hint)
    return key, val


def parse_user(value: str) -> str:
    hint = "give an existing user name such as www-data, or a numeric uid"
    check_text("--user", value, hint=hint)
    if not _USER.fullmatch(value):
        die(f"--user {value!r} is not a valid user name", hint=hint)
    return value


def parse_interface(value: str) -> str:
    if value not in INTERFACES:
        die(f"--interface {value!r} is unknown", hint="use auto, asgi or wsgi")
    return value


def parse_seconds(flag: str, value: str, *, minimum: int, maximum: int = 3600) -> int:
    hint = f"give {flag} as whole seconds from {minimum} to {maximum}"
    if not re.fullmatch(r"[0-9]{1,6}", value or ""):
        die(f"{flag} {value!r} is not a number of seconds", hint=hint)
    if not minimum <= int(value) <= maximum:
        die(f"{flag} {value} is out of range", hint=hint)
    return int(value)


def parse_unit(flag: str, value: str) -> str:
    hint = f"give {flag} as a unit name such as alert@%n.service (specifiers %n %N %i %p)"
    check_text(flag, value, hint=hint)
    if not _UNIT.fullmatch(value):
        die(f"{flag} {value!r} is not a .service or .target unit name", hint=hint)
    return value
