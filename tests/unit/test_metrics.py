"""unitgen's exporter: the collector over hand-written counters files (hostile ones among
them), its HTTP server on a real socket, and --metrics-listen's validation."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from unitgen import metrics
from unitgen.errors import Die
from unitgen.spec import parse_metrics_listen
from unitgen_worker.contract import DURATION_BUCKETS, STATUS_CLASSES, Counters, counters_file

NAME = "shop"
PID = 4242


def running(instance: int, pid: int = PID, **props: str) -> tuple[str, dict[str, str]]:
    return f"{NAME}@{instance}.service", {"ActiveState": "active", "SubState": "running", "MainPID": str(pid),
                                          "MemoryCurrent": "52428800", "CPUUsageNSec": "1500000000",
                                          "NRestarts": "2", **props}


def good(pid: int = PID, **fields) -> dict:
    data = {"schema": 1, "pid": pid, "requests": 107, "in_flight": 3, "draining": False, "connections": 64,
            "busy": 0, "threads": 0, "swaps": 4, "recycles": 1, "responses": [0, 100, 2, 3, 1], "unanswered": 1,
            "durations": [50, 30, 10, 5, 5, 0, 0, 0, 0, 0, 0, 7], "duration_sum": 12.5}
    return {**data, **fields}


class FakeCollector(metrics.AppCollector):
    """The real collector with systemd's answer given, as `systemctl show` would give it."""

    def __init__(self, root: Path, units: list[tuple[str, dict[str, str]]]) -> None:
        super().__init__(NAME, root)
        self.fixed = units

    def units(self):
        return self.fixed


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / NAME).mkdir()
    return tmp_path


def write(root: Path, instance: int, data) -> Path:
    path = counters_file(root / NAME, instance)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def scrape(root: Path, units) -> dict[tuple[str, tuple], float]:
    """Every sample of one exposition, parsed back as Prometheus would: (name, labels) -> value."""
    registry = metrics.CollectorRegistry(auto_describe=False)
    registry.register(FakeCollector(root, units))
    text = metrics.generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name: str, instance: int = 0, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted({"app": NAME, "instance": str(instance), **labels}.items()))))


def test_an_instance_with_metrics_gives_every_family(root):
    write(root, 0, good())
    samples = scrape(root, [running(0)])
    for status, count in zip(STATUS_CLASSES, good()["responses"], strict=True):
        assert value(samples, "unitgen_requests_total", status=status) == count
    assert value(samples, "unitgen_requests_unanswered_total") == 1
    # Cumulative buckets, +Inf and _count the sum of every count (the last is the overflow).
    assert value(samples, "unitgen_request_duration_seconds_bucket", le="0.005") == 50
    assert value(samples, "unitgen_request_duration_seconds_bucket", le="0.025") == 90
    assert value(samples, "unitgen_request_duration_seconds_bucket", le="10.0") == 100
    assert value(samples, "unitgen_request_duration_seconds_bucket", le="+Inf") == 107
    assert value(samples, "unitgen_request_duration_seconds_count") == 107
    assert value(samples, "unitgen_request_duration_seconds_sum") == 12.5
    assert len([k for k in samples if k[0] == "unitgen_request_duration_seconds_bucket"]) == len(DURATION_BUCKETS) + 1
    assert value(samples, "unitgen_requests_in_flight") == 3
    assert value(samples, "unitgen_connections") == 64
    assert value(samples, "unitgen_draining") == 0
    assert value(samples, "unitgen_swaps_total") == 4
    assert value(samples, "unitgen_recycles_total") == 1
    assert value(samples, "unitgen_restarts_total") == 2
    assert value(samples, "unitgen_memory_bytes") == 52428800
    assert value(samples, "unitgen_cpu_seconds_total") == 1.5
    assert value(samples, "unitgen_main_pid") == PID
    assert value(samples, "unitgen_state", state="active", sub_state="running") == 1
    assert value(samples, "unitgen_threads") is None  # an ASGI app has no thread pool


def test_without_worker_metrics_there_are_no_request_counters_but_the_rest_is_there(root):
    write(root, 0, {k: v for k, v in good(threads=10, busy=4, draining=True).items()
                    if k not in ("responses", "unanswered", "durations", "duration_sum")})
    samples = scrape(root, [running(0)])
    assert not [k for k in samples if k[0].startswith(("unitgen_requests_total", "unitgen_request_duration"))]
    assert value(samples, "unitgen_draining") == 1
    assert (value(samples, "unitgen_threads_busy"), value(samples, "unitgen_threads")) == (4, 10)


HOSTILE = {
    "huge number": good(requests=10**30),
    "beyond a float": good(responses=[0, 10**400, 0, 0, 0]),
    "huge histogram count": good(durations=[2**64, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
    "a string for a number": good(in_flight="3"),
    "a boolean for a number": good(connections=True),
    "a float for a count": good(swaps=1.0),
    "negative": good(recycles=-1),
    "NaN sum": json.dumps(good()).replace("12.5", "NaN"),
    "infinite sum": json.dumps(good()).replace("12.5", "Infinity"),
    "responses of the wrong length": good(responses=[1, 2, 3]),
    "durations without responses": good(responses=[], durations=[1] * 12),
    "not an object": "[1, 2, 3]",
    "not JSON": "pid=4242 requests=7",
    "deep nesting": "[" * 100000 + "]" * 100000,
    "larger than 4 KiB": json.dumps(good(padding="x" * 5000)),
    "wrong pid": good(pid=PID + 1),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_counters_file_is_ignored_and_systemds_numbers_stay(root, case):
    write(root, 0, HOSTILE[case])
    write(root, 1, good(pid=PID + 10))
    samples = scrape(root, [running(0), running(1, pid=PID + 10)])
    assert not [k for k in samples if dict(k[1]).get("instance") == "0" and k[0] in (
        "unitgen_requests_total", "unitgen_requests_in_flight", "unitgen_connections", "unitgen_swaps_total")]
    assert value(samples, "unitgen_memory_bytes", 0) == 52428800
    assert value(samples, "unitgen_requests_total", 1, status="2xx") == 100  # its sibling is unaffected


def test_a_link_is_not_followed_even_to_a_valid_file_of_the_right_pid(root, tmp_path):
    (tmp_path / "elsewhere.json").write_text(json.dumps(good()))
    os.symlink(tmp_path / "elsewhere.json", counters_file(root / NAME, 0))
    assert value(scrape(root, [running(0)]), "unitgen_requests_in_flight") is None


def test_a_fifo_neither_blocks_nor_counts(root):
    os.mkfifo(counters_file(root / NAME, 0))
    done = threading.Event()
    result = {}
    threading.Thread(target=lambda: (result.update(s=scrape(root, [running(0)])), done.set()), daemon=True).start()
    assert done.wait(10), "the scrape blocked on a FIFO"
    assert value(result["s"], "unitgen_requests_in_flight") is None


def test_no_main_pid_reads_no_file_and_unset_properties_give_no_sample(root):
    write(root, 0, good(pid=0))
    samples = scrape(root, [running(0, pid=0, ActiveState="failed", SubState="failed",
                                   MemoryCurrent="[not set]", CPUUsageNSec=str(2**64 - 1))])
    assert value(samples, "unitgen_requests_in_flight") is None
    assert value(samples, "unitgen_memory_bytes") is None and value(samples, "unitgen_cpu_seconds_total") is None
    assert value(samples, "unitgen_state", state="failed", sub_state="failed") == 1
    assert value(samples, "unitgen_main_pid") == 0


def test_counters_written_by_the_worker_side_read_back(root):
    """Through Counters.publish (the worker's own writer), not a hand-made document."""
    Counters(pid=PID, requests=5, in_flight=0, responses=(0, 5, 0, 0, 0), unanswered=0,
             durations=(5,) + (0,) * len(DURATION_BUCKETS), duration_sum=0.01).publish(counters_file(root / NAME, 3))
    samples = scrape(root, [running(3)])
    assert value(samples, "unitgen_request_duration_seconds_count", 3) == 5
    assert value(samples, "unitgen_requests_total", 3, status="2xx") == 5


@pytest.fixture
def exporter(root):
    """The exporter's HTTP server on a real listening socket, as systemd would pass it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    write(root, 0, good())
    registry = metrics.CollectorRegistry(auto_describe=False)
    collector = FakeCollector(root, [running(0)])
    registry.register(collector)
    handler = type("Handler", (metrics._Handler,), {"registry": registry})
    server = metrics._Server(listener, handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}", collector
    server.shutdown()
    server.server_close()


def test_the_server_answers_a_scrape_in_the_text_format(exporter):
    url, _ = exporter
    response = requests.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(response.text)}
    assert {"unitgen_requests", "unitgen_request_duration_seconds", "unitgen_memory_bytes"} <= names
    assert requests.get(f"{url}/other", timeout=10).status_code == 404


def test_a_scrape_that_systemd_does_not_answer_is_a_503_and_the_server_serves_on(exporter, capfd):
    url, collector = exporter

    def fail():
        raise Die("systemctl show returned non-zero exit code 1")
    collector.units = fail
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 503
    assert "scrape failed: systemctl show" in capfd.readouterr().err
    collector.units = lambda: [running(0)]
    assert requests.get(f"{url}/metrics", timeout=10).status_code == 200


def test_a_client_that_sends_nothing_neither_holds_the_others_nor_stays(exporter, monkeypatch):
    url, _ = exporter
    monkeypatch.setattr(metrics._Handler, "timeout", 0.5)
    host, port = url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(5)]
    try:
        assert requests.get(f"{url}/metrics", timeout=5).status_code == 200
        idle[0].settimeout(5)
        assert idle[0].recv(100) == b""  # closed by the exporter after its read timeout
    finally:
        for sock in idle:
            sock.close()


def test_a_client_that_trickles_is_cut_at_the_deadline_and_a_flood_cannot_starve_scrapes(exporter, monkeypatch):
    url, _ = exporter
    monkeypatch.setattr(metrics, "CONNECTION_DEADLINE", 1.0)
    host, port = url.removeprefix("http://").split(":")
    trickler = socket.create_connection((host, int(port)))
    began = time.monotonic()
    trickler.settimeout(5)
    closed = False
    try:
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 40:  # a byte every 0.1 s: no read times out
            trickler.sendall(bytes([byte]))
            time.sleep(0.1)
    except OSError:
        closed = True  # cut while still sending
    if not closed:
        closed = trickler.recv(100) == b""
    assert closed and time.monotonic() - began < 4.5, "the trickling client was not cut at its deadline"
    trickler.close()
    # More idle clients than the exporter serves at once: the extra ones are closed at
    # once, and a scrape after them is answered (not queued behind them).
    monkeypatch.setattr(metrics._Handler, "timeout", 30)
    flood = [socket.create_connection((host, int(port))) for _ in range(metrics.MAX_CLIENTS + 4)]
    try:
        time.sleep(0.3)
        refused = 0
        for sock in flood:
            sock.settimeout(0.2)
            try:
                refused += sock.recv(1) == b""
            except TimeoutError:
                pass
        assert refused >= 4
    finally:
        for sock in flood:
            sock.close()
    time.sleep(0.5)  # their handlers see the close and free their slots
    assert requests.get(f"{url}/metrics", timeout=5).status_code == 200


def test_the_exporter_refuses_to_run_without_a_socket_from_systemd(capfd, monkeypatch):
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert metrics.main([NAME]) == 1
    assert "no listening socket from systemd" in capfd.readouterr().err
    assert metrics.main(["../etc"]) == 1


@pytest.mark.parametrize("value, listen, problem", [
    ("8000", ("127.0.0.1:8000",), "the app's own --listen"),
    ("127.0.0.1:8000", ("8000",), "the app's own --listen"),
    ("0.0.0.0:8000", ("127.0.0.1:8000",), "the app's own --listen"),
    ("[::]:8000", ("127.0.0.1:8000",), "the app's own --listen"),
    ("/run/a.sock", ("/run/a.sock",), "the app's own --listen"),
    ("99999", ("8000",), "no port from 1 to 65535"),
    ("0", ("8000",), "no port from 1 to 65535"),
    ("localhost:9100", ("8000",), "numeric IPv4"),
    ("[fe80::1%eth0]:9100", ("8000",), "IPv6 zone"),
    ("9100\nExecStartPre=/bin/sh", ("8000",), "--metrics-listen"),
    ("relative.sock", ("8000",), "no port"),
])
def test_metrics_listen_is_validated_like_listen_and_apart_from_it(value, listen, problem):
    with pytest.raises(Die) as err:
        parse_metrics_listen(value, listen, "www-data")
    assert problem in err.value.line() and "--metrics-listen" in err.value.line()


def test_metrics_listen_is_normalised(monkeypatch):
    assert parse_metrics_listen("[0:0::1]:9100", ("127.0.0.1:8000",), "www-data") == "[::1]:9100"
    assert parse_metrics_listen("127.0.0.1:8000", ("[::1]:8000",), "www-data") == "127.0.0.1:8000"


def test_render_with_metrics_listen_adds_the_units_and_the_worker_flag(unitgen, tmp_path):
    result = unitgen("render", "--no-check", "--app", "hello:app", "--metrics-listen", "127.0.0.1:9100",
                     "--user", "www-data", "--python", "/usr/bin/python3", "--helper-python", "/usr/bin/python3",
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert {"hello-metrics.socket", "hello-metrics.service"} <= {p.name for p in tmp_path.iterdir()}
    assert (tmp_path / "hello@.service").read_text().count(" --metrics\n") == 1
    exporter = (tmp_path / "hello-metrics.service").read_text()
    assert 'ExecStart="/usr/bin/python3" -I -m unitgen.metrics hello\n' in exporter
    off = unitgen("render", "--no-check", "--app", "hello:app", "--out", str(tmp_path / "off"))
    assert off.returncode == 0 and "--metrics" not in (tmp_path / "off" / "hello@.service").read_text()
    assert not list((tmp_path / "off").glob("*metrics*"))


def test_a_bad_metrics_listen_is_one_line_and_writes_nothing(unitgen, tmp_path):
    result = unitgen("render", "--no-check", "--app", "hello:app", "--metrics-listen", "8000", "--listen", "8000",
                     "--user", "app", "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and not (tmp_path / "out").exists()
    assert result.stderr.count("\n") == 1 and "--metrics-listen '8000' is the app's own --listen 8000" in result.stderr


def test_a_saved_spec_with_a_bad_metrics_listen_is_refused(unitgen, tmp_path):
    result = unitgen("render", "--no-check", "--app", "hello:app", "--metrics-listen", "9100", "--user", "app",
                     "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    saved = json.loads((tmp_path / "hello.unitgen.json").read_text())
    assert saved["metrics_listen"] == "9100"
    saved["metrics_listen"] = "9100\n[Service]"
    bad = unitgen("render", "--spec", "-", input=json.dumps(saved))
    assert bad.returncode == 1 and "--metrics-listen" in bad.stderr and "Traceback" not in bad.stderr


def test_metrics_need_a_user_of_the_apps_own(unitgen, tmp_path):
    """The system bus (dbus-daemon) refuses a dynamic user, so the exporter could not ask
    systemd anything: render says so instead of writing an exporter that answers 503."""
    with pytest.raises(Die) as err:
        parse_metrics_listen("9100", ("8000",), None)
    assert "--metrics-listen needs --user" in err.value.line()
    result = unitgen("render", "--no-check", "--app", "hello:app", "--metrics-listen", "9100", "--out", str(tmp_path))
    assert result.returncode == 1 and "--metrics-listen needs --user" in result.stderr
