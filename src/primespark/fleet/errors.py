"""Located, human-readable fleet errors: file, line, field path, what is wrong, how to fix it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Path = tuple[str | int, ...]


def dotted(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


@dataclass(frozen=True)
class Problem:
    path: Path
    message: str
    fix: str = ""
    code: str = "invalid"
    file: str = ""
    line: int | None = None

    def located(self, file: str, line: int | None) -> Problem:
        return Problem(self.path, self.message, self.fix, self.code, file, line)

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else (self.file or "<fleet>")
        text = f"{where}: {dotted(self.path) + ': ' if self.path else ''}{self.message}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


@dataclass
class FleetError(Exception):
    """Raised by the loader; carries every problem found, not just the first."""

    problems: list[Problem] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__(self.summary())

    @classmethod
    def single(cls, file: str, message: str, fix: str = "", line: int | None = None) -> FleetError:
        return cls([Problem((), message, fix, "file", file, line)])

    def summary(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in the fleet"
        return head + ":\n" + "\n".join(f"  {p}" for p in self.problems)

    def __str__(self) -> str:
        return self.summary()


def sort_problems(problems: Iterable[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line or 0, dotted(p.path)))


def messages(problems: Sequence[Problem]) -> list[str]:
    return [str(p) for p in problems]
