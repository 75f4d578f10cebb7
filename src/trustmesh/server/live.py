"""What the console's live pages follow (``GET /console/events``): for each kind
(``overview``, ``anomalies``) a revision that moves when what that page shows changed.

Each kind has a fingerprint function (a cheap digest of the page's data, without the
times that move on their own). The fingerprints are taken at most once per
``RESOLUTION`` seconds for the whole replica, however many browsers listen, and a
kind's revision moves when its fingerprint changed; so a page re-fetches at most once
a second, and a quiet federation costs one look a second while someone watches."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping

from sqlalchemy import func, select

from trustmesh.storage import Database
from trustmesh.storage.schema import anomalies

OVERVIEW = "overview"
ANOMALIES = "anomalies"
KINDS = (OVERVIEW, ANOMALIES)
RESOLUTION = 1.0  # seconds: fingerprints are taken at most this often

Fingerprint = Callable[[], str]


class LiveFeed:
    def __init__(self, fingerprints: Mapping[str, Fingerprint]) -> None:
        self.fingerprints = dict(fingerprints)
        self._lock = threading.Lock()
        self._taken_at = float("-inf")  # monotonic
        self._prints: dict[str, str] = {}
        self._revisions = dict.fromkeys(self.fingerprints, 0)

    def revisions(self) -> dict[str, int]:
        """Each kind's revision, from fingerprints at most ``RESOLUTION`` seconds old."""
        with self._lock:
            now = time.monotonic()
            if now - self._taken_at >= RESOLUTION:
                self._taken_at = now
                for kind, fingerprint in self.fingerprints.items():
                    value = fingerprint()
                    if self._prints.get(kind) != value:
                        if kind in self._prints:
                            self._revisions[kind] += 1
                        self._prints[kind] = value
            return dict(self._revisions)


def anomalies_fingerprint(db: Database) -> Fingerprint:
    """The findings' count and their latest detection, acknowledgement and resolution."""
    a = anomalies.c

    def fingerprint() -> str:
        with db.engine.connect() as conn:
            row = conn.execute(
                select(
                    func.count(),
                    func.max(a.detected_at),
                    func.max(a.acknowledged_at),
                    func.max(a.resolved_at),
                )
            ).one()
        return hashlib.sha256(repr(tuple(row)).encode()).hexdigest()

    return fingerprint
