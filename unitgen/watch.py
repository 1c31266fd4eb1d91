"""`unitgen status NAME --watch [SECONDS]`: the status table again every few seconds, with
each instance's requests per second since the last look (as `pm2 monit` or `watch`).

On a terminal each frame replaces the last; piped, frames follow one another (with
--json, one document a line), so a log of them can be kept. Ctrl-C ends it, exit 0, as
often as it is pressed and wherever it lands: the handler only sets a flag, because a
KeyboardInterrupt raised anywhere made a second SIGINT (a user's second press, or
timeout(1), which signals the command and then its whole process group) end it with 130;
and the systemctl a look runs is in the terminal's process group, so it gets the signal
too, and the look fails.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TextIO

from unitgen.errors import Die
from unitgen.status import AppStatus, collect, table

CLEAR = "\033[H\033[2J"  # cursor home, clear the screen: what `watch` and `clear` send
SLICE = 0.1  # seconds: a wait between looks ends this long at most after Ctrl-C


def rates(before: AppStatus | None, now: AppStatus, seconds: float) -> dict[str, float]:
    """Requests per second of each instance between two looks, by unit. Only where the
    same process served at both (a new pid starts counting from 0 again)."""
    if before is None or seconds <= 0:
        return {}
    earlier = {row.unit: row for row in before.instances}
    out = {}
    for row in now.instances:
        old = earlier.get(row.unit)
        if old is not None and old.pid == row.pid and row.pid and old.requests is not None \
                and row.requests is not None and row.requests >= old.requests:
            out[row.unit] = (row.requests - old.requests) / seconds
    return out


def watch(name: str, every: float, *, as_json: bool = False, out: TextIO = sys.stdout,
          looks: int | None = None, sleep: Callable[[float], None] = time.sleep) -> int:
    """Shows the status every `every` seconds until Ctrl-C (or `looks` frames: tests)."""
    terminal = out.isatty() and not as_json
    interrupted: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    before: AppStatus | None = None
    taken = 0.0
    count = 0
    try:
        while not interrupted and (looks is None or count < looks):
            try:
                status = collect(name)
            except Die:
                if interrupted:  # the Ctrl-C reached the systemctl this look ran
                    break
                raise
            now = time.monotonic()
            per_second = rates(before, status, now - taken)
            if as_json:
                out.write(json.dumps(status.to_dict()) + "\n")  # one document a line
            else:
                stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                frame = f"{stamp}, every {every:g} s; Ctrl-C stops\n{table(status, per_second)}\n"
                out.write((CLEAR if terminal else "\n") + frame)
            out.flush()
            before, taken, count = status, now, count + 1
            if looks is None or count < looks:
                # In slices: a signal handler that returns does not cut time.sleep() short.
                for piece in range(math.ceil(every / SLICE)):
                    if interrupted:
                        break
                    sleep(min(SLICE, every - piece * SLICE))
        if interrupted:
            out.write("\n")
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
