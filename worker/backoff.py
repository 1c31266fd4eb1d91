"""Growing restart delays, the same on systemd 252 and 257, without privileges.

RestartSteps=/RestartMaxDelaySec= do not exist before systemd 254, and where they do,
the delay they compute only resets on a manual start, never after a healthy run. So the
service template runs this helper around each start instead:

    ExecStopPost=python -I -m unitgen_worker.backoff record %n   (after every exit)
    ExecStartPre=python -I -m unitgen_worker.backoff wait %n     (before every start)

Both run as the app's own user, inside the instance's sandbox, from the app's own
interpreter: they need no privilege, so nothing the app's user can write (a .pth file
in its virtualenv, say) ever runs as root here. Their state is one JSON file per
instance in the app's RuntimeDirectory= ($RUNTIME_DIRECTORY), which systemd creates for
that user and keeps across restarts (RuntimeDirectoryPreserve=yes).

`record` counts failures ($SERVICE_RESULT other than "success"); a failure after a run
of HEALTHY_RUN seconds or more starts the count again. It forgets the count when no
automatic restart follows: a clean stop (also the stop of a manual `systemctl restart`,
which interrupts a `wait` in progress), exit EXIT_CONFIG, which
RestartPreventExitStatus= never restarts, and exit EXIT_RECYCLE: an instance whose threads
were all stuck served until then and restarts at once, as gunicorn's timed-out workers do
(its own request timeout already spaces such restarts). `wait` sleeps for the delay the count calls
for: 0.5 s after the first failure, doubling up to MAX_DELAY. So a manual restart after
a fix starts at once, as with RestartSteps=, without asking systemd for NRestarts (an
instance with DynamicUser= cannot reach the system bus where nss-systemd is missing).

No start limit is involved: a start limit hit by any instance fails the shared socket.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from unitgen_worker.contract import (
    EXIT_CONFIG,
    EXIT_RECYCLE,
    FIRST_DELAY,
    HEALTHY_RUN,
    MAX_DELAY,
    RESTART_SEC,
    backoff_file,
    read_app_file,
)

# The only fields kept; result (a word) is for people reading the file.
_NUMBERS = ("failures", "next_start", "started", "last_failure")


def delay(failures: int) -> float:
    """Seconds between a failure and the next start, after this many in a row."""
    if failures <= 0:
        return 0.0
    return min(FIRST_DELAY * 2 ** (failures - 1), MAX_DELAY)


def failures_in_a_row(previous: int, ran: float) -> int:
    """The count after one more failure that ended a run of `ran` seconds."""
    return 1 if ran >= HEALTHY_RUN else previous + 1


def load(path: Path) -> dict:
    """The state in path, or {}. Root reads these files too (`unitgen status`), and the
    app's user writes them: no link is followed, a FIFO does not block, only a regular
    file's first 4 KiB are read, and only numbers are kept."""
    text = read_app_file(path)
    try:
        state = json.loads(text) if text is not None else {}
    except (ValueError, RecursionError):
        return {}
    if not isinstance(state, dict):
        return {}
    return {key: value for key, value in state.items()
            if key in _NUMBERS and type(value) in (int, float) and 0 <= value < 1e12}


def save(path: Path, state: dict) -> None:
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(json.dumps(state))
    os.replace(scratch, path)


def record(path: Path, result: str, exit_status: str, now: float) -> dict:
    """After an exit: count a failure, or forget them all when no automatic restart follows."""
    if result == "success" or exit_status in (str(EXIT_CONFIG), str(EXIT_RECYCLE)):
        path.unlink(missing_ok=True)
        return {}
    state = load(path)
    started = state.get("started")
    ran = now - started if isinstance(started, (int, float)) else 0.0
    failures = failures_in_a_row(int(state.get("failures", 0) or 0), ran)
    state = {"failures": failures, "result": result, "next_start": time.time() + delay(failures)}
    save(path, state)
    return state


def wait(path: Path, unit: str) -> float | None:
    """Before a start: sleep off the delay of the failures so far, then note the start.

    None when a stop (a manual restart) interrupted the sleep. Then this exits 0: a
    control process killed by SIGTERM would make systemd's stop-post see
    SERVICE_RESULT=signal and count a failure that never happened.
    """
    # No handler: SIGTERM is blocked from here and waited for together with the timeout
    # (blocked before anything is said, so a stop right after the line is not lost); the
    # mask is restored after, as an exec'd child would inherit a blocked SIGTERM.
    stop = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, stop)
    try:
        state = load(path)
        failures = int(state.get("failures", 0) or 0)
        pause = max(0.0, delay(failures) - RESTART_SEC)
        if pause:
            print(f"{unit}: failed {failures} times in a row; starting again in {pause:.1f} s",
                  file=sys.stderr, flush=True)
            if signal.sigtimedwait(stop, pause) is not None:
                return None
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    state["started"] = time.monotonic()
    save(path, state)
    return pause


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("record", "wait"):
        print("usage: python -m unitgen_worker.backoff record|wait NAME@N.service", file=sys.stderr)
        return 2
    command, unit = argv
    directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if not directory:
        print("unitgen backoff: $RUNTIME_DIRECTORY is unset; run from the unit's ExecStartPre=/ExecStopPost=",
              file=sys.stderr)
        return 2
    try:
        path = backoff_file(Path(directory), unit)
    except ValueError as err:
        print(f"unitgen backoff: {err}", file=sys.stderr)
        return 2
    if command == "wait":
        wait(path, unit)
    else:
        record(path, os.environ.get("SERVICE_RESULT", "success"), os.environ.get("EXIT_STATUS", ""),
               time.monotonic())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
