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
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, event, example, given, note, seed, settings
from hypothesis import strategies as st

from unitgen import __version__
from unitgen.cli import build_parser
from unitgen.cores import usable_cpus
from unitgen.errors import Die
from unitgen.render import check_files, format_bundle, parse_bundle, render_files
from unitgen.spec import HARDENING, INTERFACES, RESERVED_NAMES, ROOT_UNSAFE_ENV, AppSpec
from unitgen_worker import alert
from unitgen_worker.contract import SPEC_SUFFIX, WorkerConfig

EXAMPLES = int(os.environ.get("UNITGEN_PROPERTY_EXAMPLES", "80"))
SEED = os.environ.get("UNITGEN_PROPERTY_SEED", "fixed")
BATCH = 40  # examples per systemd-analyze verify call
INSTANCE = "7"  # the instance whose command lines the reader below works out
PARSER = build_parser()
DEFAULT_HELPER_SCRIPT = str(Path(alert.__file__).resolve())

# --- systemd's reading of a unit file (systemd 252: conf-parser, extract_first_word,
# cunescape, specifier_printf, replace_env) ------------------------------------------
WHITESPACE = " \t\n\r"
_C_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
              "\\": "\\", '"': '"', "'": "'", "s": " "}


class Unreadable(AssertionError):
    """systemd would refuse this value, or read it as something other than one value."""


def _cunescape_one(text: str, i: int) -> tuple[str, int]:
    """The character after a backslash at text[i], as cunescape_one() reads it."""
    ch = text[i]
    if ch in _C_ESCAPES:
        return _C_ESCAPES[ch], i + 1
    width = {"x": 2, "u": 4, "U": 8}.get(ch)
    digits, base, start = (text[i + 1:i + 1 + width], 16, i + 1) if width else (text[i:i + 3], 8, i)
    valid = "0123456789abcdefABCDEF" if width else "01234567"
    if width is None and ch not in valid:
        raise Unreadable(f"unknown escape \\{ch} in {text!r}")
    if len(digits) != (width or 3) or any(d not in valid for d in digits) or int(digits, base) == 0:
        raise Unreadable(f"bad escape in {text!r}")
    code = int(digits, base)
    if width == 2 and code >= 0x80:  # a raw byte: not a character we would ever write
        raise Unreadable(f"byte escape in {text!r}")
    return chr(code), start + len(digits)


def words(text: str, *, unquote: bool, cunescape: bool, exec_line: bool = False) -> list[str]:
    """extract_first_word() in a loop, separators WHITESPACE."""
    out: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in WHITESPACE:
            i += 1
        if i >= n:
            return out
        # ExecStart=: a lone ";" (or "\;") between words separates two commands.
        if exec_line and out and re.match(r"\\?;(?:[ \t\n\r]|$)", text[i:]):
            raise Unreadable(f"command separator in {text!r}")
        word: list[str] = []
        quote = None
        while i < n:
            ch = text[i]
            if ch == "\\":
                if i + 1 >= n:
                    raise Unreadable(f"trailing backslash in {text!r}")
                if cunescape:
                    decoded, i = _cunescape_one(text, i + 1)
                    word.append(decoded)
                else:
                    word.append(text[i + 1])
                    i += 2
                continue
            if quote:
                if ch == quote:
                    quote = None
                else:
                    word.append(ch)
            elif unquote and ch in "'\"":
                quote = ch
            elif ch in WHITESPACE:
                break
            else:
                word.append(ch)
            i += 1
        if quote:
            raise Unreadable(f"unterminated quote in {text!r}")
        out.append("".join(word))


def specifiers(text: str, table: dict[str, str]) -> str:
    """specifier_printf(): %% is %, %X from the table, a stray % at the end stays."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "%" and i + 1 < len(text):
            key = text[i + 1]
            if key == "%":
                out.append("%")
            elif key in table:
                out.append(table[key])
            else:
                raise Unreadable(f"specifier %{key} in {text!r}")
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def dollars(text: str) -> str:
    """Exec-time variable expansion of an argument: $$ is $; nothing else may use $."""
    if re.search(r"\$(?!\$)", text.replace("$$", "")):
        raise Unreadable(f"variable reference in {text!r}")
    return text.replace("$$", "$")


def systemd_clean(ch: str) -> bool:
    """systemd's utf8_is_valid() and no control character but the line break."""
    code = ord(ch)
    return (ch == "\n" or unicodedata.category(ch) not in ("Cc", "Cs")) and not (
        0xFDD0 <= code <= 0xFDEF or code & 0xFFFE == 0xFFFE)


def read_unit(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) of every directive, in order, as config_parse() reads them."""
    bad = sorted({ch for ch in text if not systemd_clean(ch)})
    assert not bad, f"characters systemd refuses: {bad!r}"
    assert text.endswith("\n")
    entries: list[tuple[str, str, str]] = []
    section = None
    for line in text[:-1].split("\n"):
        # No continuation, no indented line that systemd would read as a directive.
        assert not line.endswith("\\"), f"continuation: {line!r}"
        assert not line[:1].isspace(), f"indented line: {line!r}"
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            assert re.fullmatch(r"\[[A-Za-z]+\]", line), line
            section = line[1:-1]
            continue
        match = re.fullmatch(r"([A-Za-z][A-Za-z0-9]*)=(.*)", line)
        assert match and section, f"not a directive: {line!r}"
        entries.append((section, match[1], match[2].strip(WHITESPACE)))
    return entries


# --- decoders: one per way systemd reads a key ---------------------------------------
def instance_table(name: str) -> dict[str, str]:
    return {"i": INSTANCE, "n": f"{name}@{INSTANCE}.service", "N": f"{name}@{INSTANCE}", "p": name}


def raw(value: str, table: dict[str, str]) -> str:
    return value


def rest_of_line(value: str, table: dict[str, str]) -> str:
    """WorkingDirectory=, ListenStream=, User=: the whole value, specifiers resolved."""
    return specifiers(value, table)


def env_words(value: str, table: dict[str, str]) -> list[str]:
    """Environment=: unquoted, C escapes, specifiers; no $ expansion."""
    return [specifiers(w, table) for w in words(value, unquote=True, cunescape=True)]


def path_words(value: str, table: dict[str, str]) -> list[str]:
    """ReadWritePaths=: unquoted, a backslash takes the next character as it is, specifiers."""
    return [specifiers(w, table) for w in words(value, unquote=True, cunescape=False)]


def plain_words(value: str, table: dict[str, str]) -> list[str]:
    """IPAddressAllow=/IPAddressDeny=: split on white space, no quotes, no specifiers."""
    return words(value, unquote=False, cunescape=False)


def unit_words(value: str, table: dict[str, str]) -> list[str]:
    """OnFailure=: unit names split on white space, specifiers resolved."""
    return [specifiers(w, table) for w in value.split()]


def command(value: str, table: dict[str, str]) -> tuple[str, str, list[str]]:
    """ExecStart= and friends: (prefix flags, program path, arguments) as instance INSTANCE runs it.

    The program path gets C escapes and specifiers but no $ expansion (systemd execs
    ExecCommand.path as it is); the arguments get $$ -> $ at exec time too.
    """
    first, *args = words(value, unquote=True, cunescape=True, exec_line=True)
    path = first.lstrip("-@:+!")
    prefix = first[:len(first) - len(path)]
    return prefix, specifiers(path, table), [dollars(specifiers(a, table)) for a in args]


def worker_command(value: str, table: dict[str, str]) -> tuple[str, str, list[str], WorkerConfig]:
    """ExecStart=: what the worker runtime parses out of its command line."""
    prefix, path, args = command(value, table)
    try:
        config = WorkerConfig.from_argv(args[2:])
    except SystemExit as err:
        raise Unreadable(f"the worker refuses its arguments {args!r}") from err
    return prefix, path, args[:2], config


# --- what each unit must hold ---------------------------------------------------------
def _under_home(path: str) -> bool:
    return any(path == home or path.startswith(home + "/") for home in ("/home", "/root", "/run/user"))


def dynamic_user(name: str) -> str:
    candidate = f"unitgen-{name}"
    if len(candidate) <= 31 and re.fullmatch(r"[a-z_][a-z0-9_-]*", candidate):
        return candidate
    return "unitgen-" + hashlib.sha256(name.encode()).hexdigest()[:16]


def expected_units(spec: AppSpec) -> dict[str, list[tuple]]:
    """Every directive of each unit: (section, key, decoder, value after decoding)."""
    name, table = spec.name, instance_table(spec.name)
    me = f"{name}@{INSTANCE}.service"
    on_failure = specifiers(spec.on_failure, table) if spec.on_failure else None
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
        *([("Service", "User", rest_of_line, spec.user)] if spec.user else
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
                       rebalance=spec.rebalance))),
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
        *([("Service", "WatchdogSec", raw, str(spec.watchdog))] if spec.watchdog else []),
        ("Service", "TimeoutStartSec", raw, "122"),
        ("Service", "TimeoutStopSec", raw, str(spec.drain_timeout + 15)),
        ("Service", "KillMode", raw, "mixed"),
        *[("Service", key, raw, value) for key, value in [
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
        ]],
        *[("Service", "ReadWritePaths", path_words, [path]) for path in spec.writable],
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
        ("Install", "WantedBy", raw, "multi-user.target"),
    ]
    return {f"{name}.socket": socket, f"{name}@.service": service, f"{name}.target": target}


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


# --- the command lines ---------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InScratch:
    """A path below this example's scratch directory (programs there are made to exist)."""

    relative: str


def mix(*structured):
    """Arbitrary text a third of the time, else values shaped like the option's."""
    return st.one_of(ANY, *structured, *structured)


# Characters that unit files, shells and the parsers here care about.
HOSTILE = [*"ab09:/.%$\\\"' \t\n\r\v\f=[]{}@-_;#~*é", "\x00", "\x1b", "\x7f", "\x85", "\xa0", "\u2028", "\u2029",
           "\ufeff", "\u202e", "\ufdd0", "\uffff", "\U0010fffe", "\udcff"]
PRINTABLE_HOSTILE = [ch for ch in HOSTILE if unicodedata.category(ch) not in ("Cc", "Cs", "Zl", "Zp")]
ANY = st.one_of(st.text(max_size=40), st.text(st.sampled_from(HOSTILE), max_size=40))
# Text that check_text lets through (noncharacters included: systemd refuses those).
SPECIAL = st.text(st.sampled_from([*"%$\\\"' #;", "\ufffe"]), min_size=1, max_size=6)  # what quoting is for
TEXT = st.one_of(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=30),
                 st.text(st.sampled_from(PRINTABLE_HOSTILE), min_size=1, max_size=30), SPECIAL)
# Around NAME_MAX (255 bytes) and sun_path (107).
LONG = st.builds(lambda ch, n: ch * n, st.sampled_from(["a", "é", "%", '"', "€"]), st.integers(50, 300))
COMPONENT = st.one_of(TEXT, TEXT, LONG, st.sampled_from([".", "..", "", " ", "-", "~"]))
HOSTILE_PATH = st.lists(COMPONENT, max_size=4).map(lambda parts: "/" + "/".join(parts))

# Valid values: what a careful user could pass, with the characters quoting must handle.
SAFE_CHARS = [*"ab09%$\\\"' =[]{}@-_;#:,.é~*?!&|<>()`^", "\xa0", "\ufeff", "\u202e"]
SAFE_TEXT = st.one_of(
    st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cn")), min_size=1, max_size=16),
    st.text(st.sampled_from(SAFE_CHARS), min_size=1, max_size=16),
    st.text(st.sampled_from([*"%$\\\"' #;"]), min_size=1, max_size=6),
)
SAFE_COMPONENT = SAFE_TEXT.map(lambda t: t.replace("/", "_").replace("\\", "_").strip() or "x").filter(
    lambda c: c not in (".", ".."))
SAFE_PATH = st.lists(SAFE_COMPONENT, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))
SAFE_UNIX = SAFE_PATH.map(lambda p: "/run" + p).filter(lambda p: len(p.encode()) <= 107)
# systemd execs no program whose path has a quote (--python refuses them); a $ is
# left to the runs that fuzz --python and --helper-python.
SAFE_PROGRAM = st.lists(SAFE_COMPONENT.map(lambda c: re.sub("[\"'$]", "_", c)), min_size=1, max_size=2).map("/".join)
ENV_KEY = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(
    lambda k: not k.startswith("LD_") and k not in ROOT_UNSAFE_ENV and k != "TZ")
ENV = st.tuples(ENV_KEY, st.one_of(st.just(""), SAFE_TEXT)).map("=".join)
CIDR = st.one_of(
    st.sampled_from(["any", "localhost", "link-local", "multicast"]),
    st.ip_addresses().map(str),
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)).map(lambda t: f"{t[0]}/{t[1]}"),
)
LISTEN = st.one_of(
    st.integers(1, 65535).map(str),
    st.tuples(st.ip_addresses(v=4), st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.integers(1, 65535)).map(lambda t: f"[{t[0]}]:{t[1]}"),
    SAFE_UNIX,
)
APP = st.from_regex(r"[a-z_][a-z0-9_]{0,7}(\.[a-z_][a-z0-9_]{0,5})?:[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True)
VALID = {
    "--app": APP,
    "--name": st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,30}", fullmatch=True).filter(
        lambda n: ".." not in n and not n.endswith(".") and n not in RESERVED_NAMES and not n.startswith("systemd-")),
    "--cores": st.one_of(st.integers(1, 4).map(str), st.just("auto")),
    "--listen": st.lists(LISTEN, min_size=1, max_size=3, unique=True),
    "--workdir": SAFE_PATH,
    "--python": SAFE_PROGRAM.map(lambda p: InScratch("py/" + p)),
    "--env": st.lists(ENV, max_size=3),
    "--user": st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_-]{0,30}", fullmatch=True),
                        st.integers(0, 60000).map(str)),
    "--interface": st.sampled_from(INTERFACES),
    "--watchdog": st.integers(0, 3600).map(str),
    "--drain-timeout": st.integers(1, 3600).map(str),
    "--threads": st.integers(1, 1024).map(str),
    "--max-concurrency": st.integers(0, 1_000_000).map(str),
    "--request-timeout": st.integers(0, 3600).map(str),
    "--on-failure": st.from_regex(r"[a-z0-9_][a-z0-9_.:-]{0,9}(%[nNip])?(@[a-z0-9_.:-]{0,6}%[nNip])?\.(service|target)",
                                  fullmatch=True),
    "--writable": st.lists(SAFE_PATH, max_size=3),
    "--hardening": st.sampled_from(HARDENING),
    "--allow": st.lists(CIDR, max_size=3),
    "--deny": st.lists(CIDR, max_size=3),
    "--helper-python": SAFE_PROGRAM.map(lambda p: InScratch("helper/" + p)),
    "--helper-script": SAFE_PATH.map(lambda p: re.sub("[\"']", "_", p)),  # a program's path, too
}
REPEATABLE = {"--listen", "--env", "--writable", "--allow", "--deny"}

# Hostile values: arbitrary text, and text shaped like the option's values.
_NUMBER = st.one_of(st.integers(-5, 4000).map(str),
                    st.sampled_from(["0", "00", "0010", "3600", "3601", "1e3", " 5", "5 ", "\u0665", "+5", "1_0"]))
# Below the example's directory, where a program can be put for verify to find.
_PROGRAM = st.one_of(st.lists(COMPONENT, min_size=1, max_size=3).map("/".join),
                     st.lists(st.one_of(SAFE_COMPONENT, TEXT), min_size=1, max_size=3).map("/".join))
_CIDR = st.one_of(
    st.ip_addresses().map(str),
    st.tuples(st.ip_addresses(), st.integers(-1, 140)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=4), st.ip_addresses(v=4)).map(lambda t: f"{t[0]}/{t[1]}"),
    st.tuples(st.ip_addresses(v=6), TEXT, st.sampled_from(["", "/64", "/128"])).map(
        lambda t: f"{t[0]}%{t[1]}{t[2]}"),
    st.sampled_from(["any", "ANY", "localhost", "link-local", "multicast", "any ", "1.2.3.4 5.6.7.8",
                     "10.0.0.0/8 any", "::ffff:1.2.3.4", "1.2.3.4/", "/8", "0/0", "1.2.3.4/08", "01.2.3.4"]),
)
_HOST = st.one_of(st.ip_addresses(v=4).map(str),
                  st.sampled_from(["localhost", "1.2.3", "01.2.3.4", "1.2.3.4 ", "::1", "[::1", "*", "", "[]"]))
_LISTEN = st.one_of(
    st.integers(-1, 70000).map(str),
    st.tuples(_HOST, st.integers(-1, 70000)).map(lambda t: f"{t[0]}:{t[1]}"),
    st.tuples(st.ip_addresses(v=6), st.one_of(st.just(""), TEXT.map(lambda s: "%" + s)), st.integers(0, 70000)).map(
        lambda t: f"[{t[0]}{t[1]}]:{t[2]}"),
    HOSTILE_PATH,
)
_ENV = st.one_of(
    st.tuples(ENV_KEY, st.one_of(TEXT, LONG, st.just(""))).map("=".join),
    st.tuples(st.one_of(TEXT, st.sampled_from(["LD_PRELOAD", "TZ", "TMPDIR", "ld_x", "A-B", "1A", ""])),
              st.one_of(TEXT, ANY)).map("=".join),
    st.sampled_from(["LD_PRELOAD=/x.so", "LD_LIBRARY_PATH=", "GCONV_PATH=/x", "TZ=/etc/localtime", "TZ=:/x",
                     "TZ=../x", "TZ=Europe/Paris", "TZ=:Europe/Paris", "=x", "A", "A=b=c"]),
)
# What a command line can carry: no NUL, surrogates only as the undecodable bytes of a name.
ARGV_TEXT = st.text(st.one_of(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                              st.sampled_from(["\udc80", "\udcff"])), max_size=30)
FUZZ = {
    "--app": mix(st.tuples(st.one_of(APP.map(lambda a: a.split(":")[0]), TEXT),
                           st.one_of(APP.map(lambda a: a.split(":")[1]), TEXT)).map(":".join),
                 APP, APP, st.from_regex(r"[A-Za-z0-9_.:%$ -]{1,20}", fullmatch=True)),
    "--name": mix(TEXT, st.from_regex(r"[A-Za-z0-9_.@%:\\ -]{1,70}", fullmatch=True),
                  st.sampled_from([*sorted(RESERVED_NAMES), ".", "..", "a..b", "a.", "-a", "systemd-x", "a/b",
                                   "a@b", "x" * 64, "x" * 65, "Postgres", "a.service", "a-", "_"]),
                  VALID["--name"]),
    "--cores": mix(st.integers(-2, 70).map(str),
                   st.sampled_from(["auto", "AUTO", "0", "01", "1023", "1024", "1025", "1e2", " 2", "\u0663"])),
    "--listen": st.lists(mix(_LISTEN, LISTEN), min_size=1, max_size=3),
    "--workdir": mix(HOSTILE_PATH, SAFE_PATH),
    "--python": mix(_PROGRAM.map(lambda r: InScratch("py/" + r))),
    "--env": st.lists(mix(_ENV, ENV), min_size=1, max_size=3),
    "--user": mix(st.from_regex(r"[A-Za-z0-9_.$%@:-]{1,34}", fullmatch=True),
                  st.integers(0, 2**33).map(str),
                  st.sampled_from(["65535", "4294967295", "4294967294", "0065535", "00", "0", "-1", "+1",
                                   "root", "nobody", "a" * 31, "a" * 32, "1a", "a.b", "a-", "_"])),
    "--interface": mix(st.sampled_from(INTERFACES), st.sampled_from(INTERFACES),
                       st.sampled_from(["ASGI", " wsgi", "wsgi ", "auto\n"])),
    "--watchdog": mix(_NUMBER),
    "--drain-timeout": mix(_NUMBER),
    "--threads": mix(_NUMBER, st.sampled_from(["1024", "1025", "0"])),
    "--max-concurrency": mix(_NUMBER, st.sampled_from(["1000000", "1000001", "99999999"])),
    "--request-timeout": mix(_NUMBER),
    "--on-failure": mix(
        st.from_regex(r"(?:[A-Za-z0-9_.:@$ \\-]|%[nNipPIjxh%]?){1,20}\.(?:service|target|socket|timer)",
                      fullmatch=True),
        # Names that resolve to one of the app's own units, or to more than 255 characters.
        st.builds(lambda head, spec, k, suffix: head + spec * k + suffix, st.sampled_from(["", "x", "x@"]),
                  st.sampled_from(["%n", "%N", "%i", "%p", "a%n"]), st.integers(1, 90),
                  st.sampled_from([".service", ".target", "@x.service"])),
        LONG.map(lambda s: s.replace("%", "a") + ".service"),
    ),
    "--writable": st.lists(mix(HOSTILE_PATH, SAFE_PATH), min_size=1, max_size=3),
    "--hardening": mix(st.sampled_from(HARDENING), st.sampled_from(["Strict", " relaxed", "none", "strict\n"])),
    "--allow": st.lists(mix(_CIDR, CIDR), min_size=1, max_size=3),
    "--deny": st.lists(mix(_CIDR, CIDR), min_size=1, max_size=3),
    "--helper-python": mix(_PROGRAM.map(lambda r: InScratch("helper/" + r))),
    "--helper-script": mix(HOSTILE_PATH, SAFE_PATH),
    # Below this example's directory.
    "--out": st.one_of(
        ARGV_TEXT,
        st.lists(st.one_of(COMPONENT.filter(lambda c: "\x00" not in c), st.just("..")), max_size=4).map("/".join),
    ).map(lambda r: InScratch("out/" + r)),
}

# --spec FILE: a saved spec with one field hostile (any JSON, or what the option refuses
# or takes), or no spec at all.
_FIELDS = {
    "name": "--name", "app": "--app", "instances": "--cores", "listen": "--listen", "workdir": "--workdir",
    "python": "--python", "env": "--env", "user": "--user", "interface": "--interface", "watchdog": "--watchdog",
    "drain_timeout": "--drain-timeout", "on_failure": "--on-failure", "writable": "--writable",
    "hardening": "--hardening", "allow": "--allow", "deny": "--deny", "helper_python": "--helper-python",
    "helper_script": "--helper-script", "threads": "--threads", "max_concurrency": "--max-concurrency",
    "request_timeout": "--request-timeout",
}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | ANY,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY, inner, max_size=3), max_leaves=6)


def _json_field(field: str, value):
    """An option's value as the saved spec holds it."""
    if field in ("instances", "watchdog", "drain_timeout", "threads", "max_concurrency", "request_timeout"):
        return int(value) if re.fullmatch(r"[0-9]{1,8}", value) else value
    if field == "env":
        return [list(item.partition("=")[::2]) for item in value]
    return value


@st.composite
def spec_files(draw):
    spec = {field: _json_field(field, draw(VALID[flag])) for field, flag in _FIELDS.items() if flag != "--cores"}
    spec.update(schema=1, instances=draw(st.integers(1, 4)), user=draw(st.none() | VALID["--user"]),
                on_failure=draw(st.none() | VALID["--on-failure"]),
                rebalance=draw(st.booleans() | JSON) if draw(st.integers(0, 9)) == 0 else draw(st.booleans()))
    field = draw(st.sampled_from(sorted(_FIELDS)))
    how = draw(st.sampled_from(["option", "valid", "option", "json", "option", "drop", "extra", "schema", "text"]))
    if how == "valid":
        pass
    elif how == "option":
        spec[field] = _json_field(field, draw(FUZZ[_FIELDS[field]]))
    elif how == "json":
        spec[field] = draw(JSON)
    elif how == "drop":
        del spec[field]
    elif how == "extra":
        spec[draw(ANY)] = draw(JSON)
    elif how == "schema":
        spec["schema"] = draw(JSON)
    else:
        return draw(ANY)
    return spec


@dataclasses.dataclass(frozen=True)
class SpecFile:
    """--spec names a file of this example holding this (JSON, or any text)."""

    content: object


# Or --spec names a file that may not be there ('-', standard input, is left out).
FUZZ["--spec"] = st.one_of(spec_files().map(SpecFile), spec_files().map(SpecFile),
                           ARGV_TEXT.filter(lambda p: p != "-"))
# Every value option of `render`; --no-check and --debug take no value.
RENDER_OPTIONS = sorted(a.option_strings[0] for a in PARSER._subparsers._group_actions[0].choices["render"]._actions
                        if a.option_strings and a.nargs != 0 and a.option_strings[0] != "--help")


# One explicit example per run: every option at once, each value full of what quoting
# is for (the CI run's fixed seed may draw few of these characters).
SINK = {
    "--app": "shop.web:application",
    "--name": "shop-api_2.x",
    "--cores": "3",
    "--listen": ["8080", "[::1]:8081", "/run/50% \"off\" $x #1;'é'.sock"],
    "--workdir": "/srv/50% off $HOME \"q\" 'q' #;=[]{}\xa0é",
    "--python": InScratch("py/50% #;=[]{}\xa0é/python"),
    "--env": ["GREETING=50% \"off\" $HOME ${X} \\ 'q' #; \\n", "EMPTY=", "PCT=%n%%"],
    "--user": "www-data",
    "--interface": "wsgi",
    "--watchdog": "0",
    "--drain-timeout": "3600",
    "--threads": "1024",
    "--max-concurrency": "1000000",
    "--request-timeout": "0",
    "--on-failure": "alert@%n.service",
    "--writable": ["/srv/50% off/$x \"q\" 'q'", "/var/lib/a b#c;d"],
    "--hardening": "relaxed",
    "--allow": ["10.0.0.0/8", "::1", "localhost"],
    "--deny": ["any"],
    "--helper-python": InScratch("helper/50% #;é/python3"),
    "--helper-script": "/usr/lib/50% $x #;=[]{}é/alert.py",
}
EXPLICIT = {flag: {flag: SINK.get(flag), **SINK} for flag in FUZZ}
EXPLICIT["--out"] = {"--out": InScratch("out/50% \"q\" #;:é x"), **SINK}
EXPLICIT["--spec"] = {"--spec": SpecFile({"schema": 1, **{f: _json_field(f, SINK[o]) for f, o in _FIELDS.items()}})}


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
                                        f"{spec.name}{SPEC_SUFFIX}"])
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
    assert spec.on_failure == v.get("--on-failure")
    assert spec.writable == tuple(v.get("--writable", []))
    assert spec.hardening == v.get("--hardening", "strict")
    assert [_network(c) for c in spec.allow] == [_network(c) for c in v.get("--allow", [])]
    assert [_network(c) for c in spec.deny] == [_network(c) for c in v.get("--deny", [])]
    assert spec.helper_python == v.get("--helper-python", sys.executable)
    assert spec.helper_script == v.get("--helper-script", DEFAULT_HELPER_SCRIPT)


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
