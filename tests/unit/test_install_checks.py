"""install's refusals before it writes anything: what systemd (root) would clobber."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from unitgen.errors import Die
from unitgen.install import check_target
from unitgen.spec import AppSpec


def spec(**fields) -> AppSpec:
    base = {"name": "ugcheck", "app": "hello:app", "instances": 1, "listen": ("127.0.0.1:18999",),
            "workdir": "/srv/app", "python": "/usr/bin/python3"}
    return AppSpec(**{**base, **fields})


@pytest.mark.parametrize("option", ["listen", "metrics_listen"])
def test_a_unix_path_where_a_file_that_is_not_a_socket_lives_is_refused(tmp_path, option):
    victim = tmp_path / "precious.txt"
    victim.write_text("data")
    os.chmod(tmp_path, 0o755)
    fields = {"listen": (str(victim),)} if option == "listen" else {"metrics_listen": str(victim)}
    with pytest.raises(Die) as refused:
        check_target(spec(**fields), replace=False)
    flag = "--listen" if option == "listen" else "--metrics-listen"
    assert refused.value.line().startswith(f"{flag} {victim}: a file that is not a socket is there")
    assert victim.read_text() == "data"


@pytest.mark.skipif(os.geteuid() != 0, reason="a directory another user can write needs root to set up")
def test_a_metrics_socket_in_a_directory_another_user_can_write_is_refused(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    os.chown(directory, 65534, 65534)  # nobody's: it could swap the directory for a link
    with pytest.raises(Die) as refused:
        check_target(spec(metrics_listen=str(directory / "metrics.sock")), replace=False)
    assert refused.value.line().startswith(f"--metrics-listen {directory}/metrics.sock: ")


def test_a_live_socket_at_the_path_is_not_refused_as_a_file(tmp_path):
    path = tmp_path / "http.sock"
    os.chmod(tmp_path, 0o755)
    with socket.socket(socket.AF_UNIX) as held:
        held.bind(str(path))
        check_target(spec(listen=(str(path),)), replace=False)


def test_the_metrics_exporter_never_runs_a_virtualenvs_interpreter():
    # This test runs in .venv: its interpreter is one the app's user (or anyone who owns
    # the venv) could change, so root must not start it as the exporter.
    assert sys.prefix != sys.base_prefix, "run the unit tests from the project's .venv"
    with pytest.raises(Die) as refused:
        check_target(spec(metrics_listen="127.0.0.1:19100", user="nobody", helper_python=sys.executable),
                     replace=False)
    assert "the metrics exporter runs it (--metrics-listen)" in refused.value.line()
