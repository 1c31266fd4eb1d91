"""Expected failures: one line for the user, a traceback only with --debug."""

from __future__ import annotations

from typing import NoReturn


class Die(Exception):
    """An expected failure; the CLI prints it as one line and exits non-zero."""

    def __init__(self, message: str, *, hint: str | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def line(self) -> str:
        text = self.message if self.hint is None else f"{self.message}; {self.hint}"
        # One line, whatever a subprocess or the user put into the message.
        return " ".join(text.split())


def die(message: str, *, hint: str | None = None, code: int = 1) -> NoReturn:
    raise Die(message, hint=hint, code=code)
