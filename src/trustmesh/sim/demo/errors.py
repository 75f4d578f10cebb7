"""The demo's errors: it could not start, its traffic misbehaved, or the control plane
refused an admin call."""

from __future__ import annotations

from typing import Any


class DemoError(RuntimeError):
    """The demo could not start, or its traffic did not behave as it should."""


class ApiError(DemoError):
    """The control plane answered an admin call with an error."""

    def __init__(self, path: str, status: int, document: dict[str, Any], text: str) -> None:
        self.status = status
        self.error = str(document.get("error") or "")
        self.description = str(document.get("error_description") or text[:200])
        problems = document.get("problems")
        self.problems = [str(p) for p in problems] if isinstance(problems, list) else []
        super().__init__(f"{path} answered {status}: {self.description}")
