"""The real command line: bad input gives one line, a non-zero exit and no files."""

import os
import subprocess
import sys

import pytest

from unitgen.errors import Die
from unitgen.render import format_bundle, parse_bundle, render_files

BAD = [
    ["--app", "hello"],                      # no colon
    ["--app", "nosuchmodule:app", "--user", "root"],  # missing module (checked as the instances' user)
    ["--app", "hello:nope", "--user", "root"],        # missing attribute
    ["--app", "hello:app", "--name", "multi-user"],
    ["--app", "hello:app", "--name", "systemd-journald"],
    ["--app", "hello:app", "--on-failure", "a.service", "--env", "LD_PRELOAD=/srv/app/x.so"],
    ["--app", "hello:app", "--on-failure", "a.service", "--env", "TZ=:../../srv/tz"],
    ["--app", "hello:app", "--allow", "10.0.0.0/33"],
    ["--app", "hello:app", "--allow", '2001:db8::%"/64'],     # a zone id, found by the property test
    ["--app", "hello:app", "--writable", "relative/path"],
    ["--app", "hello:app", "--hardening", "none"],
    ["--app", "hello:app", "--cores", "0"],
    ["--app", "hello:app", "--cores", "-1"],
    ["--app", "hello:app", "--cores", "abc"],
    ["--app", "hello:app", "--name", "a b"],
    ["--app", "hello:app", "--name", "a/b"],
    ["--app", "hello:app", "--name", ".."],
    ["--app", "hello:app", "--name", "a\nb"],
    ["--app", "hello:app", "--env", "A=1\nExecStartPre=/bin/false"],
    ["--app", "hello:app", "--env", "1A=x"],
    ["--app", "hello:app", "--listen", "localhost:80"],
    ["--app", "hello:app", "--listen", "99999"],
    ["--app", "hello:app", "--workdir", "relative"],
    ["--app", "hello:app", "--workdir", "/does/not/exist"],
    ["--app", "hello:app", "--python", "/does/not/exist"],
    ["--app", "hello:app", "--user", "a b"],
    ["--app", "hello:app", "--interface", "cgi"],
    ["--app", "hello:app", "--bogus"],
]


@pytest.mark.parametrize("args", BAD, ids=lambda a: " ".join(a).replace("\n", "\\n"))
def test_bad_input_is_one_line_and_writes_nothing(unitgen, tmp_path, args):
    out = tmp_path / "units"
    result = unitgen("render", *args, "--out", str(out))
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("unitgen: error: "), result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no scratch directory left behind either


def test_debug_shows_the_traceback_and_the_commands(unitgen):
    result = unitgen("render", "--debug", "--app", "hello:nope", "--user", "root")
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "+ " in result.stderr and "-m unitgen_worker --app hello:nope --interface auto --check" in result.stderr


def test_python_without_the_runtime_says_how_to_install_it(unitgen, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    result = unitgen("render", "--app", "hello:app", "--python", str(venv / "bin/python"), "--user", "root")
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        f"unitgen: error: the unitgen worker runtime is not importable by {venv}/bin/python; "
        f"install it there: {venv}/bin/python -m pip install unitgen"
    ]


def test_out_writes_three_units_and_the_spec(unitgen, tmp_path):
    result = unitgen("render", "--app", "hello:app", "--cores", "3", "--user", "root", "--out", str(tmp_path / "u"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == [
        "hello.socket", "hello.target", "hello.unitgen.json", "hello@.service"]
    assert "Wants=hello@0.service hello@1.service hello@2.service\n" in (tmp_path / "u/hello.target").read_text()


def test_bundle_round_trips(unitgen):
    result = unitgen("render", "--app", "hello:app", "--cores", "2", "--no-check")
    assert result.returncode == 0, result.stderr
    spec, units = parse_bundle(result.stdout, "stdin")
    assert list(units) == ["hello.socket", "hello@.service", "hello.target"]
    assert (spec.app, spec.instances, spec.user) == ("hello:app", 2, None)
    assert format_bundle(render_files(spec)) == result.stdout


def test_a_bundle_whose_units_differ_from_its_spec_is_refused(unitgen):
    bundle = unitgen("render", "--app", "hello:app", "--no-check").stdout
    for edit in (("ProtectSystem=strict", "ProtectSystem=no"), ('"instances": 2', '"instances": 3'),
                 ('"name": "hello"', '"name": "multi-user"'), ('"user": null', '"user": "a\\nb"')):
        assert edit[0] in bundle or edit[0].startswith('"instances"'), edit
        with pytest.raises(Die):
            parse_bundle(bundle.replace(*edit), "stdin")


@pytest.mark.parametrize("text", [
    "", "garbage\n", "# unitgen bundle 1: install with `sudo unitgen install -`\n",
    "# unitgen bundle 2: install with `sudo unitgen install -`\n",
    "# unitgen bundle 1: install with `sudo unitgen install -`\n==> x.socket <==\n# Generated by unitgen\n",
])
def test_bad_bundles_are_refused(text):
    with pytest.raises(Die):
        parse_bundle(text, "stdin")


def test_tampered_unit_in_bundle_is_refused(unitgen):
    bundle = unitgen("render", "--app", "hello:app", "--no-check").stdout
    with pytest.raises(Die):
        parse_bundle(bundle.replace("# Generated by unitgen", "# edited", 1), "stdin")


def test_the_check_never_runs_the_apps_code_with_more_rights_than_the_instances(unitgen, tmp_path):
    marker = tmp_path / "imported"
    (tmp_path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\napp = None\n")
    result = unitgen("render", "--app", "evil:app", "--workdir", str(tmp_path), cwd=tmp_path)
    if os.path.isdir("/run/systemd/system"):
        # Root with systemd running: a transient unit as a fresh dynamic user, whose
        # private /tmp hides this one; whatever it did, it did not do it here.
        assert result.returncode != 0 and "does not load" in result.stderr, result.stderr
    else:
        # Root without systemd and no --user: nobody is safe to be, so no import at all.
        assert result.returncode == 0, result.stderr
        assert result.stderr.startswith("unitgen: note: the app was not imported to check it")
    assert not marker.exists()
    # With --user, it runs as that user, in a session of its own, with a clean environment.
    (tmp_path / "probe.py").write_text(
        "import os, sys\nsys.stderr.write(f'sid={os.getsid(0)} pid={os.getpid()} tty={os.isatty(0)} '"
        "f'secret={os.environ.get(\"SECRET\")}\\n')\nsys.exit(1)\n")
    result = subprocess.run([sys.executable, "-m", "unitgen", "render", "--app", "probe:app", "--user", "root",
                             "--workdir", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "SECRET": "operator's"})
    seen = dict(item.split("=") for item in result.stderr.split("does not load in")[1].split(": ", 1)[1]
                .split(";")[0].split())
    assert seen["sid"] == seen["pid"] and seen["tty"] == "False" and seen["secret"] == "None", result.stderr
