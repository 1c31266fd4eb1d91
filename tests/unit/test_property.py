"""Hostile strings in every render option, one option at a time.

For each value option of `unitgen render` a hypothesis run fuzzes that option
(arbitrary text, and values built from the characters that matter to unit files) while
every other option gets a valid, often hostile-looking, value; `render --out DIR` runs
as the command line would run it. Each example is either

(a) refused with a Die whose message is one line, or
(b) rendered into units holding exactly the directives the spec asks for, in order
    (every line parsed; no continuation line, no indented line), where
(c) no file name leaves the --out directory and nothing is written elsewhere,
(d) `systemd-analyze verify` says nothing (every rendered example, in batches after
    the run, each alone again when a batch complains), and
(e) every value reads back unchanged through systemd's own unquoting rules (the reader
    below), the saved spec reads back to the same spec and `install` accepts the files.

UNITGEN_PROPERTY_EXAMPLES: examples per option (default 80, CI; tests/property runs
2,000). UNITGEN_PROPERTY_SEED: fixed (default, derandomized), random, or a number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, note, seed, settings
from hypothesis import strategies as st
from property_inputs import (  # beside this file: the values fed to render
    _FIELDS,
    EXPLICIT,
    FUZZ,
    RENDER_OPTIONS,
    REPEATABLE,
    VALID,
    InScratch,
    SpecFile,
)
from unit_reader import (  # beside this file: systemd's reading of a unit file
    INSTANCE,
    command,
    env_words,
    instance_table,
    path_words,
    plain_words,
    raw,
    read_unit,
    reload_command,
    rest_of_line,
    specifiers,
    unit_words,
    worker_command,
)

from unitgen import __version__
from unitgen.cli import build_parser
from unitgen.cores import usable_cpus
from unitgen.errors import Die
from unitgen.render import check_files, format_bundle, parse_bundle, render_files
from unitgen.spec import AppSpec
from unitgen_worker import alert
from unitgen_worker.contract import SPEC_SUFFIX, WorkerConfig

EXAMPLES = int(os.environ.get("UNITGEN_PROPERTY_EXAMPLES", "80"))
SEED = os.environ.get("UNITGEN_PROPERTY_SEED", "fixed")
BATCH = 40  # examples per systemd-analyze verify call
PARSER = build_parser()
DEFAULT_HELPER_SCRIPT = str(Path(alert.__file__).resolve())

# --- what each unit must hold ---------------------------------------------------------
def _under_home(path: str) -> bool:
    return any(path == home or path.startswith(home + "/") for home in ("/home", "/root", "/run/user"))


def dynamic_user(name: str) -> str:
    candidate = f"unitgen-{name}"
    if len(candidate) <= 31 and re.fullmatch(r"[a-z_][a-z0-9_-]*", candidate):
        return candidate
    return "unitgen-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def _user_sandbox(spec: AppSpec) -> list[tuple[str, str]]:
    """What a user manager can apply (tests/e2e/test_user_install.py, units/service.j2)."""
    return [("NoNewPrivileges", "yes"), ("UMask", "0027"), ("RestrictRealtime", "yes"), ("RestrictSUIDSGID", "yes"),
            ("LockPersonality", "yes"), ("KeyringMode", "private"),
            ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
            *([("RestrictNamespaces", "yes"), ("MemoryDenyWriteExecute", "yes"),
               ("SystemCallArchitectures", "native"), ("SystemCallFilter", "@system-service"),
               ("SystemCallFilter", "~@privileged @resources")] if spec.hardening == "strict" else [])]


def expected_units(spec: AppSpec) -> dict[str, list[tuple]]:
    """Every directive of each unit: (section, key, decoder, value after decoding)."""
    name, table = spec.name, instance_table(spec.name)
    me = f"{name}@{INSTANCE}.service"
    on_failure = specifiers(spec.on_failure, table) if spec.on_failure else None
    user_manager = spec.manager == "user"
    service = [
        ("Unit", "Description", raw, f"{name} worker %i (unitgen)"),
        ("Unit", "PartOf", raw, f"{name}.target"),
        ("Unit", "StartLimitIntervalSec", raw, "0"),
        *([("Unit", "OnFailure", unit_words, [on_failure])] if on_failure else []),
        ("Service", "Type", raw, "notify"),
        ("Service", "NotifyAccess", raw, "main"),
        ("Service", "Environment", env_words, [f"UNITGEN_INSTANCE={INSTANCE}"]),
        *[("Service", "Environment", env_words, [f"{key}={value}"]) for key, value in spec.env],
        ("Service", "WorkingDirectory", rest_of_line, spec.workdir),
        *([] if user_manager else [("Service", "User", rest_of_line, spec.user)] if spec.user else
          [("Service", "DynamicUser", raw, "yes"), ("Service", "User", rest_of_line, dynamic_user(name))]),
        ("Service", "RuntimeDirectory", raw, f"unitgen/{name}"),
        ("Service", "RuntimeDirectoryPreserve", raw, "yes"),
        ("Service", "StateDirectory", raw, f"unitgen/{name}"),
        ("Service", "ExecStartPre", command,
         ("-", spec.python, ["-I", "-m", "unitgen_worker.backoff", "wait", me])),
        ("Service", "ExecStart", worker_command,
         ("", spec.python, ["-m", "unitgen_worker"],
          WorkerConfig(app=spec.app, interface=spec.interface, instance=INSTANCE,
                       drain_timeout=float(spec.drain_timeout), threads=spec.threads,
                       max_concurrency=spec.max_concurrency, request_timeout=float(spec.request_timeout),
                       rebalance=spec.rebalance, max_requests=spec.max_requests,
                       max_requests_jitter=spec.max_requests_jitter,
                       memory_max=spec.memory_max, metrics=spec.metrics_listen is not None))),
        ("Service", "ExecReload", reload_command,
         ("", spec.python, ["-I", "-m", "unitgen_worker.reload", me, "$MAINPID"])),
        ("Service", "ExecStopPost", command,
         ("-", spec.python, ["-I", "-m", "unitgen_worker.backoff", "record", me])),
        *([("Service", "ExecStopPost", command,
            ("-+", spec.helper_python, ["-I", "-S", spec.helper_script, me, on_failure]))]
          if on_failure else []),
        ("Service", "Sockets", raw, f"{name}.socket"),
        ("Service", "NonBlocking", raw, "yes"),
        ("Service", "Restart", raw, "always"),
        ("Service", "RestartSec", raw, "100ms"),
        ("Service", "RestartPreventExitStatus", raw, "78"),
        *([("Service", "MemoryMax", raw, str(spec.memory_max))] if spec.memory_max else []),
        *([("Service", "WatchdogSec", raw, str(spec.watchdog))] if spec.watchdog else []),
        ("Service", "TimeoutStartSec", raw, "122"),
        ("Service", "TimeoutStopSec", raw, str(spec.drain_timeout + 15)),
        ("Service", "KillMode", raw, "mixed"),
        *[("Service", key, raw, value) for key, value in (_user_sandbox(spec) if user_manager else [
            ("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", ""), ("AmbientCapabilities", ""),
            ("UMask", "0027"), ("PrivateTmp", "yes"), ("PrivateMounts", "yes"),
            ("ProtectHome", "read-only" if any(map(_under_home, (spec.workdir, spec.python, *spec.writable)))
             else "yes"),
            ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"), ("ProtectClock", "yes"), ("ProtectHostname", "yes"),
            ("RestrictRealtime", "yes"), ("RestrictSUIDSGID", "yes"), ("LockPersonality", "yes"),
            ("RemoveIPC", "yes"), ("KeyringMode", "private"), ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
            *([("ProtectSystem", "strict"), ("PrivateDevices", "yes"), ("ProtectProc", "invisible"),
               ("RestrictNamespaces", "yes"), ("MemoryDenyWriteExecute", "yes"),
               ("SystemCallArchitectures", "native"), ("SystemCallFilter", "@system-service"),
               ("SystemCallFilter", "~@privileged @resources")]
              if spec.hardening == "strict" else [("ProtectSystem", "full")]),
        ])],
        *[("Service", "ReadWritePaths", path_words, [path]) for path in ([] if user_manager else spec.writable)],
    ]
    socket = [
        ("Unit", "Description", raw, f"{name} listening socket (unitgen)"),
        *[("Socket", "ListenStream", rest_of_line, address) for address in spec.listen],
        ("Socket", "Service", raw, f"{name}@0.service"),
        *([("Socket", "RemoveOnStop", raw, "yes")] if any(a.startswith("/") for a in spec.listen) else []),
        *[("Socket", "IPAddressAllow", plain_words, [cidr]) for cidr in spec.allow],
        *[("Socket", "IPAddressDeny", plain_words, [cidr]) for cidr in spec.deny],
        *([("Socket", "IPAddressDeny", plain_words, ["any"])] if spec.allow and not spec.deny else []),
        *([("Socket", "IPAccounting", raw, "yes")] if spec.allow or spec.deny else []),
        ("Install", "WantedBy", raw, "sockets.target"),
    ]
    n = spec.instances
    target = [
        ("Unit", "Description", raw, f"{name}: {n} instance{'s' if n != 1 else ''} of {spec.app} (unitgen)"),
        ("Unit", "Wants", raw, " ".join(f"{name}@{i}.service" for i in range(n))),
        ("Install", "WantedBy", raw, "default.target" if user_manager else "multi-user.target"),
    ]
    units = {f"{name}.socket": socket, f"{name}@.service": service, f"{name}.target": target}
    if spec.metrics_listen is not None:
        units.update(expected_metrics_units(spec))
    return units


def expected_metrics_units(spec: AppSpec) -> dict[str, list[tuple]]:
    name = spec.name
    socket = [
        ("Unit", "Description", raw, f"{name} Prometheus metrics socket (unitgen)"),
        ("Socket", "ListenStream", rest_of_line, spec.metrics_listen),
        ("Socket", "Service", raw, f"{name}-metrics.service"),
        *([("Socket", "RemoveOnStop", raw, "yes")] if spec.metrics_listen.startswith("/") else []),
        ("Install", "WantedBy", raw, "sockets.target"),
    ]
    service = [
        ("Unit", "Description", raw, f"{name} Prometheus metrics exporter (unitgen)"),
        ("Unit", "Requires", raw, f"{name}-metrics.socket"),
        ("Unit", "After", raw, f"{name}-metrics.socket"),
        ("Service", "ExecStart", command, ("", spec.helper_python, ["-I", "-m", "unitgen.metrics", name])),
        ("Service", "User", rest_of_line, spec.user),
        ("Service", "RuntimeDirectory", raw, f"unitgen/{name}"),
        ("Service", "RuntimeDirectoryPreserve", raw, "yes"),
        *[("Service", key, raw, value) for key, value in [
            ("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", ""), ("AmbientCapabilities", ""),
            ("UMask", "0077"), ("PrivateTmp", "yes"), ("PrivateDevices", "yes"), ("PrivateMounts", "yes"),
            ("PrivateNetwork", "yes"), ("IPAddressDeny", "any"), ("RestrictAddressFamilies", "AF_UNIX"),
            ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("ProtectProc", "invisible"),
            ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"), ("ProtectKernelLogs", "yes"),
            ("ProtectControlGroups", "yes"), ("ProtectClock", "yes"), ("ProtectHostname", "yes"),
            ("RestrictNamespaces", "yes"), ("RestrictRealtime", "yes"), ("RestrictSUIDSGID", "yes"),
            ("LockPersonality", "yes"), ("MemoryDenyWriteExecute", "yes"), ("KeyringMode", "private"),
            ("SystemCallArchitectures", "native"), ("SystemCallFilter", "@system-service"),
            ("SystemCallFilter", "~@privileged @resources"), ("TasksMax", "32"), ("MemoryMax", "128M"),
        ]],
    ]
    return {f"{name}-metrics.socket": socket, f"{name}-metrics.service": service}


def check_unit(unit: str, text: str, expected: list[tuple], table: dict[str, str]) -> None:
    assert text.startswith(f"# Generated by unitgen {__version__} for "), unit
    got = read_unit(text)
    assert [(s, k) for s, k, _ in got] == [(s, k) for s, k, _, _ in expected], unit
    for (section, key, value), (_, _, decode, want) in zip(got, expected, strict=True):
        assert decode(value, table) == want, f"{unit} [{section}] {key}={value}"


def test_the_reader_reads_values_as_systemd_252_does():
    # What systemd-analyze verify 252 echoed back for these values (in its warnings).
    table = instance_table("a")
    assert path_words('"rel\\x41tive\\q%%n$$"', table) == ["relx41tiveq%n$$"]
    assert command('"/nonexist\\x41\\\\ %%n$$"', table) == ("", "/nonexistA\\ %n$$", [])
    assert env_words('"1EMPTY=\\x41%%n$$"', table) == ["1EMPTY=A%n$$"]
    assert rest_of_line('"rel\\x41 %%n"', table) == '"rel\\x41 %n"'
    assert plain_words('"10.0.0.1" %n \\x41', table) == ['"10.0.0.1"', "%n", "x41"]


def test_the_golden_units_hold_what_their_specs_ask_for():
    golden = Path(__file__).resolve().parents[1] / "golden"
    for saved in golden.glob(f"*/*{SPEC_SUFFIX}"):
        spec = AppSpec.from_json(saved.read_text(), str(saved))
        for unit, expected in expected_units(spec).items():
            table = instance_table(spec.name) if unit.endswith("@.service") else {}
            check_unit(unit, (saved.parent / unit).read_text(), expected, table)


def test_every_render_option_is_fuzzed():
    assert sorted(FUZZ) == RENDER_OPTIONS
    assert sorted(VALID) == sorted(set(RENDER_OPTIONS) - {"--out", "--spec"})
    # rebalance is a flag (--no-rebalance): it takes no value to fuzz; spec_files draws it.
    assert sorted(_FIELDS) == sorted(f.name for f in dataclasses.fields(AppSpec) if f.name != "rebalance")


@st.composite
def command_lines(draw, fuzzed: str) -> dict:
    # The fuzzed value first: hypothesis gives the last draws of a large example their
    # simplest value.
    values = {fuzzed: draw(FUZZ[fuzzed])}
    if fuzzed == "--spec":  # the spec stands for every other option
        return values
    for flag in VALID:
        # --app is required; the alert helper is rendered only with --on-failure.
        needed = flag == "--app" or (flag == "--on-failure" and fuzzed.startswith("--helper-"))
        if flag != fuzzed and (needed or draw(st.booleans())):
            values[flag] = draw(VALID[flag])
    return values


# --- one run per option ----------------------------------------------------------------
def _scratch_root() -> str | None:
    """A tmpfs where programs may run, if there is one: write_files fsyncs every file."""
    try:
        with tempfile.NamedTemporaryFile(dir="/dev/shm") as probe:
            os.chmod(probe.name, 0o755)
            return "/dev/shm" if os.access(probe.name, os.X_OK) else None
    except OSError:
        return None


def _resolve(value, base: str):
    """value with every InScratch made a path below base; a --spec dict as its JSON text."""
    if isinstance(value, InScratch):
        # Not Path(base, ...): pathlib would tidy away the '//' and '.' being tested.
        return f"{base}/{value.relative}"
    if isinstance(value, list):
        return [_resolve(v, base) for v in value]
    if isinstance(value, dict):
        return {k: _resolve(v, base) for k, v in value.items()}
    return value


@dataclasses.dataclass
class Rendered:
    argv: list[str]
    name: str
    base: Path
    units: list[Path]


class Run:
    """The examples of one option's run; verifies what they rendered, in batches."""

    def __init__(self, flag: str) -> None:
        self.flag = flag
        self.scratch = Path(tempfile.mkdtemp(prefix="unitgen-property-", dir=_scratch_root()))
        self.ids = 0
        self.count = {"examples": 0, "refused": 0, "rendered": 0, "verified": 0, "verify calls": 0,
                      "program elsewhere and missing: not verified": 0}
        self.batches: list[list[Rendered]] = []
        self.failures: list[str] = []

    def example(self, values: dict) -> None:
        self.ids += 1
        base = self.scratch / f"x{self.ids}"
        values = _resolve(values, str(base))
        out = values.get("--out", f"{base}/out/units")
        # Never write outside this example's directory, whatever '..' the path holds.
        normal = os.path.normpath(out)
        assume(normal == f"{base}/out" or normal.startswith(f"{base}/out/"))
        self.count["examples"] += 1
        (base / "out").mkdir(parents=True)
        spec_file = base / "in.json"
        if isinstance(values.get("--spec"), SpecFile):
            content = values["--spec"].content
            text = content if isinstance(content, str) else json.dumps(_resolve(content, str(base)), indent=1)
            spec_file.write_bytes(text.encode("utf-8", "surrogatepass"))
            values = {"--spec": str(spec_file)}
        argv = ["render", "--no-check", *(f"{flag}={v}" for flag, value in values.items() if flag != "--out"
                                          for v in (value if flag in REPEATABLE else [value])), f"--out={out}"]
        note(repr(argv))
        try:
            args = PARSER.parse_args(argv)
            assert args.func(args) == 0
        except Die as err:
            # (a) A refusal is one line.
            line = err.line()
            assert line and len(line.splitlines()) == 1 and line == line.strip(), repr(line)
            assert not any(p.is_file() and p != spec_file for p in base.rglob("*")), "written, yet refused"
            self.count["refused"] += 1
            event("refused")
            shutil.rmtree(base)
            return

        # (c) The files are in the --out directory, and nothing was written anywhere else.
        directory = Path(normal)
        written = {p for p in base.rglob("*") if not p.is_dir()} - {spec_file}
        assert {p.parent for p in written} == {directory}, sorted(written)
        files = {p.name: p.read_text() for p in written}
        for name in files:
            assert "/" not in name and name not in (".", ".."), name
        spec_name = next(name for name in files if name.endswith(SPEC_SUFFIX))
        spec = AppSpec.from_json(files[spec_name], spec_name)
        assert sorted(files) == sorted([f"{spec.name}.socket", f"{spec.name}@.service", f"{spec.name}.target",
                                        f"{spec.name}{SPEC_SUFFIX}", *([f"{spec.name}-metrics.socket",
                                        f"{spec.name}-metrics.service"] if spec.metrics_listen else [])])
        if "--spec" not in values:
            check_fidelity(values, spec)
        if spec.on_failure:
            # systemd resolves OnFailure= in each instance (verify tries only @0 and @i): a
            # unit name over 255 characters is dropped there, and no alert goes out.
            last = str(spec.instances - 1)
            table = {"i": last, "n": f"{spec.name}@{last}.service", "N": f"{spec.name}@{last}", "p": spec.name}
            assert len(specifiers(spec.on_failure, table)) <= 255, spec.on_failure
        # (b), (e) Exactly the directives asked for, and every value reads back.
        for unit, expected in expected_units(spec).items():
            check_unit(unit, files[unit], expected, instance_table(spec.name) if unit.endswith("@.service") else {})
        # The saved spec reads back to the same spec; install takes these files and no other.
        assert AppSpec.from_json(spec.to_json(), "spec") == spec
        assert render_files(spec) == files
        units = {name: text for name, text in files.items() if name != spec_name}
        assert check_files(files, "--out") == (spec, units)
        assert parse_bundle(format_bundle(files), "bundle") == (spec, units)

        # systemd-analyze verify checks that ExecStart='s program exists: put one there. An
        # arbitrary absolute path elsewhere (say /*) cannot be made: verify would only say
        # that it is missing, so such an example is checked up to here.
        if any(not Path(p).is_relative_to(base) and not os.path.exists(p) for p in {spec.python, spec.helper_python}):
            self.count["program elsewhere and missing: not verified"] += 1
            shutil.rmtree(base, ignore_errors=True)
            return
        for program in {spec.python, spec.helper_python}:
            if Path(program).is_relative_to(base):
                try:
                    Path(program).parent.mkdir(parents=True, exist_ok=True)
                    Path(program).write_text("#!/bin/sh\n")
                    Path(program).chmod(0o755)
                except OSError as err:  # a name the file system refuses: verify will say so
                    note(f"cannot create {program!r}: {err}")
        # Verified from a directory of a plain name: systemd-analyze puts the directories
        # of the units it is given into a ':'-separated search path.
        plain = base / "verify"
        plain.mkdir()
        for name, text in units.items():
            (plain / name).write_text(text)
        self.count["rendered"] += 1
        event("rendered (verified after the run)")
        self.add(Rendered(argv, spec.name, base, [plain / name for name in units]))

    def add(self, rendered: Rendered) -> None:
        # Units of one verify call must have distinct names.
        for batch in self.batches:
            if all(other.name != rendered.name for other in batch):
                batch.append(rendered)
                if len(batch) >= BATCH:
                    self.batches.remove(batch)
                    self.verify(batch)
                return
        self.batches.append([rendered])

    def verify(self, batch: list[Rendered]) -> None:
        """(d) systemd-analyze verify on a batch; on a complaint, each example alone."""
        complaint = verify([unit for rendered in batch for unit in rendered.units])
        self.count["verify calls"] += 1
        blamed = 0
        for rendered in batch:
            alone = verify(rendered.units) if complaint else None
            if alone is None:
                self.count["verified"] += 1
            else:
                blamed += 1
                self.failures.append(f"{rendered.argv!r}:\n{alone}")
            shutil.rmtree(rendered.base)
        if complaint and not blamed:
            self.failures.append(f"a batch of {len(batch)} examples:\n{complaint}")

    def finish(self) -> None:
        while self.batches:
            self.verify(self.batches.pop())
        self.report()

    def report(self, stopped: str = "") -> None:
        """The run's counts (tests/property prints them): the event() statistics, as numbers."""
        print(f"\n{self.flag}: {self.count['examples']} examples{stopped}: {self.count['refused']} refused, "
              f"{self.count['rendered']} rendered, {self.count['verified']} of them verified clean "
              f"({self.count['verify calls']} systemd-analyze verify calls)"
              + (f"; {missing} with a program outside the scratch directory that does not exist, not verified"
                 if (missing := self.count["program elsewhere and missing: not verified"]) else ""))


def verify(units: list[Path]) -> str | None:
    """What systemd-analyze verify says about these units, None when it says nothing."""
    result = subprocess.run(["systemd-analyze", "verify", *map(str, units)], capture_output=True, text=True,
                            timeout=600)
    output = (result.stdout + result.stderr).strip()
    return None if result.returncode == 0 and not output else f"exit {result.returncode}: {output}"


def check_fidelity(values: dict, spec: AppSpec) -> None:
    """The spec holds what the command line said (normalised where systemd wants it so)."""
    v = values
    assert spec.app == v["--app"]
    assert spec.name == v.get("--name", v["--app"].split(":")[0].split(".")[0])
    cores = v.get("--cores", "auto")
    assert spec.instances == (max(1, usable_cpus()) if cores == "auto" else int(cores))
    assert [_address(a) for a in spec.listen] == [_address(a) for a in v.get("--listen", ["127.0.0.1:8000"])]
    assert spec.workdir == v.get("--workdir", os.getcwd())
    assert spec.python == v.get("--python", sys.executable)
    assert spec.env == tuple(tuple(item.partition("=")[::2]) for item in v.get("--env", []))
    assert spec.user == v.get("--user")
    assert spec.interface == v.get("--interface", "auto")
    assert spec.watchdog == int(v.get("--watchdog", "10"))
    assert spec.drain_timeout == int(v.get("--drain-timeout", "30"))
    assert spec.threads == int(v.get("--threads", "10"))
    assert spec.max_concurrency == int(v.get("--max-concurrency", "0"))
    assert spec.request_timeout == int(v.get("--request-timeout", "30"))
    assert spec.max_requests == int(v.get("--max-requests", "0"))
    assert spec.max_requests_jitter == int(v.get("--max-requests-jitter", "0"))
    assert spec.memory_max == _bytes(v.get("--memory-max", "0"))
    assert spec.on_failure == v.get("--on-failure")
    assert spec.writable == tuple(v.get("--writable", []))
    assert spec.hardening == v.get("--hardening", "strict")
    assert [_network(c) for c in spec.allow] == [_network(c) for c in v.get("--allow", [])]
    assert [_network(c) for c in spec.deny] == [_network(c) for c in v.get("--deny", [])]
    assert spec.helper_python == v.get("--helper-python", sys.executable)
    assert spec.helper_script == v.get("--helper-script", DEFAULT_HELPER_SCRIPT)
    assert spec.manager == v.get("--manager", "system")
    assert (_address(spec.metrics_listen) if spec.metrics_listen else None) == (
        _address(v["--metrics-listen"]) if "--metrics-listen" in v else None)


def _bytes(size: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(size.rstrip("KMGT")) * units[size[-1] if size[-1] in units else ""]


def _address(text: str):
    if text.startswith("/"):
        return text
    host, _, port = text.rpartition(":")
    return (ipaddress.ip_address(host.strip("[]")) if host else None), int(port)


def _network(text: str):
    return text if text in ("any", "localhost", "link-local", "multicast") else ipaddress.ip_network(text, strict=False)


def _settings(test):
    test = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=SEED == "fixed",
                    print_blob=False, suppress_health_check=list(HealthCheck))(test)
    return seed(int(SEED))(test) if SEED.isdigit() else test


@pytest.mark.parametrize("flag", sorted(FUZZ))
def test_hostile_values_of_each_option_are_refused_or_render_clean_units(flag):
    run = Run(flag)
    try:
        @_settings
        @given(values=command_lines(flag))
        @example(values=EXPLICIT[flag])
        def examples(values):
            run.example(values)

        try:
            examples()
        except BaseException:
            run.report(" (stopped by the failure below; hypothesis counts its shrinking too)")
            raise
        run.finish()
        assert not run.failures, f"systemd-analyze verify complains ({len(run.failures)}):\n" + "\n".join(
            run.failures[:10])
        assert run.count["verified"] == run.count["rendered"]
        assert run.count["examples"] >= EXAMPLES
    finally:
        shutil.rmtree(run.scratch, ignore_errors=True)
