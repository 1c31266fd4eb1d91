"""The restart backoff helper that ExecStartPre=/ExecStopPost= run around each start,
and the root alert helper. Real files, real processes, real signals."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from unitgen_worker import alert, backoff
from unitgen_worker.contract import EXIT_CONFIG, backoff_file


def test_delays_start_near_one_second_and_grow_past_thirty():
    delays = [backoff.delay(n) for n in range(0, 10)]
    assert delays[:2] == [0.0, 0.5]
    assert all(later >= earlier for earlier, later in zip(delays, delays[1:], strict=False))
    assert max(delays) >= 30
    assert backoff.delay(100) == backoff.MAX_DELAY


@pytest.fixture
def path(tmp_path):
    return backoff_file(tmp_path, "app@0.service")


def test_failures_count_up_and_a_clean_stop_forgets_them(path):
    now = time.monotonic()
    backoff.wait(path, "app@0.service")
    assert backoff.record(path, "exit-code", "3", now)["failures"] == 1
    assert backoff.record(path, "signal", "", now)["failures"] == 2
    assert backoff.record(path, "watchdog", "", now)["failures"] == 3
    backoff.record(path, "success", "0", now)
    assert backoff.load(path) == {}
    assert not path.exists()


def test_exit_config_is_not_restarted_so_the_count_is_forgotten(path):
    backoff.record(path, "exit-code", "3", time.monotonic())
    backoff.record(path, "exit-code", str(EXIT_CONFIG), time.monotonic())
    assert backoff.load(path) == {}


def test_a_healthy_run_starts_the_count_again(path):
    backoff.record(path, "signal", "", time.monotonic())
    backoff.record(path, "signal", "", time.monotonic())
    backoff.save(path, {**backoff.load(path), "started": time.monotonic()})  # as wait() notes it
    later = time.monotonic() + backoff.HEALTHY_RUN + 1
    assert backoff.record(path, "signal", "", later)["failures"] == 1


def test_a_restart_waits_the_delay_less_restart_sec(path):
    backoff.record(path, "exit-code", "1", time.monotonic())
    backoff.record(path, "exit-code", "1", time.monotonic())  # 2 failures: 1 s
    began = time.monotonic()
    assert backoff.wait(path, "app@0.service") == pytest.approx(backoff.delay(2) - backoff.RESTART_SEC)
    assert time.monotonic() - began >= backoff.delay(2) - backoff.RESTART_SEC


def test_wait_leaves_the_signal_mask_as_it_found_it(path):
    backoff.record(path, "exit-code", "1", time.monotonic())
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    backoff.wait(path, "app@0.service")
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


def test_state_behind_a_symlink_is_not_read(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text(json.dumps({"failures": 7}))
    link = backoff_file(tmp_path, "app@1.service")
    link.symlink_to(secret)
    assert backoff.load(link) == {}


def helper(*args, env):
    return subprocess.Popen([sys.executable, "-m", "unitgen_worker.backoff", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_stop_during_the_delay_exits_0_so_systemd_counts_no_failure(tmp_path):
    # A manual restart interrupts `wait` with SIGTERM: exit 0, or systemd's stop-post
    # would see SERVICE_RESULT=signal and the restart would wait out a failure.
    path = backoff_file(tmp_path, "app@2.service")
    for _ in range(6):
        backoff.record(path, "exit-code", "1", time.monotonic())
    proc = helper("wait", "app@2.service", env={"RUNTIME_DIRECTORY": str(tmp_path)})
    assert "starting again in" in proc.stderr.readline()
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(5) == 0
    assert time.monotonic() - began < 2
    record = helper("record", "app@2.service", env={"RUNTIME_DIRECTORY": str(tmp_path), "SERVICE_RESULT": "success"})
    assert record.wait(10) == 0
    assert backoff.load(path) == {}


def test_command_line_reads_what_systemd_passes(tmp_path):
    env = {"RUNTIME_DIRECTORY": str(tmp_path), "SERVICE_RESULT": "core-dump", "EXIT_STATUS": "ABRT"}
    assert helper("record", "x@0.service", env=env).wait(10) == 0
    assert json.loads((tmp_path / "0.backoff.json").read_text())["failures"] == 1
    assert helper("record", "x@0.service", env={**env, "SERVICE_RESULT": "success"}).wait(10) == 0
    assert not (tmp_path / "0.backoff.json").exists()
    assert helper("bogus", env=env).wait(10) == 2
    assert helper("record", "../x@0.service", env=env).wait(10) == 2
    assert helper("record", "x@0.service", env={"RUNTIME_DIRECTORY": ""}).wait(10) == 2


def test_alert_counts_from_systemd_data_in_a_directory_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(alert, "ALERT_STATE_DIR", tmp_path / "alerts")
    started: list[tuple[str, ...]] = []
    monkeypatch.setattr(alert, "systemctl", lambda *args: started.append(args) or subprocess.CompletedProcess(args, 0))
    monkeypatch.setattr(alert, "active_since", lambda unit: 0.0)  # never became active: failing at startup
    env = {"SERVICE_RESULT": "exit-code", "EXIT_STATUS": "3", "LD_PRELOAD": "/x.so", "PATH": "/srv/app/bin"}
    for _ in range(4):
        monkeypatch.setattr(os, "environ", dict(env))
        assert alert.main(["app@1.service", "alert@app@1.service.service"]) == 0
        assert os.environ == {"PATH": alert.SAFE_PATH, "LANG": "C.UTF-8"}  # dropped at once
    assert started == [("start", "--no-block", "--", "alert@app@1.service.service")]  # the 3rd, once
    monkeypatch.setattr(os, "environ", {"SERVICE_RESULT": "success"})
    alert.main(["app@1.service", "alert@app@1.service.service"])
    assert list((tmp_path / "alerts").iterdir()) == []
    assert (tmp_path / "alerts").stat().st_mode & 0o077 == 0


def test_state_the_apps_user_writes_cannot_hang_or_crash_a_root_reader(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert backoff.load(fifo) == {}  # does not block
    deep = tmp_path / "deep"
    deep.write_text("[" * 3000 + "]" * 3000)
    assert backoff.load(deep) == {}
    typed = tmp_path / "typed"
    typed.write_text(json.dumps({"failures": "\x1b[2J", "next_start": "x", "started": 5, "last_failure": True}))
    assert backoff.load(typed) == {"started": 5}


def test_the_alert_script_runs_as_root_would_run_it(tmp_path):
    # -I -S: no site-packages; the script finds its own package and nothing else.
    script = os.path.join(os.path.dirname(alert.__file__), "alert.py")
    result = subprocess.run([sys.executable, "-I", "-S", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "usage:" in result.stderr, result.stderr


@pytest.mark.parametrize("argv", [["../../etc@1.service", "a.service"], ["app@1.service", "a;b.service"],
                                  ["app@1.service", "-Hevil.example:x.service"],
                                  ["app@x.service", "a.service"], ["app@1.service"]])
def test_alert_refuses_what_is_not_a_unit_name(argv, monkeypatch, tmp_path):
    monkeypatch.setattr(alert, "ALERT_STATE_DIR", tmp_path)
    monkeypatch.setattr(os, "environ", {"SERVICE_RESULT": "exit-code"})
    assert alert.main(argv) == 2
