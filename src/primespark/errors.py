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


class StepFailed(UserError):
    """A step on a fleet host (a command, restic) failed for a reason outside this program: an expected
    failure, reported in a line or two. `transient` says whether the same step may pass when tried again."""

    transient = False

    def __init__(self, message: str, fix: str = "", *, returncode: int | None = None, stderr: str = "") -> None:
        super().__init__(message, fix)
        self.returncode = returncode
        self.stderr = stderr
