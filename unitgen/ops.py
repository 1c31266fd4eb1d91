"""Day-2 operations on an installed app: roll, scale, logs (systemd does the supervising)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime

from unitgen import manager
from unitgen.errors import die
from unitgen.escape import printable
from unitgen.install import save
from unitgen.render import render_files
from unitgen.run import log, run, stream, systemctl
from unitgen.state import App, show
from unitgen_worker.contract import HOLD, instances_pattern


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _journal_tail(unit: str, lines: int = 15) -> str:
    out = run(["journalctl", *manager.current().flags, "--no-pager", "-o", "cat", "-n", str(lines), "-u", unit],
              check=False).stdout
    # The app writes these lines: no escape sequence of its reaches the operator's terminal.
    return "\n".join(f"    {printable(line)}" for line in out.rstrip().splitlines())


def roll(name: str, *, pause: float = 0.0, all_at_once: bool = False, hold: float = HOLD,
         restart: bool = False) -> None:
    """Swap every instance's process, one at a time; stop at the first that does not take.

    `systemctl reload` starts the new process beside the old one, which serves until the
    new one is ready and then drains (unitgen_worker.handover): capacity never drops. An
    instance whose unit changed since it started (a new render: ExecStart=, Environment=)
    is restarted instead, as a reload would run the old command line: it drains, and
    `systemctl restart` returns once the new process sent READY=1. Either way the
    instance is then watched for `hold` seconds: a release that exits or restarts soon
    after READY stops the roll, and the instances not reached keep the old release.
    """
    app = App(name)
    units = app.wanted()
    if not units:
        die(f"{app.target} wants no instances", hint=f"scale it up: unitgen scale {app.name} N")
    if all_at_once:
        began = time.monotonic()
        result = systemctl("restart", *units, check=False)
        if result.returncode != 0:
            states = show(units, ["ActiveState"])
            failed = [u for u, s in zip(units, states, strict=True) if s.get("ActiveState") != "active"]
            _fail(failed[0] if failed else units[0], "did not become ready")
        _say(f"restarted {len(units)} instances together in {time.monotonic() - began:.2f} s")
        return
    changed = app.units_changed_at()
    for position, unit in enumerate(units, 1):
        before = show([unit], _WATCHED)[0]
        how = "reload" if not restart and _runs_current_units(before, changed) else "restart"
        began = time.monotonic()
        result = systemctl(how, unit, check=False)
        took = time.monotonic() - began
        left = len(units) - position
        if result.returncode != 0:
            what = "did not become ready" if how == "restart" else "could not swap its process (the old one serves on)"
            _fail(unit, what, left=left)
        after = show([unit], _WATCHED)[0]
        done = "swapped" if how == "reload" else "restarted"
        _say(f"[{position}/{len(units)}] {unit} {done} in {took:.2f} s "
             f"(pid {before.get('MainPID', '?')} -> {after.get('MainPID', '?')})")
        if hold > 0:
            _hold(unit, after, hold, left=left)
        if pause and position < len(units):
            time.sleep(pause)
    _say(f"rolled {len(units)} instances of {app.name}")


_WATCHED = ["MainPID", "NRestarts", "ActiveState", "ActiveEnterTimestampMonotonic", "NeedDaemonReload", "CanReload"]
# Seconds between looks at an instance during its hold. What a look finds stays: an exit
# or a restart moves NRestarts or leaves ActiveState off "active" for good, so a slower
# look misses nothing. Each look is a systemctl process and a D-Bus call to PID 1,
# 12 ms of CPU here: every 0.1 s that was a tenth of a core taken from the instances
# for the whole roll.
HOLD_POLL = 0.5


def _runs_current_units(unit: dict[str, str], changed: float) -> bool:
    """Whether the instance started after its unit files last changed (CLOCK_MONOTONIC;
    a reload leaves ActiveEnterTimestamp as it is), so that a new process started like
    the running one runs what is installed now."""
    entered = int(unit.get("ActiveEnterTimestampMonotonic") or 0) / 1e6
    # CanReload=no: rendered before reloads existed. NeedDaemonReload=yes: its files
    # changed and systemd has not read them yet. "reloading": it is swapping itself
    # (--max-requests, --memory-max, a reload of its own); systemd holds the reload job
    # until that swap is over, then runs it (unit_reload(): -EAGAIN while reloading).
    # A restart there would stop the old process mid-swap.
    return (unit.get("ActiveState") in ("active", "reloading") and entered > changed and unit.get("CanReload") == "yes"
            and unit.get("NeedDaemonReload") != "yes")


def _hold(unit: str, ready: dict[str, str], hold: float, *, left: int) -> None:
    """Watches an instance for hold seconds after it became ready; stops the roll when its
    process exits or systemd restarts it meanwhile. A new MainPID with no restart is the
    instance swapping itself (--max-requests, --memory-max): that is no failure."""
    until = time.monotonic() + hold
    while (left_to_hold := until - time.monotonic()) > 0:
        time.sleep(min(HOLD_POLL, left_to_hold))
        now = show([unit], _WATCHED)[0]
        if now.get("NRestarts") != ready.get("NRestarts") or now.get("ActiveState") not in ("active", "reloading"):
            _fail(unit, f"did not stay up for {hold:g} s after it became ready (pid {ready.get('MainPID')} -> "
                  f"{now.get('MainPID')}, {now.get('ActiveState')}, restarts {ready.get('NRestarts')} -> "
                  f"{now.get('NRestarts')})", left=left)


def _fail(unit: str, what: str, *, left: int = 0) -> None:
    rest = f"; the {left} instances not reached still run the old release" if left else ""
    _say(f"{unit} {what}{rest}. Its journal:\n{_journal_tail(unit)}")
    die(f"roll stopped at {unit}: it {what}",
        hint=f"fix the app and roll again; `unitgen logs {unit.split('@')[0]}` shows more")


def scale(name: str, count: int) -> None:
    """Run exactly count instances from now on: the target is re-rendered to want them."""
    app = App(name)
    spec = dataclasses.replace(app.spec, instances=count)
    files = render_files(spec)
    # The target and the saved spec change; the spec last, as install does.
    save({app.target: files[app.target]}, spec)
    systemctl("daemon-reload")
    wanted = set(spec.instance_names)
    extra = [u for u in app.loaded() if u not in wanted]
    if extra:
        # Each drains: its requests finish and its clients move to the instances kept.
        systemctl("stop", *extra)
        systemctl("reset-failed", *extra, check=False)
    # Starts whichever wanted instances are not running and waits for their READY=1.
    systemctl("start", app.target)
    _say(f"{app.name}: {count} instance{'s' if count != 1 else ''}"
         + (f" (stopped {', '.join(extra)})" if extra else ""))


def _format(entry: dict) -> str:
    # A user manager's units: _SYSTEMD_UNIT is user@UID.service, the unit is the user unit.
    unit = entry.get("_SYSTEMD_USER_UNIT") or entry.get("_SYSTEMD_UNIT") or entry.get("UNIT") or "?"
    if unit == "init.scope":
        unit = entry.get("USER_UNIT") or entry.get("UNIT", unit)
    tag = unit.removesuffix(".service").removesuffix(".socket")
    stamp = datetime.fromtimestamp(int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6).strftime("%Y-%m-%d %H:%M:%S")
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # journald's JSON gives non-UTF-8 text as bytes
        message = bytes(message).decode("utf-8", "replace")
    return printable(f"{stamp} {tag}: {message}")


def logs(name: str, *, follow: bool = False, lines: int = 50) -> int:
    """Every instance's journal (and the socket's), interleaved, each line tagged."""
    app = App(name)
    cmd = ["journalctl", *manager.current().flags, "--no-pager", "-o", "json", "-n", str(lines),
           "-u", instances_pattern(app.name), "-u", app.socket]
    if follow:
        cmd.append("-f")
    with stream(cmd) as out:
        for line in out:
            try:
                print(_format(json.loads(line)), flush=follow)
            except ValueError:
                log(f"not JSON from journalctl: {line!r}")
    return 0
