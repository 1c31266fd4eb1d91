import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def unitgen():
    """Run the real unitgen command line; returns the CompletedProcess."""
    def _run(*args: str, cwd: Path | str = ROOT / "examples", input: str | None = None):
        return subprocess.run([sys.executable, "-m", "unitgen", *args], cwd=cwd, input=input,
                              capture_output=True, text=True, timeout=60)
    return _run
