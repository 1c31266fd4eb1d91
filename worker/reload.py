"""ExecReload= of NAME@N.service: asks the instance's main process to swap itself for a
new process (unitgen_worker.handover) and waits for how it went, so that `systemctl
reload` and `unitgen roll` exit non-zero when the swap failed.

It imports only the contract: it starts at every reload, on a core the instances are
serving on, and the handover module's imports (asyncio among them) took twice its CPU.
"""

from __future__ import annotations

import os
import signal
import sys
import time

from unitgen_worker.contract import (
    HandoverResult,
    handover_file,
    instance_of,
    read_app_file,
    runtime_directory_of_this_process,
)

POLL = 0.05  # seconds between looks at the outcome


def wait(unit: str, main_pid: int) -> int:
    """Asks the main process to reload and waits for how it went: 0 swapped, 1 not."""
    runtime = runtime_directory_of_this_process()
    if runtime is None:
        print("unitgen-worker reload: no RUNTIME_DIRECTORY (run it as ExecReload= of NAME@N.service)", file=sys.stderr)
        return 1
    path = handover_file(runtime, instance_of(unit))
    asked = time.monotonic()
    try:
        os.kill(main_pid, signal.SIGHUP)
    except OSError as err:
        print(f"{unit}: cannot signal pid {main_pid}: {err}", file=sys.stderr)
        return 1
    while True:
        result = HandoverResult.from_json(read_app_file(path))
        if result is not None and result.old == main_pid and result.asked >= asked:
            if result.ok:
                print(f"{unit}: pid {result.new} serves now; pid {main_pid} drains")
                return 0
            print(f"{unit}: reload failed, pid {main_pid} serves on: {result.error}", file=sys.stderr)
            return 1
        try:
            os.kill(main_pid, 0)
        except ProcessLookupError:
            print(f"{unit}: pid {main_pid} exited before it answered the reload", file=sys.stderr)
            return 1
        time.sleep(POLL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m unitgen_worker.reload NAME@N.service MAINPID", file=sys.stderr)
        return 2
    return wait(args[0], int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
