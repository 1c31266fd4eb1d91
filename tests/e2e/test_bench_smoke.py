"""The benchmark harness (bench/compare.py, issue 12) in its smoke mode: every code path
once, with tiny durations, against every peer in one container. Its figures are not
results (bench/results.md comes from a full run); what is asserted is that the harness
works and unitgen's headline holds: no failed request through its reloads."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import unavailable
from testbed import missing_tools

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_the_benchmark_harness_runs_every_system_in_smoke_mode(tmp_path):
    if os.geteuid() != 0 or missing_tools():
        unavailable("the benchmark boots a container: root and systemd-nspawn needed")
    run = subprocess.run([sys.executable, str(ROOT / "bench/compare.py"), "--smoke", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = (tmp_path / "results.md").read_text()
    assert "SMOKE RUN" in results and "the run stopped" not in results
    for plot in ("throughput.png", "reloads.png", "recovery.png", "shares.png"):
        assert (tmp_path / plot).stat().st_size > 1000, plot
    for system in ("unitgen", "gunicorn", "uvicorn", "Node cluster"):
        assert re.search(rf"^\| {system} ", results, re.M), system
    # The headline: unitgen's reloads failed no request (the smoke measures them under
    # connection-close load).
    row = re.search(r"^\| unitgen \|.*$", results, re.M).group(0)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[4] == "- / 0", row
