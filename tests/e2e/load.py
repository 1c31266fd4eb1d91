"""Load for the e2e tests: wrk with 64 keep-alive connections, every failure counted."""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoadResult:
    requests: int
    socket_errors: int
    non_2xx: int
    p99_ms: float
    output: str

    @property
    def failed(self) -> int:
        return self.socket_errors + self.non_2xx


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


# wrk's duration for a load that is ended by stop(), when what it measures is over.
UNTIL_STOPPED = 3600


class Wrk:
    """wrk running in the background from the host against url."""

    def __init__(self, url: str, *, seconds: int = UNTIL_STOPPED, connections: int = 64,
                 headers: dict[str, str] | None = None, pause_ms: int = 0) -> None:
        """pause_ms: each connection waits this long before each request (wrk's delay()), so
        the load stays under what the instances can serve instead of saturating them."""
        cmd = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s", "--latency", url]
        for key, value in (headers or {}).items():
            cmd += ["-H", f"{key}: {value}"]
        self.script = None
        if pause_ms:
            with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
                script.write(f"function delay() return {int(pause_ms)} end\n")
            self.script = Path(script.name)
            cmd += ["-s", str(self.script)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(self) -> LoadResult:
        """End the load now: on SIGINT wrk stops and prints what it measured so far."""
        self.proc.send_signal(signal.SIGINT)
        return self.result()

    def result(self) -> LoadResult:
        output, _ = self.proc.communicate(timeout=300)
        if self.script:
            self.script.unlink(missing_ok=True)
        requests = int(re.search(r"(\d+) requests in", output).group(1))
        errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
        non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
        return LoadResult(
            requests=requests,
            socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
            non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
            p99_ms=_ms(p99.group(1)) if p99 else 0.0,
            output=output,
        )
