"""A replica's health as DESIGN §10 states it: ``/healthz`` is liveness (the process
answers); ``/readyz`` is readiness to *serve* — discovery, JWKS and the SPIFFE bundle,
from the keys it holds in memory — and stays ready through a database outage, since
those documents need no database; ``/readyz?check=issue`` is readiness to *issue*:
no token leaves without its audit record (DESIGN §6), so it fails while the database
or the audit log cannot be written, or while the replica's state is too old to be
trusted (a revocation another replica stored may be missing from it).

The background loops report here what each database round did (:meth:`Health.ok`,
:meth:`Health.failed`); nothing asks the database on behalf of a probe, so a probe
never waits for an unreachable database. Each check is named in the JSON, with what
failed and for how long; an error's text is the driver's, which names the database's
address (never its password: URLs are rendered without it) — the anonymous answer
carries only ``ok`` and ``since``, the detail is for the admin credential."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

SERVE = "serve"
ISSUE = "issue"
CHECKS = (SERVE, ISSUE)
"""What ``/readyz?check=`` accepts (``serve`` is the default)."""

DATABASE_DOWN = (
    "the database cannot be reached; retry (another replica may answer), "
    "nothing was changed or issued"
)
"""The 503 ``temporarily_unavailable`` description of a request the database failed."""

DATABASE = "database"
AUDIT = "audit"


@dataclass
class _Round:
    """The last outcome of one kind of database round."""

    ok: bool = True
    since: float = 0.0  # monotonic seconds: when the current outcome began
    error: str = ""


class Health:
    """What the loops last saw of the database and of the audit log."""

    def __init__(self) -> None:
        now = time.monotonic()
        self._rounds: dict[str, _Round] = {
            DATABASE: _Round(since=now),
            AUDIT: _Round(since=now),
        }

    def ok(self, what: str) -> None:
        state = self._rounds[what]
        if not state.ok:
            self._rounds[what] = _Round(ok=True, since=time.monotonic())

    def failed(self, what: str, exc: BaseException) -> None:
        state = self._rounds[what]
        error = f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        since = state.since if not state.ok else time.monotonic()
        self._rounds[what] = _Round(ok=False, since=since, error=error[:300])

    def check(self, what: str, detail: bool) -> dict[str, Any]:
        state = self._rounds[what]
        answer: dict[str, Any] = {"ok": state.ok}
        if not state.ok:
            answer["failing_for_seconds"] = round(time.monotonic() - state.since, 3)
            if detail:
                answer["error"] = state.error
        return answer

    def is_ok(self, what: str) -> bool:
        return self._rounds[what].ok


def parse_check(value: str | None) -> str:
    """``?check=`` -> ``serve`` or ``issue``; ValueError names what is accepted."""
    if value is None or value == "":
        return SERVE
    if value not in CHECKS:
        raise ValueError(f"check must be one of {', '.join(CHECKS)}")
    return value
