"""`unitgen status`: one row per instance, from systemctl show and the instances' counters files.

The --json document (schema 1; fields are only ever added):
    {"schema": 1, "name": str, "app": "MODULE:ATTR",
     "socket": {"unit": str, "state": str, "listen": [str]},
     "instances": [{"unit": str, "instance": int, "wanted": bool, "state": str,
                    "sub_state": str, "pid": int|null, "uptime_seconds": float|null,
                    "memory_bytes": int|null (MemoryCurrent=: the whole cgroup),
                    "rss_bytes": int|null (the main process), "restarts": int, "requests": int|null,
                    "in_flight": int|null, "failures": int, "next_attempt": str|null,
                    "connections": int|null (open ones), "busy_threads": int|null,
                    "threads": int|null (a WSGI app's; null for ASGI),
                    "requests_share": float|null, "connections_share": float|null
                    (percent of the running instances' total)}]}
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone

from unitgen import manager
from unitgen.escape import printable
from unitgen.state import App, instance_number, show
from unitgen_worker.backoff import load as load_backoff
from unitgen_worker.contract import (
    Counters,
    HandoverResult,
    backoff_file,
    counters_file,
    handover_file,
    read_app_file,
)

PROPS = ["ActiveState", "SubState", "MainPID", "ExecMainStartTimestampMonotonic", "MemoryCurrent", "NRestarts"]
SCHEMA = 1


@dataclass(frozen=True)
class InstanceStatus:
    """One instance as systemd and the instance itself report it (a row of the table)."""

    unit: str
    instance: int
    wanted: bool
    state: str
    sub_state: str
    pid: int | None
    uptime_seconds: float | None
    memory_bytes: int | None  # MemoryCurrent=: the whole cgroup
    rss_bytes: int | None  # the main process
    restarts: int
    requests: int | None
    in_flight: int | None
    failures: int
    next_attempt: str | None
    connections: int | None = None
    busy_threads: int | None = None
    threads: int | None = None
    requests_share: float | None = None
    connections_share: float | None = None
    reload_error: str | None = None  # its last reload failed and this process served on


@dataclass(frozen=True)
class AppStatus:
    name: str
    app: str
    socket_unit: str
    socket_state: str
    listen: tuple[str, ...]
    instances: tuple[InstanceStatus, ...]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "name": self.name, "app": self.app,
                "socket": {"unit": self.socket_unit, "state": self.socket_state, "listen": list(self.listen)},
                "instances": [dataclasses.asdict(row) for row in self.instances]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _int(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None


def read_counters(directory, instance: int, pid: int | None) -> Counters | None:
    """The instance's own counters, if its file is a regular one written by pid."""
    text = read_app_file(counters_file(directory, instance))
    counters = Counters.from_json(text) if text is not None else None
    return counters if counters is not None and pid and counters.pid == pid else None


def reload_error(directory, instance: int, pid: int | None) -> str | None:
    """Why the last reload of the process pid failed, if it did (it serves on)."""
    result = HandoverResult.from_json(read_app_file(handover_file(directory, instance)))
    return (result.error or "failed") if result and not result.ok and pid and result.old == pid else None


def collect(name: str) -> AppStatus:
    app = App(name)
    wanted = app.wanted()
    units = sorted(set(wanted) | set(app.loaded()), key=instance_number)
    socket = show([app.socket], ["ActiveState", "Listen"])[0]
    # RUNTIME_ROOT / NAME for the system; a user manager's RuntimeDirectory= is below $XDG_RUNTIME_DIR.
    directory = manager.current().app_runtime_dir(app.name)
    rows = []
    for unit, props in zip(units, show(units, PROPS) if units else [], strict=True):
        pid = _int(props.get("MainPID"))
        started = _int(props.get("ExecMainStartTimestampMonotonic"))
        running = bool(props.get("ActiveState") in ("active", "reloading", "deactivating") and pid)
        # Both files are written by the app's user: read as data only (see their readers).
        counters = read_counters(directory, instance_number(unit), pid) if running else None
        backoff = load_backoff(backoff_file(directory, unit))
        rows.append(InstanceStatus(
            unit=unit,
            instance=instance_number(unit),
            wanted=unit in wanted,
            state=props.get("ActiveState", "unknown"),
            sub_state=props.get("SubState", "unknown"),
            pid=pid or None,
            # CLOCK_MONOTONIC, as systemd's *Monotonic timestamps.
            uptime_seconds=round(time.monotonic() - started / 1e6, 1) if running and started else None,
            memory_bytes=_int(props.get("MemoryCurrent")),
            rss_bytes=_rss(pid) if running and pid else None,
            restarts=_int(props.get("NRestarts")) or 0,
            requests=counters.requests if counters else None,
            in_flight=counters.in_flight if counters else None,
            failures=int(backoff.get("failures", 0)),
            next_attempt=_next_attempt(backoff) if not running else None,
            connections=counters.connections if counters else None,
            busy_threads=counters.busy if counters and counters.threads else None,
            threads=counters.threads if counters and counters.threads else None,
            reload_error=reload_error(directory, instance_number(unit), pid) if running else None,
        ))
    rows = _with_shares(rows)
    # Listen= is "ADDRESS (Stream)", several separated by spaces between pairs.
    listen = tuple(re.findall(r"(\S+) \(\w+\)", socket.get("Listen", "")))
    return AppStatus(name=app.name, app=app.app, socket_unit=app.socket,
                     socket_state=socket.get("ActiveState", "unknown"), listen=listen, instances=tuple(rows))


def _with_shares(rows: list[InstanceStatus]) -> list[InstanceStatus]:
    """Each instance's percentage of the requests and connections of those that report."""
    shares = {}
    for field in ("requests", "connections"):
        total = sum(getattr(row, field) or 0 for row in rows)
        shares[field] = [None if getattr(row, field) is None or not total else
                         round(100 * getattr(row, field) / total, 1) for row in rows]
    return [dataclasses.replace(row, requests_share=req, connections_share=conn)
            for row, req, conn in zip(rows, shares["requests"], shares["connections"], strict=True)]


def _share(value: int | None, share: float | None) -> str:
    if value is None:
        return "-"
    return f"{value} ({share:.0f}%)" if share is not None else str(value)


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


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(app_status: AppStatus, rates: dict[str, float] | None = None) -> str:
    """The table for people; rates (`status --watch`): requests per second by unit, as a
    column of its own."""
    status = app_status.to_dict()
    socket = status["socket"]
    listen = ", ".join(socket["listen"]) or "-"
    lines = [f"{status['name']} ({status['app']}): socket {socket['unit']} {socket['state']} on {listen}"]
    header = ("UNIT", "STATE", "PID", "UPTIME", "MEMORY", "RESTARTS", "REQUESTS",
              *(("REQ/S",) if rates is not None else ()), "CONNS", "IN-FLIGHT", "BUSY", "NOTE")
    rows = []
    for row in status["instances"]:
        note = []
        if not row["wanted"]:
            note.append("not wanted (scaled down)")
        if row["failures"] and row["state"] != "active":
            note.append(f"{row['failures']} failures in a row")
        if row["next_attempt"]:
            note.append(f"next attempt {row['next_attempt']}")
        if row["reload_error"]:
            note.append(f"last reload failed: {row['reload_error']}")
        rows.append((row["unit"], f"{row['state']}/{row['sub_state']}", str(row["pid"] or "-"),
                     _human(row["uptime_seconds"]),
                     _memory(row), str(row["restarts"]),
                     _share(row["requests"], row["requests_share"]),
                     *((_rate(rates.get(row["unit"])),) if rates is not None else ()),
                     _share(row["connections"], row["connections_share"]),
                     "-" if row["in_flight"] is None else str(row["in_flight"]),
                     "-" if row["threads"] is None else f"{row['busy_threads']}/{row['threads']}",
                     "; ".join(note)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    for row in [header, *rows]:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
