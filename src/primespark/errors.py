"""Errors meant for the operator: what is wrong and how to fix it. The CLI prints them without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A problem the operator can fix; `fix` says how."""

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message}\n    fix: {self.fix}" if self.fix else self.message
