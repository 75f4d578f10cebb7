"""The demo's errors, in the project's one hierarchy (``common/errors.py``): the demo
could not start, its run showed problems, or the control plane refused an admin call.
The CLI prints the description as its one line."""

from __future__ import annotations

from typing import Any

from trustmesh.common.errors import TrustmeshError


class DemoError(TrustmeshError):
    """The demo could not start, or its traffic did not behave as it should."""


class ApiError(DemoError):
    """The control plane answered an admin call with an error. The answer's status, code
    and description are kept apart (``answer_*``) from the ``status`` and ``error`` that
    every TrustmeshError carries for an HTTP surface of ours to answer with."""

    def __init__(self, path: str, status: int, document: dict[str, Any], text: str) -> None:
        self.answer_status = status
        self.answer_error = str(document.get("error") or "")
        self.answer_description = str(document.get("error_description") or text[:200])
        super().__init__(f"{path} answered {status}: {self.answer_description}")
