"""Arbitrary strings in every option: a clear one-line error, or units that verify
clean, hold exactly the directives asked for, and carry every value unchanged."""

from __future__ import annotations

import collections
import os
import subprocess
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from unitgen.cli import build_parser, spec_from_args
from unitgen.errors import Die
from unitgen.render import render_units

# Characters that break unit files when written raw, mixed with arbitrary text.
NASTY = st.text(alphabet=st.sampled_from(list("ab09:/.%$\\\"' \n\r\t=[]@-_;#é\x00\x7f\u2028")), max_size=30)
TEXT = st.one_of(st.text(max_size=30), NASTY)
# Printable but hostile to unit files: quotes, specifiers, variables, backslashes, '#'.
PRINTABLE = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=30),
    st.text(alphabet=st.sampled_from(list("ab09:.%$\\\"' =[]@-_;#é")), min_size=1, max_size=30),
)
COMPONENT = PRINTABLE.map(lambda t: t.replace("/", "_").replace("\\", "_").strip() or "x")


# A valid value for every option (hostile text where the option allows any text)...
VALID = {
    "--app": st.from_regex(r"[a-z_]{1,8}(\.[a-z]{1,4})?:[a-z_]{1,8}", fullmatch=True),
    "--name": st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,20}", fullmatch=True),
    "--cores": st.integers(1, 64).map(str),
    "--workdir": COMPONENT.map(lambda t: "/srv/" + t),
    "--user": st.from_regex(r"[a-z_][a-z0-9_-]{0,10}", fullmatch=True),
    "--interface": st.sampled_from(["auto", "asgi", "wsgi"]),
    "--python": st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True),  # below a scratch dir, see below
    "--listen": st.lists(st.one_of(st.integers(1, 65535).map(str), COMPONENT.map(lambda t: "/run/" + t[:90]),
                                   st.sampled_from(["[::1]:8000", "0.0.0.0:80", "127.0.0.2:9"])), max_size=3),
    "--env": st.lists(st.tuples(st.from_regex(r"[A-Z_][A-Z0-9_]{0,5}", fullmatch=True), PRINTABLE).map("=".join),
                      max_size=3),
    "--watchdog": st.integers(0, 3600).map(str),
    "--drain-timeout": st.integers(1, 3600).map(str),
    "--on-failure": st.from_regex(r"[a-z0-9@_.:-]{1,20}\.(service|target)", fullmatch=True),
}
# ...and arbitrary strings for up to two of them in each example.
ARBITRARY = {flag: st.lists(TEXT, max_size=3) if flag in ("--listen", "--env") else TEXT for flag in VALID}


@st.composite
def command_lines(draw) -> dict[str, str | list[str] | None]:
    fuzzed = draw(st.sets(st.sampled_from(sorted(VALID)), max_size=2))
    values: dict[str, str | list[str] | None] = {}
    for flag in VALID:
        if flag in fuzzed:
            values[flag] = draw(ARBITRARY[flag])
        elif flag in ("--app", "--python") or draw(st.booleans()):
            values[flag] = draw(VALID[flag])
        else:
            values[flag] = None
    return values


def unquote(word: str, *, variables: bool = True) -> str:
    """systemd's reading of one double-quoted word that unitgen wrote ($ expands in ExecStart= only)."""
    assert word[0] == word[-1] == '"'
    out, chars = [], iter(word[1:-1])
    for ch in chars:
        if ch == "\\":
            out.append(next(chars))
        elif ch == "%" or (ch == "$" and variables):
            assert next(chars) == ch, word  # always doubled
            out.append(ch)
        else:
            out.append(ch)
    return "".join(out)


def directives(text: str) -> collections.Counter[str]:
    keys: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if line and not line.startswith(("#", "[")):
            keys[line.split("=", 1)[0]] += 1
    return keys


def expected_directives(spec) -> dict[str, collections.Counter[str]]:
    service = collections.Counter(
        Description=1, PartOf=1, StartLimitIntervalSec=1, Type=1, NotifyAccess=1, ExecStart=1, Sockets=1,
        NonBlocking=1, WorkingDirectory=1, Restart=1, RestartSec=1, RestartPreventExitStatus=1, KillMode=1,
        ExecStartPre=1, ExecStopPost=1, TimeoutStartSec=1, TimeoutStopSec=1,
    )
    service["User"] = 1 if spec.user else 0
    service["OnFailure"] = 1 if spec.on_failure else 0
    service["WatchdogSec"] = 1 if spec.watchdog else 0
    service["Environment"] = 1 + len(spec.env)  # UNITGEN_INSTANCE=%i, then the user's
    socket = collections.Counter(Description=1, ListenStream=len(spec.listen), Service=1, WantedBy=1)
    socket["RemoveOnStop"] = 1 if any(a.startswith("/") for a in spec.listen) else 0
    return {
        f"{spec.name}.socket": +socket,
        f"{spec.name}@.service": +service,
        f"{spec.name}.target": collections.Counter(Description=1, Wants=1, WantedBy=1),
    }


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=command_lines())
def test_any_option_value_is_refused_cleanly_or_renders_safe_units(values):
    with tempfile.TemporaryDirectory() as scratch:
        argv = ["render", "--no-check"]
        for flag, value in values.items():
            if isinstance(value, list):
                argv += [f"{flag}={item}" for item in value]
            elif value is not None:
                argv.append(f"{flag}={scratch}/bin/{value}" if flag == "--python" else f"{flag}={value}")
        note(repr(argv))
        try:
            spec = spec_from_args(build_parser().parse_args(argv))
        except Die as err:
            event("refused")
            line = err.line()
            assert line and "\n" not in line and "\r" not in line
            return
        units = render_units(spec)
        for unit, text in units.items():
            assert directives(text) == expected_directives(spec)[unit], unit

        service = units[f"{spec.name}@.service"].splitlines()
        exec_start = next(line for line in service if line.startswith("ExecStart="))
        words = exec_start.removeprefix("ExecStart=").split(" ")
        assert unquote(words[0]) == spec.python and unquote(words[4]) == spec.app
        for helper in ("ExecStartPre=+", "ExecStopPost=+"):
            line = next(line for line in service if line.startswith(helper))
            assert unquote(line.removeprefix(helper).split(" ")[0]) == spec.python
        env_lines = [line.removeprefix("Environment=") for line in service if line.startswith('Environment="')]
        assert [unquote(word, variables=False) for word in env_lines] == [f"{k}={v}" for k, v in spec.env]

        # verify checks that ExecStart's program exists: give it one at that path,
        # which is always inside the scratch directory.
        python = Path(spec.python)
        assert python.is_relative_to(scratch)
        python.parent.mkdir(parents=True, exist_ok=True)
        python.write_text("#!/bin/sh\n")
        python.chmod(0o755)
        for unit, text in units.items():
            (Path(scratch) / unit).write_text(text)
        result = subprocess.run(["systemd-analyze", "verify", *(os.path.join(scratch, u) for u in units)],
                                capture_output=True, text=True)
        assert (result.returncode, result.stdout + result.stderr) == (0, "")
        event("rendered and verified")
