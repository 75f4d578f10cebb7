"""Problems found while loading manifests, and the error that carries all of them (DESIGN §3).

Every problem names the file, the 1-based line and the dotted field path, so that
``trustmesh apply`` can report everything wrong with an input in one go and apply
nothing of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from trustmesh.common.errors import ManifestError

__all__ = ["ManifestError", "Problem", "Sink"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input. ``line`` is 1-based; 0 means "the whole file"
    (an unreadable path) or a stored body, which has no lines."""

    path: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}: "
        return f"{where}{self.field}: {self.message}" if self.field else f"{where}{self.message}"


@dataclass
class Sink:
    """Collects problems for one source (file or text); checkers never raise."""

    path: str
    problems: list[Problem] = field(default_factory=list)

    def add(self, line: int, field_path: str, message: str) -> None:
        self.problems.append(Problem(self.path, line, field_path, message))
