"""`unitgen dev` with real processes and real sockets: the ASGI and WSGI test apps served
by a user without root, an edit served within 2 s, Ctrl-C letting a slow request finish."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from unitgen.dev import changed, python_files, watched

ROOT = Path(__file__).resolve().parents[2]
APPS = ROOT / "tests/e2e/apps"
# An edit of each test app's file that changes what it answers at /: (before, after).
EDITS = {
    "lifecycle:app": ("slept", "rested"),
    "flaskapp:app": ('return {"pid": os.getpid()}', 'return {"pid": os.getpid(), "rested": True}'),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def runs_as(user: pwd.struct_passwd, argv: list[str]) -> bool:
    """Whether user can run argv (exec'd from a shell of theirs, as the dev server execs)."""
    result = subprocess.run(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
                             "/bin/sh", "-c", 'exec "$@"', "sh", *argv], capture_output=True, timeout=60)
    return result.returncode == 0


@pytest.fixture(scope="module")
def user_and_python():
    """(the command that runs as a user without root, the interpreter that user runs).

    As root the dev server runs as nobody. This venv's interpreter may live where nobody
    cannot go (a pyenv under /root): then nobody gets a venv of Debian's python3 of the
    same version that reads this venv's packages.
    """
    if os.geteuid() != 0:
        return [], sys.executable
    nobody = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups"]
    check = ["-c", "import unitgen, unitgen_worker, uvicorn, flask"]
    if runs_as(nobody, [sys.executable, *check]):
        yield prefix, sys.executable
        return
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not runs_as(nobody, ["/usr/bin/python3", "-c", f"import sys; assert sys.version.startswith('{version}.')"]):
        pytest.skip(f"nobody can run neither {sys.executable} nor a python{version} of Debian's")
    scratch = Path(tempfile.mkdtemp(prefix="unitgen-dev-venv-"))
    try:
        scratch.chmod(0o755)
        subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(scratch / "venv")], check=True)
        python = str(scratch / "venv/bin/python")
        site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              capture_output=True, text=True, check=True).stdout.strip()
        Path(site, "this-venv.pth").write_text(f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
        if not runs_as(nobody, [python, *check]):
            pytest.skip(f"nobody cannot read this checkout's venv ({sysconfig.get_path('purelib')})")
        yield prefix, python
    finally:
        shutil.rmtree(scratch)


@pytest.fixture
def app_dir():
    """The test apps in a directory that a user without root can read (not tmp_path: 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="unitgen-dev-test-"))
    directory.chmod(0o755)
    for app in ("lifecycle.py", "flaskapp.py"):
        shutil.copy(APPS / app, directory / app)
    yield directory
    shutil.rmtree(directory)


class Dev:
    """A running `unitgen dev`; its output (the worker's too) in a file."""

    def __init__(self, user_and_python, app_dir: Path, *args: str) -> None:
        prefix, python = user_and_python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = app_dir.parent / f"{app_dir.name}.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([*prefix, python, "-m", "unitgen", "dev", *args, "--listen",
                                             f"127.0.0.1:{self.port}", "--workdir", str(app_dir)],
                                            cwd=app_dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            assert self.process.poll() is None, self.output()
            assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{self.output()}"
            time.sleep(0.05)

    def get(self, path: str = "/") -> requests.Response:
        return requests.get(self.url + path, timeout=10)

    def stop(self) -> int:
        """Ctrl-C, and the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=30)


@pytest.fixture
def dev(user_and_python, app_dir):
    started = []

    def start(*args: str) -> Dev:
        started.append(Dev(user_and_python, app_dir, *args))
        return started[-1]
    yield start
    for running in started:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
        running.log.unlink(missing_ok=True)


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


@pytest.mark.parametrize("app", EDITS)
def test_dev_serves_the_app_without_root_and_serves_an_edit_within_2_seconds(dev, app_dir, app):
    server = dev("--app", app)
    server.wait_for("serving ")
    first = server.get()
    assert first.status_code == 200
    pid = int(first.headers["x-worker-pid"]) if app == "lifecycle:app" else first.json()["pid"]
    assert uid_of(pid) != 0 and uid_of(server.process.pid) != 0
    old, new = EDITS[app]
    assert "rested" not in first.text

    source = app_dir / f"{app.split(':')[0]}.py"
    source.write_text(source.read_text().replace(old, new))
    edited = time.monotonic()
    while True:
        response = server.get()
        assert response.status_code == 200  # the previous code serves until the new is ready
        if "rested" in response.text:
            break
        assert time.monotonic() - edited < 2, server.output()
        time.sleep(0.05)
    assert server.stop() == 0
    assert "unitgen: stopped" in server.output()


def test_ctrl_c_lets_a_slow_request_finish(dev):
    server = dev("--app", "lifecycle:app")
    server.wait_for("serving ")
    answers = []
    slow = threading.Thread(target=lambda: answers.append(server.get("/sleep?s=2")))
    slow.start()
    time.sleep(0.5)  # the request is in flight
    server.process.send_signal(signal.SIGINT)
    slow.join(timeout=10)
    assert answers and answers[0].status_code == 200 and "slept 2.0" in answers[0].text
    assert server.process.wait(timeout=10) == 0
    assert "drained: 1 requests served" in server.output(), server.output()


def test_code_that_does_not_import_leaves_the_previous_code_serving(dev, app_dir):
    server = dev("--app", "lifecycle:app")
    server.wait_for("serving ")
    pid = server.get().headers["x-worker-pid"]
    source = app_dir / "lifecycle.py"
    good = source.read_text()
    source.write_text(good + "\ndef half_written(:\n")
    server.wait_for("before it was ready")
    assert server.get().headers["x-worker-pid"] == pid
    source.write_text(good.replace("slept", "rested"))
    server.wait_for("serves the new code")
    # The old worker may take one more connection while its drain begins (its loop looks
    # at the signal's flag every 0.1 s).
    deadline = time.monotonic() + 2
    while "rested" not in server.get().text:
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.05)
    assert server.stop() == 0


def test_the_app_comes_from_the_config_file_and_the_workers_stop_when_dev_is_killed(dev, app_dir):
    (app_dir / "unitgen.toml").write_text('app = "lifecycle:app"\nlisten = ["/run/x.sock"]\ncores = 8\n')
    server = dev()
    server.wait_for("serving lifecycle:app")
    pid = int(server.get().headers["x-worker-pid"])
    server.process.kill()  # no drain asked: the worker gets SIGTERM (PR_SET_PDEATHSIG) and drains
    server.process.wait()
    for scratch in Path(tempfile.gettempdir()).glob(f"unitgen-dev-{server.process.pid}-*"):
        shutil.rmtree(scratch)  # its notify sockets, which a killed dev server leaves
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{pid}") and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the worker outlived the dev server"
        time.sleep(0.05)


@pytest.mark.parametrize("args,message", [
    ((), "dev needs --app MODULE:ATTR; "),
    (("--app", "lifecycle"), "--app 'lifecycle' has no colon; "),
    (("--app", "lifecycle:app", "--listen", "localhost:80"), "--listen 'localhost:80' needs a numeric IPv4 address"),
    (("--app", "lifecycle:app", "--workdir", "relative"), "--workdir 'relative' is not an absolute path; "),
])
def test_bad_input_is_one_line(unitgen, args, message):
    result = unitgen("dev", *args, cwd="/")
    assert result.returncode != 0
    assert result.stderr.splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("unitgen: error: " + message), result.stderr


def test_an_address_in_use_is_one_line(unitgen):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = unitgen("dev", "--app", "lifecycle:app", "--listen", f"127.0.0.1:{port}", "--workdir", str(APPS))
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"unitgen: error: cannot listen on 127.0.0.1:{port}: Address already in use; "), lines
    assert "Traceback" not in result.stderr


def test_a_unix_path_that_is_a_file_or_a_live_socket_is_left_alone(unitgen, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("precious")
    result = unitgen("dev", "--app", "lifecycle:app", "--listen", str(data), "--workdir", str(APPS))
    assert result.returncode == 1 and "Address already in use" in result.stderr
    assert data.read_text() == "precious"
    live = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(live))
        server.listen()
        result = unitgen("dev", "--app", "lifecycle:app", "--listen", str(live), "--workdir", str(APPS))
        assert result.returncode == 1 and "Address already in use" in result.stderr
        assert live.is_socket()  # another server's socket: not unlinked, not taken over


def test_the_polling_watcher_sees_python_files_added_changed_and_removed(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "app.py").write_text("a = 1\n")
    (tmp_path / "pkg/mod.py").write_text("b = 1\n")
    (tmp_path / "notes.txt").write_text("not code\n")
    for ignored in (".git", "__pycache__", "node_modules", "env"):
        (tmp_path / ignored).mkdir()
        (tmp_path / ignored / "x.py").write_text("")
    (tmp_path / "env/pyvenv.cfg").write_text("home = /usr/bin\n")  # a virtualenv of any name
    before = python_files(str(tmp_path))
    assert sorted(before) == [str(tmp_path / "app.py"), str(tmp_path / "pkg/mod.py")]

    (tmp_path / "app.py").write_text("a = 2\n")  # same size: the mtime tells
    os.utime(tmp_path / "app.py", ns=(1, before[str(tmp_path / "app.py")][0] + 1))
    (tmp_path / "pkg/mod.py").unlink()
    (tmp_path / "pkg/new.py").write_text("")
    (tmp_path / "notes.txt").write_text("still not code\n")
    assert changed(before, python_files(str(tmp_path))) == {
        str(tmp_path / "app.py"), str(tmp_path / "pkg/mod.py"), str(tmp_path / "pkg/new.py")}
    # What watchfiles reports goes through the same rule.
    assert [watched(str(tmp_path), str(tmp_path / path)) for path in (
        "app.py", "pkg/new.py", "notes.txt", ".git/x.py", "env/x.py", "pkg/__pycache__/mod.py")] == [
        True, True, False, False, False, False]
