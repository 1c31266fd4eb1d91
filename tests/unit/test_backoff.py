"""The restart backoff helper that ExecStartPre=/ExecStopPost= run around each start."""

import subprocess
import sys
import time

import pytest

from unitgen_worker import backoff


def test_delays_start_near_one_second_and_grow_past_thirty():
    delays = [backoff.delay(n) for n in range(0, 10)]
    assert delays[:2] == [0.0, 0.5]
    assert all(later >= earlier for earlier, later in zip(delays, delays[1:], strict=False))
    assert max(delays) >= 30
    assert backoff.delay(100) == backoff.MAX_DELAY


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(backoff, "STATE_DIR", tmp_path)
    return tmp_path


def test_failures_count_up_and_a_clean_stop_forgets_them(state_dir):
    unit = "app@0.service"
    now = time.monotonic()
    backoff.wait(unit, 0)
    assert backoff.record(unit, "exit-code", now, 0)["failures"] == 1
    assert backoff.record(unit, "signal", now, 1)["failures"] == 2
    assert backoff.record(unit, "watchdog", now, 2)["failures"] == 3
    backoff.record(unit, "success", now, 3)
    assert backoff.load(unit) == {}


def test_a_healthy_run_starts_the_count_again(state_dir):
    unit = "app@1.service"
    backoff.record(unit, "signal", time.monotonic(), 0)
    backoff.record(unit, "signal", time.monotonic(), 0)
    backoff.wait(unit, None)  # notes the start
    later = time.monotonic() + backoff.HEALTHY_RUN + 1
    assert backoff.record(unit, "signal", later, 1)["failures"] == 1


def test_automatic_restart_waits_the_delay_less_restart_sec(state_dir):
    unit = "app@2.service"
    backoff.record(unit, "exit-code", time.monotonic(), 4)
    backoff.record(unit, "exit-code", time.monotonic(), 5)  # 2 failures: 1 s
    began = time.monotonic()
    assert backoff.wait(unit, 6) == pytest.approx(backoff.delay(2) - backoff.RESTART_SEC)
    assert time.monotonic() - began >= backoff.delay(2) - backoff.RESTART_SEC


@pytest.mark.parametrize("n_restarts", [0, 5], ids=["counter reset", "counter unchanged"])
def test_manual_start_does_not_wait_and_forgets_the_failures(state_dir, n_restarts):
    unit = "app@3.service"
    for n in range(3, 6):
        backoff.record(unit, "exit-code", time.monotonic(), n)
    assert backoff.wait(unit, n_restarts) == 0
    assert backoff.load(unit).keys() == {"started"}


def test_command_line_reads_service_result(tmp_path):
    code = ("import sys, pathlib; from unitgen_worker import backoff; backoff.STATE_DIR = pathlib.Path(sys.argv[1]);"
            " sys.exit(backoff.main(sys.argv[2:]))")

    def run(*args, result):
        return subprocess.run([sys.executable, "-c", code, str(tmp_path), *args],
                              env={"SERVICE_RESULT": result}, capture_output=True, text=True)
    assert run("record", "x@0.service", result="core-dump").returncode == 0
    assert '"failures": 1' in (tmp_path / "x@0.service.json").read_text()
    assert run("record", "x@0.service", result="success").returncode == 0
    assert not (tmp_path / "x@0.service.json").exists()
    assert run("bogus", result="success").returncode == 2
