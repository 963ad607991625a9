"""Errors of our own: a user error is rendered by the CLI as one clear message, exit code 2."""

from __future__ import annotations

from dataclasses import dataclass


class UserError(Exception):
    """A mistake the user can fix (bad input, missing prerequisite). Never shown as a traceback."""

    exit_code = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong in an input file, located precisely enough to be fixed without searching."""

    file: str
    path: str  # YAML path, e.g. etablissements[2].uai
    message: str  # what is wrong and what would be valid
    line: int | None = None

    def render(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path or '<document>'}: {self.message}"


class ValidationFailed(UserError):
    """Raised with every problem found at once."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        count = len(problems)
        lines = [p.render() for p in problems]
        super().__init__(
            f"{count} problem{'s' if count != 1 else ''} found:\n" + "\n".join(lines)
        )
