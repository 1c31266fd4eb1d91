"""The app spec: one frozen dataclass from the command line to the templates.

Every parser here takes the user's raw string and either returns a checked value or
stops with a one-line error that says how to fix it. Nothing reaches a unit file
without passing through one of them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from dataclasses import asdict, dataclass, fields

from unitgen.errors import die
from unitgen.escape import check_text
from unitgen.manager import check_manager
from unitgen_worker.contract import DRAIN_TIMEOUT, INTERFACES, REQUEST_TIMEOUT, THREADS, WATCHDOG, instance_unit

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
_APP = re.compile(rf"({_DOTTED}):({_DOTTED})")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_ENV_KEY = re.compile(_IDENT)
# A unit name, where %n, %N, %i and %p (this instance's names) may stand, as in
# systemd's own OnFailure=failure-handler@%N.service.
# As systemd's unit_name_is_valid(): PREFIX[@INSTANCE].SUFFIX, both parts non-empty.
_UNIT_PART = r"(?:[A-Za-z0-9_.:-]|%[nNip])+"
_UNIT = re.compile(rf"(?=.{{1,200}}$){_UNIT_PART}(?:@{_UNIT_PART})?\.(?:service|target)")
# useradd's portable set (what systemd accepts for User= without warning; for "nobody" it
# warns that this is not safe), or a uid as systemd's parse_uid() takes it: no leading
# zero, at most 4294967294, not 65535.
_USER = re.compile(r"(?!nobody\Z)[A-Za-z_][A-Za-z0-9_-]{0,30}|0|(?!65535\Z)[1-9][0-9]{0,8}|[1-3][0-9]{9}|4[01][0-9]{8}"
                   r"|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}"
                   r"|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-4]")
HARDENING = ("strict", "relaxed")
# systemd.special(7): names whose units the whole boot relies on. An app named so would
# write NAME.target or NAME.socket over them.
RESERVED_NAMES = frozenset({
    "basic", "blockdev", "bluetooth", "boot-complete", "cryptsetup", "cryptsetup-pre", "ctrl-alt-del",
    "default", "emergency", "exit", "factory-reset", "final", "first-boot-complete", "getty", "getty-pre",
    "graphical", "halt", "hibernate", "hybrid-sleep", "initrd", "initrd-fs", "initrd-root-device",
    "initrd-root-fs", "initrd-switch-root", "initrd-usr-fs", "integritysetup", "kbrequest", "kexec",
    "local-fs", "local-fs-pre", "machines", "multi-user", "network", "network-online", "network-pre",
    "nss-lookup", "nss-user-lookup", "paths", "poweroff", "printer", "reboot", "remote-cryptsetup",
    "remote-fs", "remote-fs-pre", "rescue", "rpcbind", "shutdown", "sigpwr", "sleep", "slices", "smartcard",
    "sockets", "sound", "suspend", "suspend-then-hibernate", "swap", "sysinit", "system-update",
    "system-update-pre", "time-set", "time-sync", "timers", "tpm2", "umount", "usb", "user", "veritysetup",
})
# Variables that glibc or its loader act on before Python starts (its list of unsecure
# variables, plus TZ naming a file). The instances' Environment= also reaches the root
# alert helper, so these are refused whenever that helper is rendered (--on-failure).
ROOT_UNSAFE_ENV = frozenset({
    "GCONV_PATH", "GETCONF_DIR", "GLIBC_TUNABLES", "HOSTALIASES", "LOCALDOMAIN", "LOCPATH", "MALLOC_TRACE",
    "NIS_PATH", "NLSPATH", "RESOLV_HOST_CONF", "RES_OPTIONS", "TMPDIR", "TZDIR",
})
SPEC_SCHEMA = 1
MAX_INSTANCES = 1024
MAX_THREADS = 1024  # per instance
VERIFY_INSTANCE = "test_instance"  # what systemd-analyze verify (257) instantiates a template with
MAX_CONCURRENCY = 1_000_000
MAX_REQUESTS = 1_000_000_000
# Two Python processes (the old and the new one during a recycle) fit in the smallest.
MIN_MEMORY_MAX = 64 << 20
MAX_MEMORY_MAX = 1 << 50
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
    watchdog: int = WATCHDOG  # WatchdogSec=; 0 turns the watchdog off
    drain_timeout: int = DRAIN_TIMEOUT  # seconds in-flight requests get after SIGTERM
    threads: int = THREADS  # a WSGI app's threads per instance
    max_concurrency: int = 0  # requests in flight that fill an instance; 0: its threads (WSGI), none (ASGI)
    request_timeout: int = REQUEST_TIMEOUT  # seconds before a request counts as stuck; 0: never
    rebalance: bool = True  # keep-alive clients of an instance over its share move to a sibling
    max_requests: int = 0  # an instance swaps itself for a fresh process after this many; 0: never
    max_requests_jitter: int = 0  # plus a random 0..this, drawn by each process
    memory_max: int = 0  # bytes: MemoryMax= of each instance, which recycles itself below it; 0: none
    on_failure: str | None = None  # OnFailure= unit, e.g. an alerting service
    writable: tuple[str, ...] = ()  # ReadWritePaths= beside the state directory
    hardening: str = "strict"  # or "relaxed": the documented escape hatch
    allow: tuple[str, ...] = ()  # IPAddressAllow= on the socket: the clients served
    deny: tuple[str, ...] = ()  # IPAddressDeny= on the socket
    # ListenStream= of NAME-metrics.socket, where unitgen's exporter answers Prometheus
    # (the instances then count responses and time them); None: no metrics units.
    metrics_listen: str | None = None
    # unitgen's own interpreter and alert script: root runs them (only with on_failure),
    # so install checks that only root can write them.
    helper_python: str = "/usr/bin/python3"
    helper_script: str = "/usr/lib/python3/dist-packages/unitgen_worker/alert.py"
    manager: str = "system"  # or "user": units for a user's own systemd (`systemctl --user`)

    @property
    def instance_names(self) -> list[str]:
        return [instance_unit(self.name, i) for i in range(self.instances)]

    @property
    def dynamic_user(self) -> str:
        """The DynamicUser= name without --user: never an existing system user's name.

        Without User=, systemd would name the dynamic user after the unit's prefix,
        and use a static user of that name if one exists (--name postgres would run as
        postgres). "unitgen-NAME" where it is a valid user name, else a hash of NAME.
        """
        candidate = f"unitgen-{self.name}"
        if len(candidate) <= 31 and re.fullmatch(r"[a-z_][a-z0-9_-]*", candidate):
            return candidate
        return "unitgen-" + hashlib.sha256(self.name.encode()).hexdigest()[:16]

    def to_json(self) -> str:
        """The saved form install keeps beside the units; from_json reads it back."""
        data = asdict(self)
        if self.metrics_listen is None:  # a spec without metrics reads as before this field existed
            del data["metrics_listen"]
        if self.manager == "system":  # a system spec reads as before this field existed
            del data["manager"]
        return json.dumps({"schema": SPEC_SCHEMA, **data}, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> AppSpec:
        """Every field through its parser again: a saved or piped spec is input like any other."""
        hint = "render it again with `unitgen render`"
        try:
            data = json.loads(text)
        except ValueError as err:
            die(f"{source} is not valid JSON: {err}", hint=hint)
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or data.get("schema") != SPEC_SCHEMA or not known >= set(data) - {"schema"}:
            die(f"{source} is not a unitgen spec of schema {SPEC_SCHEMA}", hint=hint)
        try:
            return validated(cls(**{k: v for k, v in data.items() if k != "schema"}))
        except (TypeError, ValueError, AttributeError) as err:
            die(f"{source} has a malformed spec: {err}", hint=hint)


def validated(spec: AppSpec) -> AppSpec:
    """spec with every value passed through its parser (they raise Die on bad input)."""
    def strings(values, what):
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
            raise ValueError(f"{what} is not a list of strings")
        return tuple(values)

    env = tuple(parse_env(f"{k}={v}") for k, v in (tuple(pair) for pair in spec.env))
    on_failure = parse_unit("--on-failure", spec.on_failure) if spec.on_failure is not None else None
    if on_failure:
        check_root_safe_env(env)
        check_on_failure(spec.name, on_failure)
    for what, value in (("instances", spec.instances), ("watchdog", spec.watchdog),
                        ("drain_timeout", spec.drain_timeout), ("threads", spec.threads),
                        ("max_concurrency", spec.max_concurrency), ("request_timeout", spec.request_timeout),
                        ("max_requests", spec.max_requests), ("max_requests_jitter", spec.max_requests_jitter),
                        ("memory_max", spec.memory_max)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{what} is not a whole number")
    if not isinstance(spec.rebalance, bool):
        raise ValueError("rebalance is not true or false")
    return AppSpec(
        name=parse_name(spec.name),
        app=parse_app(spec.app),
        instances=parse_cores(str(spec.instances), usable=1, what="instances"),
        listen=parse_listens(strings(spec.listen, "listen")),
        workdir=parse_path("--workdir", spec.workdir),
        python=parse_executable("--python", spec.python),
        env=env,
        user=parse_user(spec.user) if spec.user is not None else None,
        interface=parse_interface(spec.interface),
        watchdog=parse_seconds("--watchdog", str(spec.watchdog), minimum=0),
        drain_timeout=parse_seconds("--drain-timeout", str(spec.drain_timeout), minimum=1),
        threads=parse_count("--threads", str(spec.threads), minimum=1, maximum=MAX_THREADS),
        max_concurrency=parse_count("--max-concurrency", str(spec.max_concurrency), minimum=0,
                                    maximum=MAX_CONCURRENCY),
        request_timeout=parse_seconds("--request-timeout", str(spec.request_timeout), minimum=0),
        rebalance=spec.rebalance,
        **parse_recycling(str(spec.max_requests), str(spec.max_requests_jitter), str(spec.memory_max)),
        on_failure=on_failure,
        writable=tuple(parse_path("--writable", v) for v in strings(spec.writable, "writable")),
        hardening=parse_hardening(spec.hardening),
        allow=tuple(parse_cidr("--allow", v) for v in strings(spec.allow, "allow")),
        deny=tuple(parse_cidr("--deny", v) for v in strings(spec.deny, "deny")),
        metrics_listen=(parse_metrics_listen(spec.metrics_listen, parse_listens(strings(spec.listen, "listen")),
                                             spec.user) if spec.metrics_listen is not None else None),
        helper_python=parse_executable("--helper-python", spec.helper_python),
        helper_script=parse_executable("--helper-script", spec.helper_script),
        manager=check_manager(spec),
    )


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
    if value in RESERVED_NAMES or value.startswith("systemd-"):
        die(f"--name {value!r} is one of systemd's own unit names",
            hint="choose a name of the app's own, for example --name shop-api")
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
    # systemd's path_is_valid(): NAME_MAX per component, PATH_MAX in all, in bytes.
    if len(value.encode()) >= 4096 or any(len(part.encode()) > 255 for part in value.split("/")):
        die(f"{what} has a name longer than 255 bytes or is longer than 4095 bytes", hint=hint)
    return value


def parse_path(what: str, value: str) -> str:
    return _check_path(what, value, f"give {what} as an absolute path such as /srv/myapp")


def parse_executable(what: str, value: str) -> str:
    path = parse_path(what, value)
    # systemd drops an Exec line whose program ends in '/' ("specifies a directory").
    if path.endswith("/"):
        die(f"{what} {value!r} is a directory, not a program",
            hint="give the interpreter's own path, e.g. /usr/bin/python3")
    # systemd refuses to exec a path with quotes or backslashes (string_is_safe()).
    if "'" in path or '"' in path:
        die(f"{what} {value!r} has a quote, which systemd does not accept in a program's path",
            hint="use a path without quotes, e.g. a symlink to the interpreter")
    return path


def parse_listens(values: tuple[str, ...]) -> tuple[str, ...]:
    """Every --listen, at least one, none twice."""
    listen = tuple(parse_listen(value) for value in values)
    if not listen:
        die("no --listen address", hint="give at least one, for example --listen 127.0.0.1:8000")
    if len(set(listen)) != len(listen):
        die("--listen names the same address twice", hint="give each address once")
    return listen


def parse_listen(value: str, flag: str = "--listen") -> str:
    """[HOST:]PORT, [IPV6]:PORT or /path.sock -> the ListenStream= value."""
    hint = f"use {flag} PORT, HOST:PORT, [IPV6]:PORT or /run/NAME.sock"
    check_text(flag, value, hint=hint)
    if value.startswith("/"):
        _check_path(flag, value, hint)
        if value == "/":
            die(f"{flag} / is a directory, not a socket path", hint=hint)
        if len(value.encode()) > _UNIX_PATH_MAX:
            die(f"{flag} {value!r} is longer than a unix socket path may be", hint=hint)
        return value
    host, sep, port = value.rpartition(":")
    if not re.fullmatch(r"[0-9]{1,5}", port) or not 1 <= int(port) <= 65535:
        die(f"{flag} {value!r} has no port from 1 to 65535", hint=hint)
    if not sep:
        return port
    if host.startswith("[") and host.endswith("]"):
        # Python takes an IPv6 zone ("fe80::1%eth0"); ListenStream= does not.
        if "%" in host:
            die(f"{flag} {value!r} has an IPv6 zone (%...)", hint=hint + "; bind the address without a zone")
        try:
            return f"[{ipaddress.IPv6Address(host[1:-1])}]:{int(port)}"
        except ValueError:
            die(f"{flag} {value!r} has an invalid IPv6 address", hint=hint)
    try:
        return f"{ipaddress.IPv4Address(host)}:{int(port)}"
    except ValueError:
        die(f"{flag} {value!r} needs a numeric IPv4 address or [IPv6] before the port", hint=hint)


def parse_metrics_listen(value: str, listen: tuple[str, ...], user: str | None) -> str:
    """--metrics-listen as --listen takes an address, on none of the app's own: scrapes
    must never reach the app, nor the app's clients the exporter. The exporter runs as
    the app's --user and asks systemd over D-Bus, which refuses a dynamic user
    (dbus-daemon cannot resolve one: systemd issue 22737)."""
    address = parse_listen(value, "--metrics-listen")

    def port_of(addr: str) -> str | None:
        return None if addr.startswith("/") else addr.rpartition(":")[2]

    def all_addresses(addr: str) -> bool:  # a bare port, or the wildcard address
        return ":" not in addr or addr.startswith(("0.0.0.0:", "[::]:"))

    for own in listen:
        same_port = port_of(address) is not None and port_of(address) == port_of(own)
        if own == address or (same_port and (all_addresses(own) or all_addresses(address))):
            die(f"--metrics-listen {value!r} is the app's own --listen {own}",
                hint="give the metrics their own port, for example --metrics-listen 127.0.0.1:9100")
    if user is None:
        die("--metrics-listen needs --user: the exporter runs as the app's user, and the system bus "
            "(dbus-daemon) refuses the dynamic user the app gets without one",
            hint="give the app a user of its own, for example --user myapp (useradd --system myapp)")
    return address


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


def check_on_failure(name: str, unit: str) -> None:
    """--on-failure must not name one of the app's own units, whatever the instance."""
    # The longest instance gives the longest name, and systemd drops a name over 255
    # characters: the highest instance number, and "test_instance", the instance that
    # `systemd-analyze verify` (257) gives a template it checks.
    def expand(instance: str) -> str:
        return (unit.replace("%N", f"{name}@{instance}").replace("%n", f"{name}@{instance}.service")
                .replace("%p", name).replace("%i", instance))
    expanded = expand(str(MAX_INSTANCES - 1))
    if max(len(expanded), len(expand(VERIFY_INSTANCE))) > 255:
        die(f"--on-failure {unit!r} is longer than 255 characters once expanded",
            hint="give a shorter unit name, such as alert@%n.service")
    if expanded.startswith(f"{name}@") or expanded in (f"{name}.target", f"{name}.service"):
        die(f"--on-failure {unit!r} names one of the app's own units",
            hint="give the unit that alerts, such as alert@%n.service")


def check_root_safe_env(env: tuple[tuple[str, str], ...]) -> None:
    hint = ("--on-failure runs a helper as root, and the instances' environment reaches it; "
            "set this variable in the app itself, or drop --on-failure")
    for key, value in env:
        if key.startswith("LD_") or key in ROOT_UNSAFE_ENV:
            die(f"--env {key} acts on programs before they start", hint=hint)
        if key == "TZ" and (value.lstrip(":").startswith("/") or ".." in value):
            die(f"--env TZ={value!r} names a file", hint=hint + ", or give TZ as a zone name such as Europe/Paris")


def parse_hardening(value: str) -> str:
    if value not in HARDENING:
        die(f"--hardening {value!r} is unknown", hint="use strict (the default) or relaxed")
    return value


def parse_cidr(flag: str, value: str) -> str:
    """An IP address or network for IPAddressAllow=/IPAddressDeny=, normalised."""
    hint = f"give {flag} as an address or network such as 10.0.0.0/8, 192.0.2.7 or ::1, or any, localhost"
    check_text(flag, value, hint=hint)
    if value in ("any", "localhost", "link-local", "multicast"):
        return value
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        die(f"{flag} {value!r} is not an IP address or network", hint=hint)
    # Python takes an IPv6 zone ("fe80::1%eth0"); systemd's address lists do not.
    if "%" in str(network):
        die(f"{flag} {value!r} has an IPv6 zone (%...), which systemd does not filter by", hint=hint)
    return str(network)


def parse_interface(value: str) -> str:
    if value not in INTERFACES:
        die(f"--interface {value!r} is unknown", hint="use auto, asgi or wsgi")
    return value


def parse_seconds(flag: str, value: str, *, minimum: int, maximum: int = 3600) -> int:
    return parse_count(flag, value, minimum=minimum, maximum=maximum, digits=6, what="a number of seconds",
                       hint=f"give {flag} as whole seconds from {minimum} to {maximum}")


def parse_count(flag: str, value: str, *, minimum: int, maximum: int, digits: int = 7,
                what: str = "a whole number", hint: str | None = None) -> int:
    hint = hint or f"give {flag} as a whole number from {minimum} to {maximum}"
    if not re.fullmatch(rf"[0-9]{{1,{digits}}}", value or ""):
        die(f"{flag} {value!r} is not {what}", hint=hint)
    if not minimum <= int(value) <= maximum:
        die(f"{flag} {value} is out of range", hint=hint)
    return int(value)


def parse_recycling(max_requests: str, jitter: str, memory_max: str) -> dict[str, int]:
    """--max-requests, --max-requests-jitter and --memory-max, as AppSpec fields."""
    requests = parse_count("--max-requests", max_requests, minimum=0, maximum=MAX_REQUESTS, digits=10)
    jitter_count = parse_count("--max-requests-jitter", jitter, minimum=0, maximum=MAX_REQUESTS, digits=10)
    if jitter_count and not requests:
        die("--max-requests-jitter needs --max-requests",
            hint="give --max-requests N as well, for example --max-requests 5000 --max-requests-jitter 500")
    return {"max_requests": requests, "max_requests_jitter": jitter_count, "memory_max": parse_size(memory_max)}


def parse_size(value: str) -> int:
    """--memory-max as systemd writes sizes (K, M, G, T: powers of 1024), in bytes; 0: none."""
    hint = f"give --memory-max as a size such as 512M or 2G (at least {MIN_MEMORY_MAX >> 20}M), or 0 for no limit"
    match = re.fullmatch(r"([0-9]{1,16})([KMGT]?)", value or "")
    if not match:
        die(f"--memory-max {value!r} is not a size", hint=hint)
    size = int(match.group(1)) << (10 * " KMGT".index(match.group(2) or " "))
    if size and not MIN_MEMORY_MAX <= size <= MAX_MEMORY_MAX:
        die(f"--memory-max {value} is out of range", hint=hint)
    return size


def parse_unit(flag: str, value: str) -> str:
    hint = f"give {flag} as a unit name such as alert@%n.service (specifiers %n %N %i %p)"
    check_text(flag, value, hint=hint)
    if not _UNIT.fullmatch(value) or value.startswith("-"):
        die(f"{flag} {value!r} is not a .service or .target unit name", hint=hint)
    return value
