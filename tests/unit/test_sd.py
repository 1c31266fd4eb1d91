"""worker/sd.py with both implementations, on real sockets: libsystemd through
systemd-python, and the pure-Python fallback that `pip install unitgen` without a
compiler gets. Each case runs in a subprocess; for the fallback, `systemd` is made
unimportable there (sys.modules['systemd'] = None) exactly as if it were not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

APPS = Path(__file__).resolve().parents[1] / "e2e" / "apps"
BACKENDS = ["libsystemd", "python"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "libsystemd" and importlib.util.find_spec("systemd") is None:
        pytest.skip("systemd-python is not installed (pip install -e '.[systemd]')")
    return request.param


def prelude(backend: str) -> str:
    hide = "sys.modules['systemd'] = None\n" if backend == "python" else ""
    return "import sys\n" + hide + f"from unitgen_worker import sd\nassert sd.BACKEND == {backend!r}, sd.BACKEND\n"


def run_sd(backend: str, code: str, *, env: dict[str, str], fds: tuple[int, ...] = ()):
    """Run code after `from unitgen_worker import sd`; returns (its JSON line, stderr)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "LISTEN_"))}
    result = subprocess.run([sys.executable, "-c", prelude(backend) + code], env={**clean, **env},
                            capture_output=True, text=True, pass_fds=fds, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


@pytest.fixture
def receiver(tmp_path):
    """A datagram socket bound in tmp_path, as PID 1's notify socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(10)
        yield sock


def test_notify_sends_one_datagram_and_says_so(backend, receiver):
    message = "READY=1\nSTATUS=serving: 0 requests, été"
    sent, _ = run_sd(backend, f"import json; print(json.dumps(sd.notify({message!r})))",
                     env={"NOTIFY_SOCKET": receiver.getsockname()})
    assert sent is True
    assert receiver.recv(4096).decode() == message


def test_notify_reaches_the_abstract_namespace(backend):
    name = f"unitgen-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(10)
        sent, _ = run_sd(backend, "import json; print(json.dumps(sd.notify('WATCHDOG=1')))",
                         env={"NOTIFY_SOCKET": "@" + name})
        assert sent is True
        assert sock.recv(4096) == b"WATCHDOG=1"


@pytest.mark.parametrize("address", [None, "", "relative/notify"])
def test_notify_without_a_usable_socket_is_false_and_never_raises(backend, address):
    env = {} if address is None else {"NOTIFY_SOCKET": address}
    sent, _ = run_sd(backend, "import json; print(json.dumps(sd.notify('READY=1')))", env=env)
    assert sent is False


def test_notify_failure_is_logged_once_and_recovers(backend, tmp_path):
    # Nobody listens at first (PID 1 re-executing); then the socket is bound anew and
    # the next message must reach it, without restarting the worker.
    path = str(tmp_path / "notify")
    code = f"""
import json, logging, socket
logging.basicConfig()
refused = [sd.notify("STATUS=a"), sd.notify("STATUS=b")]
receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
receiver.bind({path!r})
sent = sd.notify("STATUS=c")
print(json.dumps([refused, sent, receiver.recv(4096).decode()]))
"""
    (refused, sent, received), stderr = run_sd(backend, code, env={"NOTIFY_SOCKET": path})
    assert refused == [False, False]
    assert (sent, received) == (True, "STATUS=c")
    assert stderr.count("sd_notify(STATUS) failed") == 1


ADOPT = """
import json, os, sys
for number, fd in enumerate(int(a) for a in sys.argv[1:]):
    os.dup2(fd, 3 + number)  # inheritable, as systemd passes them
    os.close(fd)
os.environ.update({"LISTEN_PID": str(os.getpid()) if PID is None else PID, "LISTEN_FDS": FDS,
                   "LISTEN_FDNAMES": "web"})
try:
    sockets = sd.adopt_listen_sockets()
    found = [[s.fileno(), s.family.name, s.type.name, os.get_inheritable(s.fileno())] for s in sockets]
    if sockets and sockets[0].type == 1:  # SOCK_STREAM: take the connection queued by the test
        connection, _ = sockets[0].accept()
        connection.sendall(b"adopted")
        connection.close()
except sd.NoSocketError as err:
    found = str(err)
left = sorted(k for k in os.environ if k.startswith("LISTEN_"))
print(json.dumps([found, left]))
"""


def adopt(backend: str, *fds: int, pid: str | None = None, count: str | None = None):
    code = f"PID, FDS = {pid!r}, {count or str(len(fds))!r}\n" + ADOPT
    result = subprocess.run([sys.executable, "-c", prelude(backend) + code, *map(str, fds)],
                            capture_output=True, text=True, pass_fds=fds, timeout=30)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_adopts_the_fds_from_3_of_any_family_and_cleans_up(backend, tmp_path):
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        unix.bind(str(tmp_path / "app.sock"))
        unix.listen()
        with socket.create_connection(tcp.getsockname(), timeout=10) as client:  # waits in the backlog
            found, left = adopt(backend, tcp.fileno(), unix.fileno())
            assert client.recv(100) == b"adopted"
    # FD_CLOEXEC set, as sd_listen_fds() does: the app's children do not inherit them.
    assert found == [[3, "AF_INET", "SOCK_STREAM", False], [4, "AF_UNIX", "SOCK_STREAM", False]]
    assert left == []


@pytest.mark.parametrize("pid, count, error", [
    ("1", None, "no listening socket was passed in"),  # for another process
    (None, "0", "unusable"),
    (None, "x", "unusable"),
    ("", None, "unusable"),
    ("1", "x", "no listening socket was passed in"),  # not ours: LISTEN_FDS is not even read
])
def test_listen_variables_not_for_us_or_malformed(backend, pid, count, error):
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        found, left = adopt(backend, tcp.fileno(), pid=pid, count=count)
    assert error in found
    assert left == []  # unset either way


def test_an_fd_that_is_not_open_is_an_error(backend):
    with socket.socket() as tcp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        found, left = adopt(backend, tcp.fileno(), count="2")  # fd 4 was never passed
    assert "unusable" in found
    assert left == []


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate")
def test_worker_serves_with_either_implementation(backend, receiver):
    # The whole worker, as systemd starts it, on the implementation under test.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = prelude(backend) + (
        "import runpy; sys.argv = ['w', '--app', 'starletteapp:app']; runpy.run_module('unitgen_worker', "
        "run_name='__main__')")
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", f"NOTIFY_SOCKET={receiver.getsockname()}",
           sys.executable, "-c", start]
    proc = subprocess.Popen(cmd, cwd=APPS, stderr=subprocess.PIPE, text=True)
    try:
        assert "Listening on" in proc.stderr.readline()
        with socket.create_connection(("127.0.0.1", port), timeout=15) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            assert client.recv(100).startswith(b"HTTP/1.1 200 ")
        assert receiver.recv(4096).decode().split("\n")[0] == "READY=1"
    finally:
        proc.terminate()
        assert proc.wait(15) == 0, proc.stderr.read()
