"""Rendered units against golden files, and systemd-analyze verify on this host.

UNITGEN_UPDATE_GOLDEN=1 rewrites the files; review the diff before committing it.
The e2e suite verifies the same files under systemd 252 and 257.
"""

import os
import subprocess
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
COMMON = ["--no-check", "--python", "/usr/bin/python3", "--helper-python", "/usr/bin/python3",
          "--helper-script", "/usr/lib/python3/dist-packages/unitgen_worker/alert.py"]
CASES = {
    "minimal": ["--app", "hello:app", "--cores", "2", "--workdir", "/srv/apps"],
    "everything": [
        "--app", "shop.web:application", "--name", "shop-api", "--cores", "4",
        "--listen", "8080", "--listen", "[::1]:8081", "--listen", "/run/shop-api.sock",
        "--workdir", "/srv/shop 50%", "--user", "www-data", "--interface", "wsgi",
        "--env", 'GREETING=50% off "today" for $5 \\', "--env", "EMPTY=",
        "--watchdog", "0", "--drain-timeout", "120", "--on-failure", "alert@%n.service",
        "--writable", "/srv/shop 50%/uploads", "--writable", '/var/spool/a "q"',
        "--allow", "10.0.0.0/8", "--allow", "::1", "--deny", "10.9.0.0/16",
        "--threads", "16", "--max-concurrency", "24", "--request-timeout", "0", "--no-rebalance",
        "--max-requests", "5000", "--max-requests-jitter", "500", "--memory-max", "512M",
        "--metrics-listen", "127.0.0.1:9100",
    ],
    "relaxed": ["--app", "home.app:app", "--cores", "1", "--workdir", "/home/dev/app", "--hardening", "relaxed",
                "--allow", "127.0.0.1"],
    # `unitgen install --user`: a user's own systemd (tests/unit/test_user_units.py verifies it with --user).
    "user": ["--app", "mine.web:app", "--name", "mine", "--cores", "2", "--workdir", "/home/dev/mine",
             "--manager", "user", "--listen", "8080", "--listen", "/run/user/1000/mine.sock",
             "--env", "MODE=50% $HOME", "--memory-max", "256M", "--writable", "/home/dev/mine/data"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_units_match_golden_files(unitgen, tmp_path, case):
    result = unitgen("render", *COMMON, *CASES[case], "--out", str(tmp_path / case))
    assert result.returncode == 0, result.stderr
    rendered = {p.name: p.read_text() for p in sorted((tmp_path / case).iterdir())}
    if os.environ.get("UNITGEN_UPDATE_GOLDEN") == "1":
        (GOLDEN / case).mkdir(parents=True, exist_ok=True)
        for name, text in rendered.items():
            (GOLDEN / case / name).write_text(text)
    golden = {p.name: p.read_text() for p in sorted((GOLDEN / case).iterdir())}
    assert rendered == golden


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_units_verify_clean_on_this_host(case):
    units = sorted(str(p) for p in (GOLDEN / case).iterdir() if p.suffix in (".socket", ".service", ".target"))
    result = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
