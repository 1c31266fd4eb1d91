"""Growing restart delays, the same on systemd 252 and 257.

RestartSteps=/RestartMaxDelaySec= do not exist before systemd 254, and where they do,
the delay they compute only resets on a manual start, never after a healthy run. So the
service template runs this helper around each start instead:

    ExecStopPost=+python -I -m unitgen_worker.backoff record %n   (after every exit)
    ExecStartPre=+python -I -m unitgen_worker.backoff wait %n     (before every start)

`record` counts failures ($SERVICE_RESULT other than "success"); a clean stop, and a
failure after a run of HEALTHY_RUN seconds or more, start the count again. `wait`
sleeps for the delay the count calls for: 0.5 s after the first failure, doubling up to
MAX_DELAY, but only when this start is systemd's automatic restart. A manual start or
restart (after the app is fixed, or a roll) starts at once, as with RestartSteps=.

Telling the two apart: systemd's NRestarts goes up by exactly one when it schedules an
automatic restart, and a manual start either resets it to 0 or (from the auto-restart
state) leaves it as it was. So `record` notes NRestarts, and `wait` only waits when it
is one more than that. Verified on systemd 252 and 257 by tests/e2e.

No start limit is involved: a start limit hit by any instance fails the shared socket.
The state lives in /run (gone at reboot) and the helper imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

STATE_DIR = Path("/run/unitgen")
FIRST_DELAY = 0.5
MAX_DELAY = 32.0
HEALTHY_RUN = 30.0
RESTART_SEC = 0.1  # RestartSec= in the service template: part of the delay already
ALERT_AFTER = 3  # failures in a row that start the --on-failure unit


def delay(failures: int) -> float:
    """Seconds between a failure and the next start, after this many in a row."""
    if failures <= 0:
        return 0.0
    return min(FIRST_DELAY * 2 ** (failures - 1), MAX_DELAY)


def _path(unit: str) -> Path:
    return STATE_DIR / f"{unit}.json"


def load(unit: str) -> dict:
    try:
        return json.loads(_path(unit).read_text())
    except (OSError, ValueError):
        return {}


def _save(unit: str, state: dict) -> None:
    STATE_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    scratch = _path(unit).with_suffix(".tmp")
    scratch.write_text(json.dumps(state))
    os.replace(scratch, _path(unit))


def restarts(unit: str) -> int | None:
    """systemd's NRestarts of unit, or None if systemctl cannot say."""
    try:
        out = subprocess.run(["systemctl", "show", "-p", "NRestarts", "--value", unit],
                             capture_output=True, text=True, timeout=10).stdout
        return int(out)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def record(unit: str, result: str, now: float, n_restarts: int | None, alert: str | None = None) -> dict:
    """After an exit: count a failure, or forget them all after a clean stop."""
    if result == "success":
        _path(unit).unlink(missing_ok=True)
        return {}
    state = load(unit)
    ran = now - state.get("started", now)
    failures = 1 if ran >= HEALTHY_RUN else state.get("failures", 0) + 1
    state.update(failures=failures, result=result, restarts=n_restarts, next_start=time.time() + delay(failures))
    _save(unit, state)
    if alert and failures == ALERT_AFTER:
        # --no-block: the alert must never hold up this unit's own restart.
        subprocess.run(["systemctl", "start", "--no-block", alert], timeout=10, check=False)
    return state


def wait(unit: str, n_restarts: int | None) -> float:
    """Before a start: sleep off what is left of the delay, then note the start."""
    state = load(unit)
    automatic = n_restarts is None or state.get("restarts") is None or n_restarts == state["restarts"] + 1
    if not automatic:  # a manual start: begin afresh
        state = {}
    pause = max(0.0, delay(state.get("failures", 0)) - RESTART_SEC)
    if pause:
        print(f"{unit}: failed {state['failures']} times in a row; starting again in {pause:.1f} s",
              file=sys.stderr, flush=True)
        time.sleep(pause)
    state["started"] = time.monotonic()
    _save(unit, state)
    return pause


def main(argv: list[str]) -> int:
    alert = None
    if len(argv) == 4 and argv[0] == "record" and argv[2] == "--alert":
        alert = argv.pop()
        argv.pop()
    if len(argv) != 2 or argv[0] not in ("record", "wait"):
        print("usage: python -m unitgen_worker.backoff record UNIT [--alert UNIT] | wait UNIT", file=sys.stderr)
        return 2
    command, unit = argv
    if command == "wait":
        wait(unit, restarts(unit))
    else:
        record(unit, os.environ.get("SERVICE_RESULT", "success"), time.monotonic(), restarts(unit), alert)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
