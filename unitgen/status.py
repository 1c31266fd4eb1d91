"""`unitgen status`: one row per instance, from systemctl show and the STATUS= counters.

The --json document (schema 1; fields are only ever added):
    {"schema": 1, "name": str, "app": "MODULE:ATTR",
     "socket": {"unit": str, "state": str, "listen": [str]},
     "instances": [{"unit": str, "instance": int, "wanted": bool, "state": str,
                    "sub_state": str, "pid": int|null, "uptime_seconds": float|null,
                    "memory_bytes": int|null (MemoryCurrent=: the whole cgroup),
                    "rss_bytes": int|null (the main process), "restarts": int, "requests": int|null,
                    "in_flight": int|null, "failures": int, "next_attempt": str|null}]}
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from unitgen.state import App, instance_number, show
from unitgen_worker.backoff import load as load_backoff
from unitgen_worker.contract import RUNTIME_ROOT, backoff_file

_STATUS = re.compile(r"\w+: (\d+) requests, (\d+) in flight")
PROPS = ["ActiveState", "SubState", "MainPID", "ExecMainStartTimestampMonotonic", "MemoryCurrent",
         "NRestarts", "StatusText"]


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def collect(name: str) -> dict:
    app = App(name)
    wanted = app.wanted()
    units = sorted(set(wanted) | set(app.loaded()), key=instance_number)
    socket = show([app.socket], ["ActiveState", "Listen"])[0]
    rows = []
    for unit, props in zip(units, show(units, PROPS) if units else [], strict=True):
        pid = _int(props.get("MainPID"))
        started = _int(props.get("ExecMainStartTimestampMonotonic"))
        counters = _STATUS.match(props.get("StatusText", ""))
        # Written by the app's user: read as data only, never following a link.
        backoff = load_backoff(backoff_file(RUNTIME_ROOT / app.name, unit))
        running = props.get("ActiveState") in ("active", "reloading", "deactivating") and pid
        rows.append({
            "unit": unit,
            "instance": instance_number(unit),
            "wanted": unit in wanted,
            "state": props.get("ActiveState", "unknown"),
            "sub_state": props.get("SubState", "unknown"),
            "pid": pid or None,
            # CLOCK_MONOTONIC, as systemd's *Monotonic timestamps.
            "uptime_seconds": round(time.monotonic() - started / 1e6, 1) if running and started else None,
            "memory_bytes": _int(props.get("MemoryCurrent")),
            "rss_bytes": _rss(pid) if running else None,
            "restarts": _int(props.get("NRestarts")) or 0,
            "requests": int(counters.group(1)) if counters and running else None,
            "in_flight": int(counters.group(2)) if counters and running else None,
            "failures": backoff.get("failures", 0),
            "next_attempt": _next_attempt(backoff) if not running else None,
        })
    # Listen= is "ADDRESS (Stream)", several separated by spaces between pairs.
    listen = re.findall(r"(\S+) \(\w+\)", socket.get("Listen", ""))
    return {"schema": 1, "name": app.name, "app": app.app,
            "socket": {"unit": app.socket, "state": socket.get("ActiveState", "unknown"), "listen": listen},
            "instances": rows}


def _rss(pid: int) -> int | None:
    """Resident memory of pid: MemoryCurrent= needs cgroup v2 memory accounting."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _next_attempt(backoff: dict) -> str | None:
    at = backoff.get("next_start")
    if not at or at < time.time():
        return None
    return datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds")


def _human(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return "-"


def _memory(row: dict) -> str:
    """MemoryCurrent= (the cgroup) where systemd has it, else the main process's RSS."""
    if row["memory_bytes"] is not None:
        return _bytes(row["memory_bytes"])
    return "-" if row["rss_bytes"] is None else _bytes(row["rss_bytes"]) + " rss"


def table(status: dict) -> str:
    socket = status["socket"]
    listen = ", ".join(socket["listen"]) or "-"
    lines = [f"{status['name']} ({status['app']}): socket {socket['unit']} {socket['state']} on {listen}"]
    header = ("UNIT", "STATE", "PID", "UPTIME", "MEMORY", "RESTARTS", "REQUESTS", "IN-FLIGHT", "NOTE")
    rows = []
    for row in status["instances"]:
        note = []
        if not row["wanted"]:
            note.append("not wanted (scaled down)")
        if row["failures"] and row["state"] != "active":
            note.append(f"{row['failures']} failures in a row")
        if row["next_attempt"]:
            note.append(f"next attempt {row['next_attempt']}")
        rows.append((row["unit"], f"{row['state']}/{row['sub_state']}", str(row["pid"] or "-"),
                     _human(row["uptime_seconds"]),
                     _memory(row), str(row["restarts"]),
                     "-" if row["requests"] is None else str(row["requests"]),
                     "-" if row["in_flight"] is None else str(row["in_flight"]), "; ".join(note)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
