"""render's options from a file in the app's directory: `unitgen.toml`, or the
`[tool.unitgen]` table of its `pyproject.toml`.

A deploy is then reproducible from the repository, as with gunicorn.conf.py or PM2's
ecosystem file. The file only supplies values: each becomes what the command line would
have given (a string, a list of strings, a flag), and spec.py's parsers check it exactly
as they check a flag. Options given on the command line win over the file; a repeatable
option given there replaces the file's whole list.

Which file: `unitgen.toml` first; `pyproject.toml` when it has a `[tool.unitgen]` table.
Both at once is refused: whoever edits one would not know the other is read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from unitgen.errors import Die, die

UNITGEN_TOML = "unitgen.toml"
PYPROJECT_TOML = "pyproject.toml"


class Kind(NamedTuple):
    """What a key's value may be in TOML: what a message calls it, and an example. The
    value then becomes what the command line would give the parsers."""

    what: str
    example: str


TEXT = Kind("a string", 'app = "myapp:app"')
NUMBER = Kind("a whole number or a string", 'max-requests = 5000, cores = "auto"')
PATH = Kind("a path (a string)", 'python = ".venv/bin/python", relative to the file\'s directory')
LIST = Kind("a string or a list of strings", 'listen = ["8080", "/run/myapp.sock"]')
PATHS = Kind("a path or a list of paths", 'writable = ["/var/lib/myapp"]')
ENV = Kind("a table or a list of strings", 'env = {KEY = "value"} or env = ["KEY=value"]')
FLAG = Kind("true or false", "no-rebalance = true")


@dataclass(frozen=True)
class Key:
    """A key of the file: the render option it stands for."""

    kind: Kind
    dest: str  # the option's attribute in argparse's namespace
    flag: str  # the option itself, as spec.py's messages begin


# Render's long options without their dashes. A flag's key says the flag is given
# (no-rebalance = true is --no-rebalance).
KEYS = {
    "app": Key(TEXT, "app", "--app"),
    "name": Key(TEXT, "name", "--name"),
    "cores": Key(NUMBER, "cores", "--cores"),
    "listen": Key(LIST, "listen", "--listen"),
    "workdir": Key(PATH, "workdir", "--workdir"),
    "python": Key(PATH, "python", "--python"),
    "env": Key(ENV, "env", "--env"),
    "user": Key(TEXT, "user", "--user"),
    "interface": Key(TEXT, "interface", "--interface"),
    "watchdog": Key(NUMBER, "watchdog", "--watchdog"),
    "drain-timeout": Key(NUMBER, "drain_timeout", "--drain-timeout"),
    "threads": Key(NUMBER, "threads", "--threads"),
    "max-concurrency": Key(NUMBER, "max_concurrency", "--max-concurrency"),
    "request-timeout": Key(NUMBER, "request_timeout", "--request-timeout"),
    "no-rebalance": Key(FLAG, "rebalance", "--no-rebalance"),
    "max-requests": Key(NUMBER, "max_requests", "--max-requests"),
    "max-requests-jitter": Key(NUMBER, "max_requests_jitter", "--max-requests-jitter"),
    "memory-max": Key(NUMBER, "memory_max", "--memory-max"),
    "on-failure": Key(TEXT, "on_failure", "--on-failure"),
    "writable": Key(PATHS, "writable", "--writable"),
    "hardening": Key(TEXT, "hardening", "--hardening"),
    "manager": Key(TEXT, "manager", "--manager"),
    "allow": Key(LIST, "allow", "--allow"),
    "deny": Key(LIST, "deny", "--deny"),
    "metrics-listen": Key(TEXT, "metrics_listen", "--metrics-listen"),
    "helper-python": Key(PATH, "helper_python", "--helper-python"),
    "helper-script": Key(PATH, "helper_script", "--helper-script"),
}
# Options that say what this run does, not what the app is.
COMMAND_LINE_ONLY = ("spec", "out", "no-check", "debug")


@dataclass(frozen=True)
class ConfigFile:
    """The options a file gives, as the command line would give them."""

    path: Path
    table: str  # "[tool.unitgen] " in a pyproject.toml, "" in a unitgen.toml
    options: dict[str, Any]  # argparse dest -> a string, a list of strings or a bool
    written: dict[str, str]  # argparse dest -> the key as the file spells it

    def where(self, key: str) -> str:
        """How a message names a key: `pyproject.toml [tool.unitgen] cores`."""
        return f"{shown(self.path)} {self.table}{key}"


def shown(path: Path) -> str:
    """path as the user would type it here: its name when it is in this directory."""
    with contextlib.suppress(OSError):
        if path.parent == Path.cwd():
            return path.name
    return str(path)


def find(directory: Path) -> ConfigFile | None:
    """The options of unitgen.toml or pyproject.toml's [tool.unitgen] in directory, or
    None when neither is there."""
    own = _read(directory / UNITGEN_TOML)
    project = _read(directory / PYPROJECT_TOML)
    tool = project.get("tool", {}) if project is not None else {}
    if not isinstance(tool, dict):
        die(f"{shown(directory / PYPROJECT_TOML)}: tool is not a table", hint="fix the file: [tool] holds tables")
    in_project = tool.get("unitgen")
    if own is not None and in_project is not None:
        die(f"both {shown(directory / UNITGEN_TOML)} and {shown(directory / PYPROJECT_TOML)} [tool.unitgen] "
            "set unitgen's options", hint="keep them in one of the two files")
    if own is not None:
        return _options(directory / UNITGEN_TOML, "", own)
    if in_project is None:
        return None
    if not isinstance(in_project, dict):
        die(f"{shown(directory / PYPROJECT_TOML)}: tool.unitgen is not a table",
            hint='write it as a [tool.unitgen] section with lines such as app = "myapp:app"')
    return _options(directory / PYPROJECT_TOML, "[tool.unitgen] ", in_project)


MAX_CONFIG = 1 << 20  # bytes: a config file is a few lines


def _read(path: Path) -> dict[str, Any] | None:
    """The TOML document at path, or None when there is no such file.

    The file says which interpreter runs, as which user, which unit root starts on a
    failure: it is trusted as the command line is, so only when nobody but the user
    running unitgen (or root) can write it or any directory above it, as ssh's
    StrictModes asks of authorized_keys. `sudo unitgen render` in a directory the app's
    user owns must not run that user's choice of interpreter as root. Never through a
    link, never blocking on a FIFO, at most MAX_CONFIG bytes.
    """
    hint = "fix the file (TOML 1.0), or remove it"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:  # no file can have that name
            return None
        if err.errno == errno.ELOOP:
            die(f"{shown(path)} is a symbolic link", hint="put the options in a regular file there")
        die(f"cannot read {shown(path)}: {err.strerror}", hint="make it readable by this user, or remove it")
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            die(f"{shown(path)} is not a regular file", hint="remove it, or make it a file of options")
        _check_owner(path, info)
        data = f.read(MAX_CONFIG + 1)
    if len(data) > MAX_CONFIG:
        die(f"{shown(path)} is over {MAX_CONFIG >> 20} MiB", hint="a config file holds a few options")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        die(f"{shown(path)} is not valid TOML: it is not UTF-8", hint=hint)
    except tomllib.TOMLDecodeError as err:
        die(f"{shown(path)} is not valid TOML: {err}", hint=hint)


def _check_owner(path: Path, info: os.stat_result) -> None:
    me = os.geteuid()
    hint = ("give the file and its directories to this user or root (chown) and take write access from "
            "others (chmod go-w), or pass the options as flags")
    if info.st_uid not in (me, 0) or info.st_mode & 0o022:
        die(f"{shown(path)} can be written by someone other than this user or root", hint=hint)
    directory = path.resolve().parent
    for folder in (directory, *directory.parents):
        folder_info = os.stat(folder)
        sticky = folder_info.st_mode & stat.S_ISVTX
        if folder_info.st_uid not in (me, 0) or (folder_info.st_mode & 0o022 and not sticky):
            die(f"{shown(path)} is in {folder}, which someone other than this user or root can change", hint=hint)


def _options(path: Path, table: str, values: dict[str, Any]) -> ConfigFile:
    found = ConfigFile(path, table, {}, {})
    for written, value in values.items():
        # Both spellings: max-requests as render's option, max_requests as in Python.
        key = written.replace("_", "-")
        if key in COMMAND_LINE_ONLY:
            die(f"{found.where(written)}: is given on the command line only",
                hint=f"pass --{key} to `unitgen render` instead")
        if key not in KEYS:
            die(f"{found.where(written)}: unknown key",
                hint="the keys are render's long options without the dashes, e.g. max-requests; "
                     "see `unitgen render --help`")
        option = KEYS[key]
        if option.dest in found.written:
            die(f"{found.where(written)}: given twice (as {found.written[option.dest]} too)",
                hint="keep one of the two spellings")
        found.written[option.dest] = written
        found.options[option.dest] = _as_given(found, written, option.kind, value)
    return found


def _as_given(found: ConfigFile, written: str, kind: Kind, value: Any) -> Any:
    """value as the command line would give it; the parsers check the rest."""
    def wrong(bad: Any, what: str = kind.what) -> Die:
        return Die(f"{found.where(written)}: {bad} is not {what}", hint=f"give it as in {kind.example}")

    if kind == FLAG:  # the only one is no-rebalance: true is rebalance off
        if not isinstance(value, bool):
            raise wrong(_toml(value))
        return not value
    if kind == ENV and isinstance(value, dict):
        for key, item in value.items():
            if not _is_text(item):
                raise wrong(f"{key} = {_toml(item)}", "a string")
        return [f"{key}={item}" for key, item in value.items()]
    if kind in (LIST, PATHS, ENV):
        if not isinstance(value, list | str | int) or isinstance(value, bool):
            raise wrong(_toml(value))
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not _is_text(item):
                raise wrong(f"{_toml(item)} in the list", "a string")
        if not items:  # the command line cannot say "none" either: leave the key out
            raise Die(f"{found.where(written)}: is an empty list",
                      hint="give at least one value, or leave the key out for the default")
        items = [str(item) for item in items]
        return [_from_file(found, item) for item in items] if kind == PATHS else items
    if not (isinstance(value, str) or kind == NUMBER and _is_text(value)):
        raise wrong(_toml(value))
    return _from_file(found, value) if kind == PATH else str(value)


def _is_text(value: Any) -> bool:
    """A string, or a whole number that the command line would give as one (8080)."""
    return isinstance(value, str) or isinstance(value, int) and not isinstance(value, bool)


def _from_file(found: ConfigFile, path: str) -> str:
    """A relative path is taken from the file's directory, so that a repository's file
    names its own virtualenv or source directory wherever it is checked out."""
    if not path or path.startswith("/"):
        return path  # as written: the parser refuses an empty one
    return os.path.normpath(os.path.join(found.path.parent, path))


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value) if isinstance(value, str) else str(value)


@contextlib.contextmanager
def naming_the_file(found: ConfigFile | None, args: Any) -> Iterator[None]:
    """A parser's refusal of a value the file gave names the file and the key instead
    of the option: `pyproject.toml [tool.unitgen] cores: 0 is out of range; ...`."""
    try:
        yield
    except Die as err:
        if found is not None:
            for dest, written in found.written.items():
                flag = KEYS[written.replace("_", "-")].flag
                came_from_file = getattr(args, dest, None) == found.options[dest]
                if came_from_file and (err.message == flag or err.message.startswith(flag + " ")):
                    rest = err.message[len(flag):].strip() or "refused"
                    raise Die(f"{found.where(written)}: {rest}", hint=err.hint, code=err.code) from None
        raise
