"""The parsers that stand between the user's strings and the unit files."""

import pytest

from unitgen.cores import cgroup_cpus, cgroup_path, quota_cpus
from unitgen.errors import Die
from unitgen.escape import env_assignment, quoted, specifiers
from unitgen.spec import (
    default_name,
    parse_app,
    parse_cores,
    parse_env,
    parse_executable,
    parse_listen,
    parse_name,
    parse_path,
    parse_unit,
    parse_user,
)


@pytest.mark.parametrize("value", ["myapp:app", "pkg.web:application", "_a.b_c:d.e"])
def test_app_accepts_module_colon_attr(value):
    assert parse_app(value) == value


@pytest.mark.parametrize("value", ["myapp", "", "a:", ":b", "a b:c", "a:b:c", "1a:b", "a-b:c", "a:b()"])
def test_app_rejects_the_rest(value):
    with pytest.raises(Die):
        parse_app(value)


def test_default_name_is_the_top_level_module():
    assert default_name("shop.web:application") == "shop"


@pytest.mark.parametrize("value", ["a b", "a/b", "..", "a..b", "a\nb", "", "a@b", ".hidden", "x.", "a%i", "é"])
def test_name_rejects_what_is_not_a_plain_unit_name(value):
    with pytest.raises(Die):
        parse_name(value)


def test_cores():
    assert parse_cores("auto", usable=3) == 3
    assert parse_cores("7", usable=3) == 7
    for bad in ("0", "-1", "abc", "", "1.5", " 2", "1025"):
        with pytest.raises(Die):
            parse_cores(bad, usable=3)


@pytest.mark.parametrize("value,expected", [
    ("8000", "8000"), ("127.0.0.1:8000", "127.0.0.1:8000"), ("[::1]:80", "[::1]:80"),
    ("[0:0::1]:80", "[::1]:80"), ("/run/app.sock", "/run/app.sock"), ("0.0.0.0:08080", "0.0.0.0:8080"),
])
def test_listen_normalises(value, expected):
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", [
    "0", "65536", "host:80", "1.2.3:80", "[::zz]:80", "::1:80", "run/app.sock", "/run/../x", "/run/x\n",
    "/" + "s" * 107, "127.0.0.1:", ":80",
])
def test_listen_rejects(value):
    with pytest.raises(Die):
        parse_listen(value)


def test_env():
    assert parse_env("A_1=x=y $z") == ("A_1", "x=y $z")
    assert parse_env("EMPTY=") == ("EMPTY", "")
    for bad in ("A", "1A=x", "A B=x", "=x", "A=b\nc", "A=b\x00", "A=\t"):
        with pytest.raises(Die):
            parse_env(bad)


def test_paths_and_users():
    assert parse_path("--workdir", "/srv/my app") == "/srv/my app"
    for bad in ("srv", "/srv/", "/srv//a", "/srv/./a", "/a\\b", "/a\n", " /a", "/a "):
        with pytest.raises(Die):
            parse_path("--workdir", bad)
    assert parse_user("www-data") == "www-data"
    assert parse_user("1000") == "1000"
    for bad in ("root\n", "a b", "-x", "a:b", "x" * 40):
        with pytest.raises(Die):
            parse_user(bad)


def test_escaping():
    assert specifiers("50%") == "50%%"
    assert quoted('a "b" $c %d \\') == '"a \\"b\\" $$c %%d \\\\"'
    # No $ expansion in Environment=, so $ stays single there.
    assert env_assignment("K", 'v "$x" 5% \\') == '"K=v \\"$x\\" 5%% \\\\"'


def test_cgroup_quota(tmp_path):
    assert quota_cpus("max 100000") is None
    assert quota_cpus("150000 100000") == 2
    assert quota_cpus("50000 100000") == 1
    assert cgroup_path("0::/system.slice/x.service\n") == "/system.slice/x.service"
    assert cgroup_path("1:name=systemd:/x\n") is None
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    (tmp_path / "fs/a/b").mkdir(parents=True)
    (tmp_path / "fs/a/cpu.max").write_text("300000 100000\n")
    (tmp_path / "fs/a/b/cpu.max").write_text("max 100000\n")
    assert cgroup_cpus(root=tmp_path / "fs", proc=proc) == 3


def test_executable_paths_systemd_would_refuse_are_rejected():
    assert parse_executable("--python", "/opt/my venv/bin/python") == "/opt/my venv/bin/python"
    for bad in ("/opt/it's/python", '/opt/"x"/python', "/opt/a\\b"):
        with pytest.raises(Die):
            parse_executable("--python", bad)


def test_on_failure_takes_unit_names_with_instance_specifiers():
    for good in ("alert.service", "alert@%n.service", "page@ops-%i.target", "a.b:c@x.service"):
        assert parse_unit("--on-failure", good) == good
    for bad in ("@.service", "alert@.service", "a@b@c.service", "alert", "alert.socket", "%x.service",
                "a b.service", "x" * 201 + ".service"):
        with pytest.raises(Die):
            parse_unit("--on-failure", bad)
