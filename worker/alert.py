"""The crash-loop alert: start the --on-failure unit at the ALERT_AFTER-th failure in a row.

    ExecStopPost=-+/usr/bin/python3 -I -S /usr/lib/python3/dist-packages/unitgen_worker/alert.py %n UNIT
    (only with --on-failure)

Starting a unit needs root, so this is the one piece of unitgen that runs as root in
an instance's life. systemd's own OnFailure= cannot do it: on 252 it fires only when an
instance fails for good, on 255 and later at every failure before an automatic restart.
It trusts nothing the app's user can write:
- it runs as a script with -I -S: no PYTHON* variables, no working directory and no
  site-packages on sys.path, so no .pth file runs; it loads its own package from its
  own directory and nothing else. `unitgen install` checks that the interpreter (each
  symlink on the way), its standard library and this package are owned by root,
  writable by nobody else and without ACLs (unitgen/trust.py);
- it drops its environment at once (the instance's Environment= reaches it too; the
  variables that act before Python runs, LD_PRELOAD and the like, are refused by
  render whenever this helper is rendered) and finds systemctl on a fixed PATH;
- it counts failures from systemd's own data ($SERVICE_RESULT, $EXIT_STATUS, and when
  the instance last became active), in a directory only root can write, never from the
  backoff's files, which the app's user writes.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

if not __package__:
    # Run as a script by the unit (-I -S): this directory becomes the package, and
    # nothing else is added to sys.path (not site-packages, not its parent).
    _here = Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location("unitgen_worker", _here / "__init__.py",
                                                   submodule_search_locations=[str(_here)])
    sys.modules["unitgen_worker"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["unitgen_worker"])

from unitgen_worker.backoff import failures_in_a_row, load, save  # noqa: E402
from unitgen_worker.contract import ALERT_AFTER, ALERT_STATE_DIR, EXIT_CONFIG, instance_of  # noqa: E402

SAFE_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
_UNIT = re.compile(r"[A-Za-z0-9_.:@][A-Za-z0-9_.:@-]{0,254}\.(?:service|target)")


def systemctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=10, check=False,
                          env={"PATH": SAFE_PATH, "LANG": "C.UTF-8"})


def active_since(unit: str) -> float:
    """CLOCK_MONOTONIC seconds at which unit last became active (0 if never)."""
    out = systemctl("show", "-p", "ActiveEnterTimestampMonotonic", "--value", unit).stdout.strip()
    return int(out) / 1e6 if out.isdigit() else 0.0


def main(argv: list[str]) -> int:
    result = os.environ.get("SERVICE_RESULT", "success")
    exit_status = os.environ.get("EXIT_STATUS", "")
    os.environ.clear()
    os.environ.update(PATH=SAFE_PATH, LANG="C.UTF-8")
    if len(argv) != 2 or not _UNIT.fullmatch(argv[1]):
        print("usage: python -I -S .../unitgen_worker/alert.py NAME@N.service ALERT_UNIT", file=sys.stderr)
        return 2
    unit, alert = argv
    try:
        instance_of(unit)
    except ValueError as err:
        print(f"unitgen alert: {err}", file=sys.stderr)
        return 2
    ALERT_STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = ALERT_STATE_DIR / f"{unit}.json"
    # A clean stop ends a run of failures; exit EXIT_CONFIG is not restarted, so the
    # instance enters "failed" and OnFailure= itself starts the alert.
    if result == "success" or exit_status == str(EXIT_CONFIG):
        path.unlink(missing_ok=True)
        return 0
    state = load(path)
    now = time.monotonic()
    last_failure = float(state.get("last_failure", 0) or 0)
    since = active_since(unit)
    # A run that became active after the last failure and lasted long enough was healthy.
    ran = now - since if since > last_failure else 0.0
    failures = failures_in_a_row(int(state.get("failures", 0) or 0), ran)
    save(path, {"failures": failures, "last_failure": now})
    if failures == ALERT_AFTER:
        # --no-block: the alert must never hold up this instance's own restart.
        systemctl("start", "--no-block", "--", alert)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
