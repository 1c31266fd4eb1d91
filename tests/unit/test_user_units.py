"""Units for a user's own systemd (`--manager user`, `unitgen install --user`): what is
rendered, what is refused, and where install writes. Under real systemd: tests/e2e/test_user_install.py."""

import dataclasses
import json
import os
import pwd
import socket
import subprocess
from pathlib import Path

import pytest

from unitgen import manager
from unitgen.errors import Die
from unitgen.install import for_this_manager, save, spec_path
from unitgen.render import render_files, render_units
from unitgen.spec import AppSpec

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
BASE = ["render", "--no-check", "--app", "hello:app", "--cores", "2", "--python", "/usr/bin/python3"]


def spec(**changes) -> AppSpec:
    base = AppSpec(name="hello", app="hello:app", instances=2, listen=("127.0.0.1:8000",), workdir="/srv/apps",
                   python="/usr/bin/python3")
    return dataclasses.replace(base, **changes)


@pytest.fixture
def user_manager(tmp_path):
    """The user manager as cli.py sets it for --user, with its directories in tmp_path."""
    where = manager.Manager(user=True, unit_dir=tmp_path / "config/systemd/user", spec_dir=tmp_path / "state/unitgen",
                            runtime_dir=tmp_path / "runtime")
    manager.use(where)
    yield where
    manager.use(manager.SYSTEM)


def test_user_service_has_no_user_and_no_setting_a_user_manager_cannot_apply():
    service = (GOLDEN / "user" / "mine@.service").read_text()
    lines = {line.split("=", 1)[0] for line in service.splitlines() if "=" in line and not line.startswith("#")}
    # Each of these fails the start or does nothing without privileges (252 and 257, tests/e2e).
    for key in ("User", "DynamicUser", "CapabilityBoundingSet", "AmbientCapabilities", "PrivateDevices",
                "PrivateTmp", "ProtectSystem", "ProtectHome", "ProtectKernelLogs", "ProtectHostname",
                "ReadWritePaths", "OnFailure", "IPAddressAllow"):
        assert key not in lines, key
    for key in ("NoNewPrivileges", "SystemCallFilter", "RestrictAddressFamilies", "RuntimeDirectory"):
        assert key in lines, key
    assert "WantedBy=default.target" in (GOLDEN / "user" / "mine.target").read_text()
    assert "WantedBy=multi-user.target" in (GOLDEN / "minimal" / "hello.target").read_text()


def test_golden_user_units_verify_clean_under_a_user_manager_on_this_host(tmp_path):
    units = sorted(str(p) for p in (GOLDEN / "user").iterdir() if p.suffix in (".socket", ".service", ".target"))
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env = {"PATH": os.environ["PATH"], "XDG_RUNTIME_DIR": str(runtime), "HOME": str(tmp_path)}
    result = subprocess.run(["systemd-analyze", "--user", "verify", *units], capture_output=True, text=True, env=env)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_a_system_spec_saves_as_before_and_a_user_spec_says_so():
    assert "manager" not in json.loads(spec().to_json())
    mine = spec(manager="user")
    assert json.loads(mine.to_json())["manager"] == "user"
    assert AppSpec.from_json(mine.to_json(), "test") == mine


@pytest.mark.parametrize("args, says", [
    (["--user", "www-data"], "--user runs the instances as another user, which a user manager cannot do"),
    (["--on-failure", "alert.service"], "--on-failure needs root"),
    (["--allow", "10.0.0.0/8"], "--allow needs a BPF firewall"),
    (["--deny", "10.0.0.0/8"], "--deny needs a BPF firewall"),
])
def test_render_for_a_user_manager_refuses_what_it_cannot_do(unitgen, tmp_path, args, says):
    result = unitgen(*BASE, "--manager", "user", *args, "--out", str(tmp_path / "out"))
    assert result.returncode != 0
    assert result.stderr.startswith(f"unitgen: error: {says}")
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_saved_user_spec_with_a_user_line_is_refused():
    text = json.dumps({**json.loads(spec(manager="user").to_json()), "user": "www-data"})
    with pytest.raises(Die, match="--user runs the instances as another user"):
        AppSpec.from_json(text, "test")


@pytest.mark.parametrize("command", [["install", "-"], ["uninstall", "x"], ["roll", "x"], ["status", "x"],
                                     ["scale", "x", "2"], ["logs", "x"], ["show", "x"]])
def test_user_commands_as_root_are_refused(unitgen, command):
    if os.geteuid() != 0:
        pytest.skip("checks root's refusal; run as root (the e2e runner does)")
    result = unitgen(*command, "--user", input="")
    assert result.returncode == 1
    assert result.stderr.startswith("unitgen: error: --user manages your own user's units")
    assert len(result.stderr.splitlines()) == 1


def test_user_commands_without_a_user_manager_say_how_to_reach_one(monkeypatch, tmp_path):
    monkeypatch.setattr(manager.os, "geteuid", lambda: 65534)  # nobody: root is refused first
    for runtime, says in (("", "XDG_RUNTIME_DIR is not set"), (str(tmp_path), "is not there")):
        monkeypatch.setenv("XDG_RUNTIME_DIR", runtime)
        with pytest.raises(Die) as err:
            manager.user_manager()
        line = err.value.line()
        assert line.startswith(f"no user manager reachable: {'' if runtime else 'XDG_RUNTIME_DIR'}")
        assert says in line and "machinectl shell" in line
    (tmp_path / "systemd").mkdir()
    with socket.socket(socket.AF_UNIX) as private:
        private.bind(str(tmp_path / "systemd" / "private"))
        monkeypatch.setenv("XDG_CONFIG_HOME", "relative/is/ignored")
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
        found = manager.user_manager()
    home = Path(pwd.getpwuid(65534).pw_dir)
    assert found == manager.Manager(user=True, unit_dir=home / ".config/systemd/user",
                                    spec_dir=tmp_path / "state/unitgen", runtime_dir=tmp_path)


def test_install_user_renders_a_system_bundle_for_the_user_manager(user_manager):
    system = spec()
    adapted, units = for_this_manager(system, render_units(system))
    assert adapted.manager == "user"
    assert units == render_units(dataclasses.replace(system, manager="user"))
    assert "WantedBy=default.target" in units["hello.target"]


def test_install_user_refuses_a_bundle_a_user_manager_cannot_run(user_manager):
    system = spec(user="www-data")
    with pytest.raises(Die, match="--user runs the instances as another user"):
        for_this_manager(system, render_units(system))


def test_a_user_bundle_is_not_installed_system_wide():
    mine = spec(manager="user")
    with pytest.raises(Die, match="rendered for a user manager") as err:
        for_this_manager(mine, render_units(mine))
    assert "unitgen install --user" in err.value.line()


def test_save_writes_only_into_the_users_own_directories(user_manager):
    mine = spec(manager="user")
    files = render_files(mine)
    units = {name: text for name, text in files.items() if not name.endswith(".unitgen.json")}
    save(units, mine)
    assert sorted(p.name for p in user_manager.unit_dir.iterdir()) == sorted(units)
    assert spec_path("hello") == user_manager.spec_dir / "hello.unitgen.json"
    assert AppSpec.from_json(spec_path("hello").read_text(), "saved") == mine
    assert spec_path("hello").stat().st_mode & 0o777 == 0o600
    assert user_manager.spec_dir.stat().st_mode & 0o777 == 0o700


def test_no_linger_is_an_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(manager, "LINGER_DIR", tmp_path)
    with pytest.raises(Die) as err:
        manager.check_user_install(("8080",))
    assert "has no linger" in err.value.line() and "loginctl enable-linger" in err.value.line()


@pytest.mark.parametrize("listen", ["80", "127.0.0.1:443", "[::1]:1023"])
def test_a_privileged_port_is_an_error_naming_the_fix(monkeypatch, tmp_path, listen):
    monkeypatch.setattr(manager, "check_linger", lambda: None)
    monkeypatch.setattr(manager, "unprivileged_port_start", lambda: 1024)
    with pytest.raises(Die) as err:
        manager.check_user_install((listen,))
    assert "only a privileged process may bind" in err.value.line()
    assert "pick a port >= 1024" in err.value.line() and "sudo unitgen install" in err.value.line()
    manager.check_user_install(("1024", "127.0.0.1:8080"))


def test_a_unix_socket_outside_the_users_own_directories_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(manager, "check_linger", lambda: None)
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chown(mine, os.geteuid(), -1)
    manager.check_user_install((str(mine / "app.sock"),))
    if os.geteuid() == 0:
        os.chown(mine, 65534, -1)
        with pytest.raises(Die, match="is not yours"):
            manager.check_user_install((str(mine / "app.sock"),))
