"""Quoting for values that go into unit files.

systemd parses unit files line by line: a raw newline adds a directive, a trailing
backslash joins the next line, ``%`` starts a specifier and ``$`` expands a variable in
ExecStart=. Every user-supplied value is first checked by ``check_text`` (which rejects
what no quoting can make safe) and then written through one of these functions.
"""

from __future__ import annotations

import unicodedata

from unitgen.errors import die


def check_text(what: str, value: str, *, hint: str) -> str:
    """Reject control characters, invalid UTF-8 and empty values."""
    if not isinstance(value, str):  # argparse turns an explicit "--" value into []
        die(f"{what} has no value", hint=hint)
    if value == "":
        die(f"{what} is empty", hint=hint)
    for ch in value:
        # Noncharacters (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF) too: systemd's utf8_is_valid() refuses them.
        if (unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp")
                or 0xFDD0 <= ord(ch) <= 0xFDEF or ord(ch) & 0xFFFE == 0xFFFE):
            die(f"{what} contains the control character {ch!r}", hint=hint)
    return value


def printable(text: str) -> str:
    """text for a terminal: control characters (escape sequences the app wrote into its
    journal, say) are shown as \\xNN instead of acting on the operator's terminal."""
    return "".join(ch if ch == "\t" or unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp")
                   else f"\\x{ord(ch):02x}" for ch in text)


def specifiers(value: str) -> str:
    """Escape systemd specifiers: '%' is written '%%'."""
    return value.replace("%", "%%")


def quoted(value: str) -> str:
    """One double-quoted word for ExecStart= (specifiers, variables, C escapes)."""
    value = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + specifiers(value).replace("$", "$$") + '"'


def _word(text: str) -> str:
    """One double-quoted word where systemd unquotes and expands specifiers, not $."""
    return '"' + specifiers(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def env_assignment(key: str, value: str) -> str:
    """A double-quoted KEY=VALUE word for Environment= (no $ expansion there)."""
    return _word(f"{key}={value}")


def path_word(path: str) -> str:
    """One path in a list such as ReadWritePaths= (space-separated, quotes allowed)."""
    return _word(path)
