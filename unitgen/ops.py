"""Day-2 operations on an installed app: roll, scale, logs (systemd does the supervising)."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from datetime import datetime

from unitgen.errors import die
from unitgen.escape import printable
from unitgen.install import UNIT_DIR, write_files
from unitgen.render import render_files, spec_file
from unitgen.run import log, run, stream, systemctl
from unitgen.state import App, show
from unitgen_worker.contract import instances_pattern


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _journal_tail(unit: str, lines: int = 15) -> str:
    out = run(["journalctl", "--no-pager", "-o", "cat", "-n", str(lines), "-u", unit], check=False).stdout
    return "\n".join(f"    {line}" for line in out.rstrip().splitlines())


def roll(name: str, *, pause: float = 0.0, all_at_once: bool = False) -> None:
    """Restart every instance, one at a time; stop at the first that does not become ready.

    Each instance drains (its requests finish, its clients move to the siblings) and
    `systemctl restart` returns only once the new process has sent READY=1 (Type=notify).
    The socket is never restarted: connections queue in it meanwhile.
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
            _fail(failed[0] if failed else units[0])
        _say(f"restarted {len(units)} instances together in {time.monotonic() - began:.2f} s")
        return
    for position, unit in enumerate(units, 1):
        began = time.monotonic()
        result = systemctl("restart", unit, check=False)
        took = time.monotonic() - began
        if result.returncode != 0:
            _fail(unit, done=position - 1, total=len(units))
        pid = show([unit], ["MainPID"])[0].get("MainPID", "?")
        _say(f"[{position}/{len(units)}] {unit} ready in {took:.2f} s (pid {pid})")
        if pause and position < len(units):
            time.sleep(pause)
    _say(f"rolled {len(units)} instances of {app.name}")


def _fail(unit: str, *, done: int = 0, total: int = 0) -> None:
    left = f"; {total - done - 1} instances not restarted still run the old code" if total else ""
    _say(f"{unit} did not become ready{left}. Its journal:\n{_journal_tail(unit)}")
    die(f"roll stopped at {unit}: it did not become ready",
        hint=f"fix the app and roll again; `unitgen logs {unit.split('@')[0]}` shows more")


def scale(name: str, count: int) -> None:
    """Run exactly count instances from now on: the target is re-rendered to want them."""
    app = App(name)
    spec = dataclasses.replace(app.spec, instances=count)
    files = render_files(spec)
    # The target and the saved spec change; the spec last, as install does.
    write_files({app.target: files[app.target], spec_file(app.name): files[spec_file(app.name)]}, UNIT_DIR)
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
    unit = entry.get("_SYSTEMD_UNIT") or entry.get("UNIT") or "?"
    if unit == "init.scope":
        unit = entry.get("UNIT", unit)
    tag = unit.removesuffix(".service").removesuffix(".socket")
    stamp = datetime.fromtimestamp(int(entry.get("__REALTIME_TIMESTAMP", "0")) / 1e6).strftime("%Y-%m-%d %H:%M:%S")
    message = entry.get("MESSAGE", "")
    if isinstance(message, list):  # journald's JSON gives non-UTF-8 text as bytes
        message = bytes(message).decode("utf-8", "replace")
    return printable(f"{stamp} {tag}: {message}")


def logs(name: str, *, follow: bool = False, lines: int = 50) -> int:
    """Every instance's journal (and the socket's), interleaved, each line tagged."""
    app = App(name)
    cmd = ["journalctl", "--no-pager", "-o", "json", "-n", str(lines),
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
