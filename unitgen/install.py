"""Put rendered units in place under systemd, and take them away again."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import shutil
import stat
import sys
import tempfile
from pathlib import Path

from unitgen import manager
from unitgen.errors import Die, die
from unitgen.render import MARKER, check_files, metrics_units, parse_bundle, render_units, spec_file, unit_names
from unitgen.run import run, systemctl
from unitgen.spec import AppSpec, check_manager, parse_name
from unitgen.trust import helper_problem, writable_by_others
from unitgen_worker.contract import ALERT_STATE_DIR, instance_unit, instances_pattern

# systemd's search path when `systemd-analyze unit-paths` cannot say (systemd 252/257).
_FALLBACK_PATHS = ("/etc/systemd/system.control", "/run/systemd/system.control", "/run/systemd/transient",
                   "/run/systemd/generator.early", "/etc/systemd/system", "/etc/systemd/system.attached",
                   "/run/systemd/system", "/run/systemd/system.attached", "/run/systemd/generator",
                   "/usr/local/lib/systemd/system", "/lib/systemd/system", "/usr/lib/systemd/system",
                   "/run/systemd/generator.late")


def read_files(source: str) -> tuple[AppSpec, dict[str, str]]:
    """The spec and units from a bundle file, standard input ('-') or an --out directory."""
    if source == "-":
        if sys.stdin.isatty():
            die("install - reads a bundle on standard input, but it is a terminal",
                hint="pipe it in: unitgen render ... | sudo unitgen install -")
        return parse_bundle(sys.stdin.read(), "standard input")
    path = Path(source)
    try:
        if path.is_dir():
            files = {p.name: p.read_text() for p in sorted(path.iterdir()) if p.is_file()}
            return check_files(files, str(path))
        return parse_bundle(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as err:
        die(f"cannot read {source}: {err.strerror if isinstance(err, OSError) else err}",
            hint="give the bundle file, the --out directory, or - for standard input")


def is_ours(path: Path) -> bool:
    """A regular file (not a link) whose first line is unitgen's marker."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    with os.fdopen(fd) as f:
        try:
            return f.readline().startswith(MARKER)
        except UnicodeDecodeError:
            return False


def unit_dir() -> Path:
    """Where install writes units for the manager in use (cli.py picks it)."""
    return manager.current().unit_dir


def spec_path(name: str) -> Path:
    """The saved spec of app name: beside the units, or in a user's own state directory."""
    return manager.current().spec_dir / spec_file(name)


def unit_search_path() -> list[Path]:
    result = run(["systemd-analyze", *manager.current().flags, "unit-paths"], check=False)
    paths = result.stdout.split() if result.returncode == 0 else []
    fallback = [unit_dir()] if manager.current().user else _FALLBACK_PATHS
    return [Path(p) for p in (paths or fallback)]


def foreign_units(name: str, *, metrics: bool = False) -> list[Path]:
    """Every unit file of name's units anywhere in systemd's search path that install
    did not write: NAME.socket/.target/.service, NAME@.service and NAME@N.service.
    unitgen writes only the first three of its own, and only to unit_dir(); with metrics,
    NAME-metrics.socket and NAME-metrics.service as well."""
    socket, service, target = unit_names(name)
    extra = metrics_units(name) if metrics else ()
    ours = {socket, service, target, *extra}
    found = []
    for directory in unit_search_path():
        for pattern in (socket, target, f"{name}.service", service, instances_pattern(name), *extra):
            for path in sorted(directory.glob(pattern)) if directory.is_dir() else []:
                if not (directory == unit_dir() and path.name in ours and is_ours(path)):
                    found.append(path)
    return found


def installed_spec(name: str) -> AppSpec | None:
    path = spec_path(name)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        die(f"cannot read {path}: {err.strerror}")
    return AppSpec.from_json(text, str(path))


def check_target(spec: AppSpec, *, replace: bool) -> None:
    """Refuse to touch what is not this app's: system units, another app's units."""
    # App "x" writes x-metrics.socket/.service: never over app "x-metrics"'s units, nor
    # the other way round (both are unitgen's, so the marker does not tell them apart).
    if spec.metrics_listen is not None and (unit_dir() / unit_names(f"{spec.name}-metrics")[2]).exists():
        die(f"an app named {spec.name}-metrics is installed; {spec.name}'s metrics units would take its names",
            hint="choose another --name, or uninstall that app first")
    base = spec.name.removesuffix("-metrics")
    if base != spec.name and (other := installed_spec(base)) and other.metrics_listen is not None:
        die(f"{base!r} is installed with --metrics-listen, whose units are named {spec.name}-metrics",
            hint="choose another --name")
    foreign = foreign_units(spec.name, metrics=spec.metrics_listen is not None)
    if foreign:
        die(f"{foreign[0]} exists and was not written by unitgen; {spec.name!r} would shadow or clash with it",
            hint="choose another --name")
    installed = installed_spec(spec.name)
    if installed and (installed.app, installed.workdir) != (spec.app, spec.workdir) and not replace:
        die(f"{spec.name!r} is installed for {installed.app} in {installed.workdir}, not {spec.app} in "
            f"{spec.workdir}", hint="choose another --name, or pass --replace to install over it")
    if spec.user in ("root", "0"):
        die("--user root: the instances would run as root", hint="give the app a user of its own, or no --user "
            "for a dynamic one; binding a port below 1024 needs no root (systemd binds the socket)")
    # The metrics socket too: PID 1 creates, unlinks and re-creates its path all the same.
    sockets = [("--listen", address) for address in spec.listen]
    sockets += [("--metrics-listen", spec.metrics_listen)] if spec.metrics_listen is not None else []
    for option, address in sockets:
        if address.startswith("/") and os.path.lexists(address) and not stat.S_ISSOCK(os.lstat(address).st_mode):
            die(f"{option} {address}: a file that is not a socket is there, and systemd would remove it",
                hint="give a socket path where nothing else lives, such as /run/NAME/http.sock")
        # systemd (root) creates, unlinks and re-creates a unix socket's path.
        if address.startswith("/") and not manager.current().user and (
                problem := writable_by_others(os.path.dirname(address))):
            die(f"{option} {address}: {problem}", hint="put the socket in a directory only root can write, "
                "such as /run")
    if manager.current().user:
        manager.check_user_install(spec.listen)
    if spec.metrics_listen is not None and (problem := helper_problem(spec.helper_python, spec.helper_script)):
        # The exporter runs unitgen's interpreter, never the app's: one only root can
        # change, or another user's code would run as the app's user at every scrape.
        die(f"{problem}; the metrics exporter runs it (--metrics-listen)",
            hint="install unitgen from its .deb and render with it (the exporter is then Debian's python3), "
                 "or give --helper-python/--helper-script files only root can write")
    if spec.on_failure and (problem := helper_problem(spec.helper_python, spec.helper_script)):
        die(f"{problem}; root runs it at every failure (--on-failure)",
            hint="install unitgen from its .deb and render with it (the helper is then Debian's python3 and "
                 "the packaged script), or give --helper-python/--helper-script files only root can write")


def verify(units: dict[str, str]) -> None:
    """systemd-analyze verify on a scratch copy; any output at all is a failure."""
    with tempfile.TemporaryDirectory(prefix="unitgen-verify-") as scratch:
        paths = []
        for unit, text in units.items():
            (Path(scratch) / unit).write_text(text)
            paths.append(str(Path(scratch) / unit))
        result = run(["systemd-analyze", *manager.current().flags, "verify", *paths], check=False)
        output = (result.stdout + result.stderr).strip().replace(scratch + "/", "")
        if result.returncode != 0 or output:
            first = output.splitlines()[0] if output else f"exit code {result.returncode}"
            die(f"the units do not verify: {first}", hint="render them again on this host with `unitgen render`")


def write_files(files: dict[str, str], directory: Path, *, mode: int = 0o644) -> None:
    """Write every file to a temporary name in directory, then rename them all: a reader
    sees the old file or the new one, never half of one, and a failure leaves nothing.

    Everything goes through one descriptor of directory, opened without following a
    link, and each temporary file is created exclusively: whoever else can write in
    directory cannot redirect a write or a removal elsewhere. As root, a directory
    someone else could write is refused outright.
    """
    if os.geteuid() == 0 and (problem := writable_by_others(str(directory))):
        die(f"will not write as root into {directory}: {problem}", hint="give a directory only root can write")
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        die(f"cannot open {directory}: {err.strerror}", hint="give a directory (not a link) that exists")
    written: list[str] = []
    try:
        for name, text in files.items():
            temporary = f".{name}.{secrets.token_hex(6)}.unitgen-tmp"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                         dir_fd=dir_fd)
            written.append(temporary)
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
        for temporary, name in zip(written, files, strict=True):
            os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        written.clear()
        os.fsync(dir_fd)
    except OSError as err:
        die(f"cannot write into {directory}: {err.strerror}")
    finally:
        for temporary in written:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dir_fd)
        os.close(dir_fd)


def filters_clients(socket: str) -> bool:
    """Whether systemd applies the socket's IPAddressAllow=/Deny= (its IP counters run)."""
    value = systemctl("show", "-p", "IPIngressBytes", "--value", socket).stdout.strip()
    return value.isdigit() and int(value) < 2**64 - 1


def for_this_manager(spec: AppSpec, units: dict[str, str]) -> tuple[AppSpec, dict[str, str]]:
    """The bundle's spec and units, made for the manager install talks to: `install --user`
    takes a system bundle (rendered without --manager) and renders it for the user's."""
    wanted = "user" if manager.current().user else "system"
    if spec.manager == wanted:
        return spec, units
    if wanted == "system":
        die(f"{spec.name!r} was rendered for a user manager (--manager user)",
            hint="install it with `unitgen install --user` as that user, or render it without --manager user")
    spec = dataclasses.replace(spec, manager="user")
    check_manager(spec)
    return spec, render_units(spec)


def save(units: dict[str, str], spec: AppSpec) -> None:
    """Write units and the saved spec; the spec last: it is the truth later commands
    read, so it names only units in place."""
    where = manager.current()
    if where.spec_dir == where.unit_dir:
        write_files({**units, spec_file(spec.name): spec.to_json()}, where.unit_dir)
        return
    for directory in (where.unit_dir, where.spec_dir):
        # A user's own directories (~/.config/systemd/user, ~/.local/state/unitgen),
        # created for them as systemd --user and the XDG spec expect.
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as err:
            die(f"cannot create {directory}: {err.strerror}", hint="create it yourself, owned by you")
    write_files(units, where.unit_dir)
    write_files({spec_file(spec.name): spec.to_json()}, where.spec_dir, mode=0o600)


def install(source: str, *, start: bool, replace: bool = False) -> str:
    spec, units = for_this_manager(*read_files(source))
    check_target(spec, replace=replace)
    verify(units)
    socket, _, target = unit_names(spec.name)
    previous = installed_spec(spec.name)
    metrics_were_up = False
    if previous is not None and previous.metrics_listen is not None:
        # The exporter holds its socket's old address: both stop, to start anew below
        # (also with --no-start, if they were running: the app serves on, so do they).
        metrics_were_up = systemctl("is-active", "--quiet", metrics_units(spec.name)[0],
                                    check=False).returncode == 0
        stop_metrics(spec.name, remove=spec.metrics_listen is None)
    save(units, spec)
    systemctl("daemon-reload")
    systemctl("enable", "--quiet", socket, target)
    if spec.metrics_listen is not None:
        systemctl("enable", "--quiet", metrics_units(spec.name)[0])
    if start:
        # The socket first: connections queue in the kernel while instances start.
        systemctl("start", socket)
        if (spec.allow or spec.deny) and not filters_clients(socket):
            uninstall(spec.name)
            die("systemd on this host cannot filter clients by address (no BPF firewall: needs cgroup v2 and "
                "bpf()), so --allow/--deny would do nothing; nothing was installed",
                hint="filter clients in a firewall (nftables) or on the balancer instead, and render without them")
        # A target waits for the Type=notify instances it wants: this returns once
        # every instance has sent READY=1, or fails naming the unit that did not.
        systemctl("start", target)
    if spec.metrics_listen is not None and (start or metrics_were_up):
        systemctl("start", metrics_units(spec.name)[0])
    return spec.name


def metrics_installed(name: str) -> bool:
    """Whether install wrote name's metrics units, as its saved spec says; where that
    cannot be read, whether unitgen's files of those names are there and belong to no
    app named NAME-metrics (install never lets both be)."""
    try:
        spec = installed_spec(name)
    except Die:
        spec = None
    if spec is not None:
        return spec.metrics_listen is not None
    return (not (unit_dir() / unit_names(f"{name}-metrics")[2]).exists()
            and any(is_ours(unit_dir() / unit) for unit in metrics_units(name)))


def stop_metrics(name: str, *, remove: bool) -> None:
    """Stop the exporter and its socket (install saved them: see the spec); with remove,
    disable them and delete their files as well, where they are unitgen's."""
    metrics_socket, metrics_service = metrics_units(name)
    systemctl("stop", metrics_socket, metrics_service, check=False)
    if remove:
        systemctl("disable", "--quiet", metrics_socket, check=False)
        for unit in (metrics_socket, metrics_service):
            if is_ours(unit_dir() / unit):
                (unit_dir() / unit).unlink()
        systemctl("reset-failed", metrics_socket, metrics_service, check=False)


def uninstall(name: str) -> None:
    name = parse_name(name)
    units = unit_names(name)
    paths = [unit_dir() / unit for unit in units]
    # NAME.target or NAME's saved spec: app X's metrics socket is named X-metrics.socket,
    # which is not an app named X-metrics.
    if not (paths[2].exists() or spec_path(name).exists()):
        die(f"no app named {name!r} is installed",
            hint=f"`{' '.join(['systemctl', *manager.current().flags])} list-units '*.target'` lists what runs")
    for path in paths:
        if path.exists() and not is_ours(path):
            die(f"{path} was not written by unitgen", hint="remove it yourself if it is no longer wanted")
    socket, service, target = units
    if metrics_installed(name):
        stop_metrics(name, remove=True)
    instances = instances_pattern(name)
    # One transaction: stopping the instances first would let a new connection on
    # the socket start NAME@0 again (Service=), and the port stays open meanwhile.
    systemctl("stop", socket, target, instances)
    # The restart backoff's files (RuntimeDirectory=, preserved across stops) go with
    # the app; systemd removes them, links and DynamicUser= copies included. The app's
    # own data (StateDirectory=) stays, as apt's remove keeps configuration.
    cleaned = systemctl("clean", "--what=runtime", instance_unit(name, 0), check=False).returncode == 0
    if not cleaned and manager.current().user:
        # A user manager's `clean` needs the user's D-Bus session bus (dbus-user-session),
        # which a host may not have; the directory is the user's own, under
        # $XDG_RUNTIME_DIR: removed here instead (never through a link).
        runtime = manager.current().app_runtime_dir(name)
        if runtime.is_dir() and not runtime.is_symlink():
            shutil.rmtree(runtime, ignore_errors=True)
    systemctl("disable", "--quiet", socket, target, check=False)
    for path in [*paths, spec_path(name)]:
        path.unlink(missing_ok=True)
    # Root's alert helper keeps its counts there; a user manager has no such helper.
    for state in [] if manager.current().user else ALERT_STATE_DIR.glob(f"{instances_pattern(name)}.json"):
        state.unlink(missing_ok=True)
    systemctl("daemon-reload")
    systemctl("reset-failed", socket, instances, check=False)
