"""Put rendered units in place under systemd, and take them away again."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from unitgen.errors import die
from unitgen.render import MARKER, check_units, parse_bundle, unit_names
from unitgen.run import run, systemctl
from unitgen.spec import parse_name
from unitgen_worker.backoff import STATE_DIR as BACKOFF_DIR

UNIT_DIR = Path("/etc/systemd/system")


def read_units(source: str) -> dict[str, str]:
    """Units from a bundle file, standard input ('-') or an --out directory."""
    if source == "-":
        if sys.stdin.isatty():
            die("install - reads a bundle on standard input, but it is a terminal",
                hint="pipe it in: unitgen render ... | sudo unitgen install -")
        return parse_bundle(sys.stdin.read(), "standard input")
    path = Path(source)
    try:
        if path.is_dir():
            units = {p.name: p.read_text() for p in sorted(path.iterdir()) if p.is_file()}
            return check_units(units, str(path))
        return parse_bundle(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError) as err:
        die(f"cannot read {source}: {err.strerror if isinstance(err, OSError) else err}",
            hint="give the bundle file, the --out directory, or - for standard input")


def is_ours(path: Path) -> bool:
    try:
        with path.open() as f:
            return f.readline().startswith(MARKER)
    except (OSError, UnicodeDecodeError):
        return False


def verify(units: dict[str, str]) -> None:
    """systemd-analyze verify on a scratch copy; any output at all is a failure."""
    with tempfile.TemporaryDirectory(prefix="unitgen-verify-") as scratch:
        paths = []
        for unit, text in units.items():
            (Path(scratch) / unit).write_text(text)
            paths.append(str(Path(scratch) / unit))
        result = run(["systemd-analyze", "verify", *paths], check=False)
        output = (result.stdout + result.stderr).strip().replace(scratch + "/", "")
        if result.returncode != 0 or output:
            first = output.splitlines()[0] if output else f"exit code {result.returncode}"
            die(f"the units do not verify: {first}", hint="render them again on this host with `unitgen render`")


def write_units(units: dict[str, str], unit_dir: Path = UNIT_DIR) -> None:
    """Each unit is written to a scratch directory beside its target, then renamed."""
    for unit in units:
        target = unit_dir / unit
        if target.exists() and not is_ours(target):
            die(f"{target} exists and was not written by unitgen",
                hint="choose another --name, or remove that unit yourself")
    scratch = Path(tempfile.mkdtemp(prefix=".unitgen-", dir=unit_dir))
    try:
        for unit, text in units.items():
            with (scratch / unit).open("w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            (scratch / unit).chmod(0o644)
        for unit in units:
            os.replace(scratch / unit, unit_dir / unit)
    finally:
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()


def install(source: str, *, start: bool) -> str:
    units = read_units(source)
    verify(units)
    socket, _, target = units
    name = socket.removesuffix(".socket")
    write_units(units)
    systemctl("daemon-reload")
    systemctl("enable", "--quiet", socket, target)
    if start:
        # The socket first: connections queue in the kernel while instances start.
        systemctl("start", socket)
        # A target waits for the Type=notify instances it wants: this returns once
        # every instance has sent READY=1, or fails naming the unit that did not.
        systemctl("start", target)
    return name


def uninstall(name: str) -> None:
    name = parse_name(name)
    units = unit_names(name)
    paths = [UNIT_DIR / unit for unit in units]
    if not any(path.exists() for path in paths):
        die(f"no app named {name!r} is installed", hint="`systemctl list-units '*.target'` lists what runs")
    for path in paths:
        if path.exists() and not is_ours(path):
            die(f"{path} was not written by unitgen", hint="remove it yourself if it is no longer wanted")
    socket, service, target = units
    instances = service.replace("@.", "@*.")
    # One transaction: stopping the instances first would let a new connection on
    # the socket start NAME@0 again (Service=), and the port stays open meanwhile.
    systemctl("stop", socket, target, instances)
    systemctl("disable", "--quiet", socket, target, check=False)
    for path in paths:
        path.unlink(missing_ok=True)
    # The restart backoff's counts (worker/backoff.py) go with the app.
    for state in BACKOFF_DIR.glob(f"{name}@*.service.json"):
        state.unlink(missing_ok=True)
    systemctl("daemon-reload")
    systemctl("reset-failed", socket, instances, check=False)
