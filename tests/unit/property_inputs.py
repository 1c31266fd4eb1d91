"""What the property tests feed `unitgen render`: valid values of every option, hostile
ones (arbitrary text, and text shaped like the option's), saved spec files with one field
hostile, and one explicit example full of what quoting is for.
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata

from hypothesis import strategies as st

from unitgen.cli import build_parser
from unitgen.manager import MANAGERS
from unitgen.spec import HARDENING, INTERFACES, RESERVED_NAMES, ROOT_UNSAFE_ENV

PARSER = build_parser()

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
    "--max-requests": st.integers(0, 1_000_000_000).map(str),
    "--max-requests-jitter": st.just("0"),  # only with --max-requests (refused alone)
    "--memory-max": st.one_of(st.just("0"), st.integers(64, 4096).map(lambda m: f"{m}M"),
                              st.integers(1, 1024).map(lambda g: f"{g}G"), st.integers(1 << 26, 1 << 40).map(str)),
    "--on-failure": st.from_regex(r"[a-z0-9_][a-z0-9_.:-]{0,9}(%[nNip])?(@[a-z0-9_.:-]{0,6}%[nNip])?\.(service|target)",
                                  fullmatch=True),
    "--writable": st.lists(SAFE_PATH, max_size=3),
    "--hardening": st.sampled_from(HARDENING),
    "--manager": st.sampled_from(MANAGERS),
    "--allow": st.lists(CIDR, max_size=3),
    "--deny": st.lists(CIDR, max_size=3),
    "--helper-python": SAFE_PROGRAM.map(lambda p: InScratch("helper/" + p)),
    "--helper-script": SAFE_PATH.map(lambda p: re.sub("[\"']", "_", p)),  # a program's path, too
    "--metrics-listen": LISTEN,  # one of --listen's is refused (the rare clash)
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
    "--metrics-listen": mix(_LISTEN, LISTEN, st.sampled_from(["8000", "127.0.0.1:8000", "0.0.0.0:8000", "[::]:8000"])),
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
    "--max-requests": mix(_NUMBER, st.sampled_from(["1000000000", "1000000001", "99999999999"])),
    "--max-requests-jitter": mix(_NUMBER, st.sampled_from(["1", "1000000000", "1000000001"])),
    "--memory-max": mix(_NUMBER, st.sampled_from(["63M", "64M", "1P", "1024T", "1025T", "512m", "512MB", "1.5G",
                                                  " 512M", "512M\n", "-1", "0M", "67108863"])),
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
    "--manager": mix(st.sampled_from(MANAGERS), st.sampled_from(["User", " user", "system\n", "root", ""])),
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
    "request_timeout": "--request-timeout", "max_requests": "--max-requests",
    "max_requests_jitter": "--max-requests-jitter", "memory_max": "--memory-max", "manager": "--manager",
    "metrics_listen": "--metrics-listen",
}
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | ANY,
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY, inner, max_size=3), max_leaves=6)


def _json_field(field: str, value):
    """An option's value as the saved spec holds it."""
    if field in ("instances", "watchdog", "drain_timeout", "threads", "max_concurrency", "request_timeout",
                 "max_requests", "max_requests_jitter"):
        return int(value) if re.fullmatch(r"[0-9]{1,8}", value) else value
    if field == "memory_max":  # bytes in the saved spec
        match = re.fullmatch(r"([0-9]{1,16})([KMGT]?)", value)
        return int(match.group(1)) << (10 * " KMGT".index(match.group(2) or " ")) if match else value
    if field == "env":
        return [list(item.partition("=")[::2]) for item in value]
    return value


@st.composite
def spec_files(draw):
    spec = {field: _json_field(field, draw(VALID[flag])) for field, flag in _FIELDS.items() if flag != "--cores"}
    spec.update(schema=1, instances=draw(st.integers(1, 4)), user=draw(st.none() | VALID["--user"]),
                on_failure=draw(st.none() | VALID["--on-failure"]),

                rebalance=draw(st.booleans() | JSON) if draw(st.integers(0, 9)) == 0 else draw(st.booleans()))
    # The exporter needs the app's --user: metrics only beside one.
    spec["metrics_listen"] = draw(st.none() | VALID["--metrics-listen"]) if spec["user"] is not None else None
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
    "--max-requests": "1000000000",
    "--max-requests-jitter": "1000000000",
    "--memory-max": "1024T",
    "--on-failure": "alert@%n.service",
    "--writable": ["/srv/50% off/$x \"q\" 'q'", "/var/lib/a b#c;d"],
    "--hardening": "relaxed",
    "--manager": "system",  # "user" refuses --user, --on-failure, --allow and --deny above
    "--allow": ["10.0.0.0/8", "::1", "localhost"],
    "--deny": ["any"],
    "--helper-python": InScratch("helper/50% #;é/python3"),
    "--helper-script": "/usr/lib/50% $x #;=[]{}é/alert.py",
    "--metrics-listen": "[::1]:9100",
}
EXPLICIT = {flag: {flag: SINK.get(flag), **SINK} for flag in FUZZ}
EXPLICIT["--out"] = {"--out": InScratch("out/50% \"q\" #;:é x"), **SINK}
EXPLICIT["--spec"] = {"--spec": SpecFile({"schema": 1, **{f: _json_field(f, SINK[o]) for f, o in _FIELDS.items()}})}
