"""render's options from unitgen.toml or pyproject.toml [tool.unitgen], through the real
command line: the same units as the flags, the flags win, and a bad file, key or value
is one line naming the file and the key, with nothing written."""

import os
import sys
from pathlib import Path

import pytest

from unitgen.cores import usable_cpus
from unitgen.render import parse_bundle

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable

FLAGS = ["--app", "hello:app", "--name", "shop-api", "--cores", "3", "--listen", "8080", "--listen", "[::1]:9000",
         "--env", "A=1", "--env", "B=two words $x", "--user", "www-data", "--interface", "asgi", "--watchdog", "20",
         "--drain-timeout", "40", "--threads", "12", "--max-concurrency", "50", "--request-timeout", "0",
         "--no-rebalance", "--max-requests", "5000", "--max-requests-jitter", "500", "--memory-max", "512M",
         "--on-failure", "alert@%n.service", "--writable", "/var/lib/shop", "--hardening", "relaxed",
         "--allow", "10.0.0.0/8", "--deny", "10.0.0.7", "--python", PYTHON, "--helper-python", PYTHON,
         "--helper-script", "/usr/lib/python3/dist-packages/unitgen_worker/alert.py"]
# The same options as keys of the file, in both spellings and every form a value takes.
TABLE = f"""\
app = "hello:app"
name = "shop-api"
cores = 3
listen = ["8080", "[::1]:9000"]
env = {{A = "1", B = "two words $x"}}
user = "www-data"
interface = "asgi"
watchdog = 20
drain_timeout = "40"
threads = 12
max-concurrency = 50
request-timeout = 0
no-rebalance = true
max_requests = 5000
max-requests-jitter = 500
memory-max = "512M"
on-failure = "alert@%n.service"
writable = "/var/lib/shop"
hardening = "relaxed"
allow = "10.0.0.0/8"
deny = ["10.0.0.7"]
python = "{PYTHON}"
helper-python = "{PYTHON}"
helper_script = "/usr/lib/python3/dist-packages/unitgen_worker/alert.py"
"""


@pytest.fixture
def app_dir(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "hello.py").write_text((ROOT / "examples/hello.py").read_text())
    return app


def files_in(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def render_by_flags(unitgen, app_dir, out, *flags):
    """The units the command line alone gives (run elsewhere, before any file is there)."""
    result = unitgen("render", *flags, "--workdir", str(app_dir), "--no-check", "--out", str(out), cwd="/")
    assert result.returncode == 0, result.stderr
    return files_in(out)


@pytest.mark.parametrize("file,text", [("pyproject.toml", '[project]\nname = "shop"\n\n[tool.unitgen]\n' + TABLE),
                                       ("unitgen.toml", TABLE)])
def test_the_file_renders_the_same_units_and_spec_as_the_flags(unitgen, app_dir, tmp_path, file, text):
    by_flags = render_by_flags(unitgen, app_dir, tmp_path / "flags", *FLAGS)
    (app_dir / file).write_text(text)
    result = unitgen("render", "--no-check", "--out", str(tmp_path / "file"), cwd=app_dir)
    assert result.returncode == 0, result.stderr
    by_file = files_in(tmp_path / "file")
    assert sorted(by_file) == ["shop-api.socket", "shop-api.target", "shop-api.unitgen.json", "shop-api@.service"]
    assert by_file == by_flags  # the saved spec included, byte for byte
    # As a bundle on standard output too, and found through --workdir from elsewhere.
    bundle = unitgen("render", "--no-check", "--workdir", str(app_dir), cwd="/")
    assert bundle.returncode == 0, bundle.stderr
    flags_bundle = unitgen("render", "--no-check", *FLAGS, "--workdir", str(app_dir), cwd="/")
    assert bundle.stdout == flags_bundle.stdout


def test_the_command_line_wins_and_a_repeatable_option_replaces_the_files_list(unitgen, app_dir, tmp_path):
    (app_dir / "unitgen.toml").write_text('app = "hello:app"\ncores = 3\nlisten = ["8080", "8081"]\n'
                                          'env = ["A=1"]\nthreads = 4\n')
    result = unitgen("render", "--no-check", "--cores", "auto", "--listen", "9000", "--out", str(tmp_path / "u"),
                     cwd=app_dir)
    assert result.returncode == 0, result.stderr
    expected = render_by_flags(unitgen, tmp_path / "app", tmp_path / "flags", "--app", "hello:app", "--cores", "auto",
                               "--listen", "9000", "--env", "A=1", "--threads", "4")
    assert files_in(tmp_path / "u") == expected
    assert f"hello@{max(1, usable_cpus()) - 1}.service\n" in expected["hello.target"].decode()


def test_relative_paths_are_taken_from_the_files_directory(unitgen, app_dir, tmp_path):
    (app_dir / "src").mkdir()
    (app_dir / "src/hello.py").write_text("app = None\n")
    (app_dir / "pyproject.toml").write_text('[tool.unitgen]\napp = "hello:app"\nworkdir = "src"\n'
                                            'writable = ["data", "../app/logs"]\n')
    result = unitgen("render", "--no-check", cwd=app_dir)
    assert result.returncode == 0, result.stderr
    assert f'"workdir": "{app_dir}/src"' in result.stdout
    assert f'"{app_dir}/data",\n    "{app_dir}/logs"' in result.stdout


def test_a_pyproject_without_the_table_is_not_read_and_a_saved_spec_ignores_the_file(unitgen, app_dir, tmp_path):
    # This repository's own pyproject.toml has no [tool.unitgen].
    result = unitgen("render", "--no-check", "--app", "hello:app", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    saved = unitgen("render", "--no-check", "--app", "hello:app", "--workdir", str(app_dir), cwd="/").stdout
    spec = parse_bundle(saved, "stdout")[0].to_json()
    (app_dir / "unitgen.toml").write_text('app = "other:app"\ncores = 0\n')
    again = unitgen("render", "--no-check", "--spec", "-", input=spec, cwd=app_dir)
    assert again.returncode == 0, again.stderr
    assert again.stdout == saved


BOTH = ("unitgen.toml", 'app = "hello:app"\n', "pyproject.toml", '[tool.unitgen]\ncores = 2\n')
BAD = [
    # (files to write, what the one line starts with after "unitgen: error: ")
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\ncores = 0\n'),
     "pyproject.toml [tool.unitgen] cores: 0 is out of range; "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\ncores = "0"\n'),
     "pyproject.toml [tool.unitgen] cores: 0 is out of range; "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\ncores = true\n'),
     "pyproject.toml [tool.unitgen] cores: true is not a whole number or a string; "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\ncors = 2\n'),
     "pyproject.toml [tool.unitgen] cors: unknown key; "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello"\n'),
     "pyproject.toml [tool.unitgen] app: 'hello' has no colon; "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\nmax_requests = -1\n'),
     "pyproject.toml [tool.unitgen] max_requests: '-1' is not a whole number; "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\nmax-requests-jitter = 5\n'),
     "pyproject.toml [tool.unitgen] max-requests-jitter: needs --max-requests; "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\nmax-requests = 5\nmax_requests = 6\n'),
     "pyproject.toml [tool.unitgen] max_requests: given twice (as max-requests too); "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\nout = "/tmp/x"\n'),
     "pyproject.toml [tool.unitgen] out: is given on the command line only; "),
    (("pyproject.toml", '[tool.unitgen]\napp = "hello:app"\nno-rebalance = "yes"\n'),
     "pyproject.toml [tool.unitgen] no-rebalance: 'yes' is not true or false; "),
    (("pyproject.toml", '[tool]\nunitgen = 5\n'), "pyproject.toml: tool.unitgen is not a table; "),
    (("pyproject.toml", '[tool.unitgen\napp = "hello:app"\n'), "pyproject.toml is not valid TOML: "),
    (("unitgen.toml", 'app = "hello:app"\nlisten = ["localhost:80"]\n'),
     "unitgen.toml listen: 'localhost:80' needs a numeric IPv4 address or [IPv6] before the port; "),
    (("unitgen.toml", 'app = "hello:app"\nlisten = []\n'), "unitgen.toml listen: is an empty list; "),
    (("unitgen.toml", 'app = "hello:app"\nlisten = [8080, true]\n'),
     "unitgen.toml listen: true in the list is not a string; "),
    (("unitgen.toml", 'app = "hello:app"\nallow = {any = 1}\n'),
     "unitgen.toml allow: a table is not a string or a list of strings; "),
    (("unitgen.toml", 'app = "hello:app"\nenv = {A = 1.5}\n'), "unitgen.toml env: A = 1.5 is not a string; "),
    (("unitgen.toml", 'app = "hello:app"\nenv = true\n'),
     "unitgen.toml env: true is not a table or a list of strings; "),
    (("unitgen.toml", 'app = "hello:app"\nenv = ["1A=x"]\n'), "unitgen.toml env: '1A=x' is not KEY=VALUE; "),
    (("unitgen.toml", 'app = "hello:app"\non-failure = "a.service"\nenv = {LD_PRELOAD = "/x.so"}\n'),
     "unitgen.toml env: LD_PRELOAD acts on programs before they start; "),
    (("unitgen.toml", 'app = "hello:app"\nname = "multi-user"\n'),
     "unitgen.toml name: 'multi-user' is one of systemd's own unit names; "),
    (("unitgen.toml", 'app = "hello:app"\nhardening = "none"\n'), "unitgen.toml hardening: 'none' is unknown; "),
    (("unitgen.toml", 'app = "hello:app"\nuser = "a b"\n'), "unitgen.toml user: 'a b' is not a valid user name; "),
    (("unitgen.toml", 'app = "hello:app"\nwritable = ""\n'), "unitgen.toml writable: is empty; "),
    (("unitgen.toml", 'app = "hello:app"\nmemory-max = "1.5G"\n'),
     "unitgen.toml memory-max: '1.5G' is not a size; "),
    (("unitgen.toml", 'app = "hello:app"\nthreads = 1.5\n'),
     "unitgen.toml threads: 1.5 is not a whole number or a string; "),
    (("unitgen.toml", b'app = "hello:app\xff"\n'), "unitgen.toml is not valid TOML: it is not UTF-8; "),
    (BOTH, "both unitgen.toml and pyproject.toml [tool.unitgen] set unitgen's options; "),
]


@pytest.mark.parametrize("files,message", BAD, ids=[m.split(";")[0] for _, m in BAD])
def test_a_bad_file_key_or_value_is_one_line_naming_them_and_writes_nothing(unitgen, app_dir, tmp_path, files,
                                                                            message):
    for name, text in zip(files[::2], files[1::2], strict=True):
        (app_dir / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "units"
    result = unitgen("render", "--out", str(out), cwd=app_dir)
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unitgen: error: " + message), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_a_file_found_through_workdir_is_named_by_its_whole_path(unitgen, app_dir, tmp_path):
    (app_dir / "pyproject.toml").write_text('[tool.unitgen]\napp = "hello:app"\ncores = 0\n')
    result = unitgen("render", "--workdir", str(app_dir), "--out", str(tmp_path / "units"), cwd="/")
    assert result.returncode != 0
    assert result.stderr.startswith(f"unitgen: error: {app_dir}/pyproject.toml [tool.unitgen] cores: 0 is out of "
                                    "range; "), result.stderr
    assert not (tmp_path / "units").exists()


def test_a_flag_given_on_the_command_line_is_named_as_the_flag(unitgen, app_dir):
    (app_dir / "unitgen.toml").write_text('app = "hello:app"\ncores = 2\n')
    result = unitgen("render", "--cores", "0", cwd=app_dir)
    assert result.stderr.startswith("unitgen: error: --cores 0 is out of range; "), result.stderr


@pytest.mark.parametrize("how", ["world-writable file", "file of another user", "directory of another user",
                                 "symbolic link"])
def test_a_file_others_can_change_is_refused_and_runs_nothing(unitgen, app_dir, tmp_path, how):
    # `sudo unitgen render` in a directory the app's user can write: the file would pick
    # the interpreter the import check runs (as --user, root included).
    if how.endswith("another user") and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    marker = tmp_path / "ran"
    evil = app_dir / "evil"
    evil.write_text(f"#!/bin/sh\ntouch {marker}\n")
    evil.chmod(0o755)
    config = app_dir / "unitgen.toml"
    config.write_text(f'app = "hello:app"\npython = "{evil}"\n')
    expected = "can be written by someone other than this user or root"
    if how == "world-writable file":
        config.chmod(0o666)
    elif how == "file of another user":
        os.chown(config, 65534, 65534)
    elif how == "directory of another user":
        os.chown(app_dir, 65534, 65534)
        expected = f"is in {app_dir}, which someone other than this user or root can change"
    else:
        config.rename(tmp_path / "elsewhere.toml")
        config.symlink_to(tmp_path / "elsewhere.toml")
        expected = "is a symbolic link"
    result = unitgen("render", "--out", str(tmp_path / "units"), cwd=app_dir)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"unitgen: error: unitgen.toml {expected}"), result.stderr
    assert not marker.exists() and not (tmp_path / "units").exists()
