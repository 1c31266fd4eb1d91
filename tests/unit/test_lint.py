"""ruff over the whole project, as a test (rules in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_is_clean():
    cmd = [sys.executable, "-m", "ruff", "check", "--output-format", "concise",
           "unitgen", "worker", "tests", "examples", "units", "bench"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
