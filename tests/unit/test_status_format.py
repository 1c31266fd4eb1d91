"""Pure pieces of status and logs: formatting and how journal lines are tagged."""

import os
import signal

import pytest

from unitgen.errors import Die
from unitgen.ops import _format
from unitgen.status import AppStatus, InstanceStatus, _bytes, _human, read_counters, table
from unitgen_worker.contract import Counters, counters_file


def test_human_durations_and_sizes():
    assert [_human(s) for s in (None, 5, 65, 3661, 90000)] == ["-", "5s", "1m05s", "1h01m", "1d1h"]
    assert [_bytes(b) for b in (None, 512, 2048, 31_621_120)] == ["-", "512B", "2.0K", "30.2M"]


def test_journal_lines_are_tagged_with_their_instance():
    at = str(1_795_000_000 * 10**6)
    worker = {"_SYSTEMD_UNIT": "shop@3.service", "MESSAGE": "INFO hello", "__REALTIME_TIMESTAMP": at}
    by_pid1 = {"_SYSTEMD_UNIT": "init.scope", "UNIT": "shop@0.service", "MESSAGE": "Stopped x.",
               "__REALTIME_TIMESTAMP": at}
    binary = {"_SYSTEMD_UNIT": "shop@1.service", "MESSAGE": list(b"caf\xc3\xa9 \xff"), "__REALTIME_TIMESTAMP": at}
    assert _format(worker).endswith(" shop@3: INFO hello")
    assert _format(by_pid1).endswith(" shop@0: Stopped x.")
    assert _format(binary).endswith(" shop@1: café \ufffd")


def test_table_has_a_row_per_instance_and_notes_crash_loops():
    row = InstanceStatus(unit="a@0.service", instance=0, wanted=True, state="activating", sub_state="start-pre",
                         pid=None, uptime_seconds=None, memory_bytes=None, rss_bytes=None, restarts=4,
                         requests=None, in_flight=None, failures=5, next_attempt="2026-11-22T21:40:00+00:00")
    other = InstanceStatus(unit="a@1.service", instance=1, wanted=False, state="active", sub_state="running",
                           pid=42, uptime_seconds=61, memory_bytes=None, rss_bytes=2048, restarts=0, requests=7,
                           in_flight=1, failures=0, next_attempt=None)
    status = AppStatus(name="a", app="a:app", socket_unit="a.socket", socket_state="active", listen=("8000",),
                       instances=(row, other))
    lines = table(status).splitlines()
    assert lines[0] == "a (a:app): socket a.socket active on 8000"
    assert lines[2].split()[:6] == ["a@0.service", "activating/start-pre", "-", "-", "-", "4"]
    assert "5 failures in a row; next attempt 2026-11-22T21:40:00+00:00" in lines[2]
    assert lines[3].split()[:10] == ["a@1.service", "active/running", "42", "1m01s", "2.0K", "rss", "0", "7", "-",
                                     "1"]
    assert lines[3].endswith("not wanted (scaled down)")
    document = status.to_dict()
    assert document["schema"] == 1 and document["socket"] == {"unit": "a.socket", "state": "active",
                                                               "listen": ["8000"]}
    assert document["instances"][1]["requests"] == 7 and list(document["instances"][0])[:3] == [
        "unit", "instance", "wanted"]


def test_counters_are_read_only_from_the_current_process_and_as_data(tmp_path):
    Counters(pid=42, requests=9, in_flight=2).publish(counters_file(tmp_path, 0))
    assert read_counters(tmp_path, 0, 42) == Counters(pid=42, requests=9, in_flight=2)
    assert read_counters(tmp_path, 0, 43) is None  # left by a process that is gone
    counters_file(tmp_path, 1).write_text('{"schema": 1, "pid": 42, "requests": "9", "in_flight": 0, '
                                          '"draining": false}')
    assert read_counters(tmp_path, 1, 42) is None
    counters_file(tmp_path, 2).symlink_to(counters_file(tmp_path, 0))
    assert read_counters(tmp_path, 2, 42) is None


def test_shares_are_of_the_instances_that_report_and_busy_threads_show_for_wsgi():
    def row(i, requests, connections, threads=None):
        return InstanceStatus(unit=f"a@{i}.service", instance=i, wanted=True, state="active", sub_state="running",
                              pid=40 + i, uptime_seconds=5, memory_bytes=None, rss_bytes=None, restarts=0,
                              requests=requests, in_flight=0, failures=0, next_attempt=None,
                              connections=connections, busy_threads=3 if threads else None, threads=threads)
    from unitgen.status import _with_shares
    rows = _with_shares([row(0, 300, 16, threads=10), row(1, 100, 48, threads=10), row(2, None, None)])
    assert [(r.requests_share, r.connections_share) for r in rows] == [(75.0, 25.0), (25.0, 75.0), (None, None)]
    status = AppStatus(name="a", app="a:app", socket_unit="a.socket", socket_state="active", listen=(),
                       instances=tuple(rows))
    lines = table(status).splitlines()
    assert lines[1].split() == ["UNIT", "STATE", "PID", "UPTIME", "MEMORY", "RESTARTS", "REQUESTS", "CONNS",
                                "IN-FLIGHT", "BUSY", "NOTE"]
    assert lines[2].split()[6:12] == ["300", "(75%)", "16", "(25%)", "0", "3/10"]
    assert lines[4].split()[6:] == ["-", "-", "0", "-"]


def test_a_property_with_several_values_keeps_every_one():
    # systemctl show prints one Listen= line per address; status lists them all.
    from unitgen.state import _properties
    props = _properties("Listen=127.0.0.1:8080 (Stream)\nListen=/run/user/1000/a.sock (Stream)\nActiveState=active")
    assert props == {"Listen": "127.0.0.1:8080 (Stream) /run/user/1000/a.sock (Stream)", "ActiveState": "active"}


def test_watch_shows_requests_per_second_of_the_same_process_and_frames_one_after_another(monkeypatch):
    import dataclasses
    import io
    import json

    from unitgen import watch as watching

    # What SIGINT does before: Python's KeyboardInterrupt, or nothing where the tests were
    # started in the background (a shell's `&` ignores SIGINT, and its children inherit it).
    handler_before = signal.getsignal(signal.SIGINT)

    def instance(unit, pid, requests):
        return InstanceStatus(unit=unit, instance=int(unit[2]), wanted=True, state="active", sub_state="running",
                              pid=pid, uptime_seconds=5, memory_bytes=None, rss_bytes=None, restarts=0,
                              requests=requests, in_flight=0, failures=0, next_attempt=None)

    first = AppStatus(name="a", app="a:app", socket_unit="a.socket", socket_state="active", listen=("8000",),
                      instances=(instance("a@0.service", 10, 100), instance("a@1.service", 11, 50)))
    # Two seconds later: instance 0 served 400 more; instance 1 was swapped (a new pid counts from 0).
    second = dataclasses.replace(first, instances=(instance("a@0.service", 10, 500), instance("a@1.service", 12, 30)))
    assert watching.rates(first, second, 2.0) == {"a@0.service": 200.0}
    assert watching.rates(None, second, 2.0) == {} and watching.rates(first, second, 0) == {}
    rows = table(second, {"a@0.service": 200.0}).splitlines()
    assert rows[1].split()[:9] == ["UNIT", "STATE", "PID", "UPTIME", "MEMORY", "RESTARTS", "REQUESTS", "REQ/S", "CONNS"]
    assert rows[2].split()[7] == "200" and rows[3].split()[7] == "-"

    looks = iter([first, second, second])
    monkeypatch.setattr(watching, "collect", lambda name: next(looks))
    out, slept = io.StringIO(), []
    assert watching.watch("a", 2.0, out=out, looks=3, sleep=slept.append) == 0
    assert sum(slept) == pytest.approx(4.0) and max(slept) <= watching.SLICE  # two waits, in slices
    assert out.getvalue().count("every 2 s; Ctrl-C stops") == 3
    assert "\033[" not in out.getvalue()  # not a terminal: frames follow one another, no escapes

    class PressedAgain(io.StringIO):
        """A second Ctrl-C while it ends (a user's, or timeout(1)'s: it signals the
        command, then its whole process group)."""
        def write(self, text):
            if text == "\n":
                os.kill(os.getpid(), signal.SIGINT)
            return super().write(text)

    def ctrl_c(seconds):  # a real SIGINT to this process
        os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(watching, "collect", lambda name: first)
    out = PressedAgain()
    assert watching.watch("a", 1.0, as_json=True, out=out, sleep=ctrl_c) == 0  # Ctrl-C: exit 0, not 130
    assert json.loads(out.getvalue().splitlines()[0])["instances"][0]["requests"] == 100
    assert signal.getsignal(signal.SIGINT) is handler_before  # put back as it was

    def systemctl_got_it_too(name):  # the look's systemctl, in the same process group, dies of it
        os.kill(os.getpid(), signal.SIGINT)
        raise Die("systemctl show failed")
    monkeypatch.setattr(watching, "collect", systemctl_got_it_too)
    assert watching.watch("a", 1.0, out=io.StringIO(), sleep=slept.append) == 0
    monkeypatch.setattr(watching, "collect", lambda name: (_ for _ in ()).throw(Die("systemctl show failed")))
    with pytest.raises(Die):  # without a Ctrl-C, a failed look is the error it is
        watching.watch("a", 1.0, out=io.StringIO(), sleep=slept.append)
