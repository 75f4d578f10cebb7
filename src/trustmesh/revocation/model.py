"""Revocation entries and the set an agent checks on every decision.

Four kinds (DESIGN §5):

* ``jti`` — one token;
* ``subject`` — a SPIFFE ID (``--workload`` resolves to one): every token issued at or
  before the revocation's second; or ``user:NAME``, a person's login tokens for the
  clusters' API servers (``trustmesh user remove`` writes it; ``identity/login.py``);
* ``cluster`` — every token that originated in that cluster at or before it;
* ``key`` — every token signed with that ``kid`` (the key also leaves JWKS).

"At or before": ``iat`` has one-second resolution, so a token issued in the same second
as the revocation is treated as revoked; the control plane issues later tokens with an
``iat`` after that second, so "a token issued after a subject revocation is valid
again" holds exactly. An entry expires once no token it covers can still be valid
(revocation + the maximum token lifetime + clock skew), so the list stays small.

The check is four dictionary lookups: O(1) whatever the size of the list."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from trustmesh.common.errors import RevocationError
from trustmesh.identity.keys import CLOCK_SKEW, MAX_TOKEN_TTL

KINDS = ("jti", "subject", "cluster", "key")
_VALUE = re.compile(r"^[\x21-\x7e]{1,512}$")


def revocation_expiry(revoked_at: float, lifetime: float = MAX_TOKEN_TTL) -> float:
    """When an entry covers no token that can still be valid: the longest lifetime of a
    token it covers (ours: an hour) plus clock skew after the cut-off."""
    return revoked_at + lifetime + CLOCK_SKEW


@dataclass(frozen=True, slots=True)
class Revocation:
    revision: int
    kind: str
    value: str
    revoked_at: float  # whole seconds: tokens with iat <= revoked_at are covered
    expires_at: float
    reason: str
    actor: str
    published_at: float | None = None
    """When the control plane recorded it (epoch seconds, not rounded): agents measure
    how long it took to reach them. None for an entry recorded before it was kept."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Revocation:
        entry = cls(
            **{
                name: data[name]
                for name in cls.__dataclass_fields__
                if name != "published_at" or data.get(name) is not None
            }
        )
        if entry.kind not in KINDS:
            raise RevocationError(f"unknown revocation kind {entry.kind!r}")
        return entry


def check_request(kind: str, value: str, reason: str) -> None:
    if kind not in KINDS:
        raise RevocationError(f"kind must be one of {', '.join(KINDS)}")
    if not isinstance(value, str) or not _VALUE.match(value):
        raise RevocationError("value must be 1-512 printable characters without spaces")
    if not isinstance(reason, str) or len(reason) > 1000:
        raise RevocationError("reason must be a string of at most 1000 characters")


def whole_second(now: float) -> float:
    return float(math.floor(now))


class RevocationSet:
    """The entries in force, indexed for the per-decision check. Not thread-safe for
    writers; readers see a consistent entry per lookup (dict operations are atomic)."""

    def __init__(self, entries: Iterable[Revocation] = ()) -> None:
        self.revision = 0
        self._jti: dict[str, Revocation] = {}
        self._subject: dict[str, Revocation] = {}
        self._cluster: dict[str, Revocation] = {}
        self._key: dict[str, Revocation] = {}
        self.apply(entries)

    def _index(self, kind: str) -> dict[str, Revocation]:
        return {
            "jti": self._jti,
            "subject": self._subject,
            "cluster": self._cluster,
            "key": self._key,
        }[kind]

    def apply(self, entries: Iterable[Revocation]) -> int:
        """Add or replace entries (a later revocation of the same subject replaces the
        earlier one); returns how many changed the set."""
        changed = 0
        for entry in entries:
            index = self._index(entry.kind)
            current = index.get(entry.value)
            if current is None or entry.revision > current.revision:
                index[entry.value] = entry
                changed += 1
            self.revision = max(self.revision, entry.revision)
        return changed

    def expire(self, now: float) -> int:
        removed = 0
        for index in (self._jti, self._subject, self._cluster, self._key):
            for value in [v for v, e in index.items() if e.expires_at <= now]:
                del index[value]
                removed += 1
        return removed

    def revoked(
        self, *, jti: str, subject: str, cluster: str, kid: str, issued_at: float
    ) -> Revocation | None:
        """The entry that revokes this token, or None. Four O(1) lookups."""
        entry = self._jti.get(jti)
        if entry is not None:
            return entry
        entry = self._key.get(kid)
        if entry is not None:
            return entry
        entry = self._subject.get(subject)
        if entry is not None and issued_at <= entry.revoked_at:
            return entry
        entry = self._cluster.get(cluster)
        if entry is not None and issued_at <= entry.revoked_at:
            return entry
        return None

    def latest(self, kind: str, value: str) -> Revocation | None:
        return self._index(kind).get(value)

    def entries(self) -> list[Revocation]:
        every = [
            *self._jti.values(),
            *self._subject.values(),
            *self._cluster.values(),
            *self._key.values(),
        ]
        return sorted(every, key=lambda e: e.revision)

    def __len__(self) -> int:
        return len(self._jti) + len(self._subject) + len(self._cluster) + len(self._key)

    def to_json(self) -> str:
        return json.dumps(
            {"revision": self.revision, "entries": [e.to_json() for e in self.entries()]}
        )

    @classmethod
    def from_json(cls, text: str) -> RevocationSet:
        data = json.loads(text)
        revocations = cls(Revocation.from_json(e) for e in data["entries"])
        revocations.revision = max(revocations.revision, int(data["revision"]))
        return revocations
