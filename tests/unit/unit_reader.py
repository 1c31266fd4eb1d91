"""systemd's reading of a unit file, written down for the property tests: the values a
rendered unit holds, read back as systemd 252 reads them (conf-parser, extract_first_word,
unit_full_printf, exec command parsing). test_property checks this reader against what
systemd-analyze verify itself echoes back.
"""

from __future__ import annotations

import re
import unicodedata

from unitgen_worker.contract import WorkerConfig

INSTANCE = "7"  # the instance whose command lines the reader works out

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


def reload_command(value: str, table: dict[str, str]) -> tuple[str, str, list[str]]:
    """ExecReload=: a command whose last word is exactly $MAINPID, the one variable
    systemd sets for it; anything else is read as command() reads it."""
    head, _, last = value.rpartition(" ")
    if last != "$MAINPID":
        raise Unreadable(f"ExecReload= does not end in $MAINPID: {value!r}")
    prefix, path, args = command(head, table)
    return prefix, path, [*args, last]


def worker_command(value: str, table: dict[str, str]) -> tuple[str, str, list[str], WorkerConfig]:
    """ExecStart=: what the worker runtime parses out of its command line."""
    prefix, path, args = command(value, table)
    try:
        config = WorkerConfig.from_argv(args[2:])
    except SystemExit as err:
        raise Unreadable(f"the worker refuses its arguments {args!r}") from err
    return prefix, path, args[:2], config
