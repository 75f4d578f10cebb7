"""Refusals, auditable but bounded (DESIGN §6; docs/audit.md, "Refusals, bounded").

Anyone can send a token that does not verify, as fast as they like; written one event
each, refusals would let an unauthenticated caller grow the append-only log without
bound. A :class:`RefusalFolder` decides, for each refusal, whether it is written as an
individual event or *folded*: counted into the ``audit.refusals_folded`` summary of its
window, which says exactly how many refusals it stands for and what is known of them
(counts by error, reason, surface, caller address and claimed issuer; first and last
time; the SHA-256 of a few sample tokens, never a token).

The rules, deterministic on the clock the caller passes:

* A **window** opens at the first refusal after the previous one closed and lasts
  ``window`` seconds. Within it the first ``quota`` refusals are individual events, and
  of those at most ``per_source`` from one source: one caller address (an IPv6
  address counts by its /64, which one host can vary cheaply) and one claimed issuer.
  A single refusal is therefore always an individual event.
* Every other refusal of the window is folded; the window's summary is due when the
  window ends (:meth:`RefusalFolder.due`, checked on the next refusal and by the
  writer's timer) or at shutdown (:meth:`RefusalFolder.flush`).
* A refusal whose individual event, or a summary, that could not be written is
  counted as **dropped** (:meth:`RefusalFolder.drop`, :meth:`RefusalFolder.unwritten`)
  and reported, with its counts, by a summary written before the writer's next event.

Decisions about authenticated identities and issued tokens never come here: only
refusals of callers that did not authenticate are folded.

Memory is bounded whatever the callers send: the per-source counters hold only
sources that wrote an individual event (at most ``quota`` per window), and a tally
tracks at most :data:`MAX_TRACKED` distinct values per facet (the rest are counted as
``others``). Nothing here touches a database, the disk or the network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from trustmesh.audit.canonical import canonical_bytes
from trustmesh.audit.events import MAX_SAMPLES, now_time

FACETS = ("error", "reason", "surface", "address", "issuer")
"""The facts a tally counts refusals by."""
LIMITED = ("address", "issuer")
"""The facets that are sources: each value may write ``per_source`` individual events
a window."""
MAX_TRACKED = 256
"""Distinct values of one facet a tally counts by name; later ones count as others."""
MAX_VALUE_BYTES = 200
"""A value longer than this (UTF-8) is cut: summaries stay far below the event limit."""
TOP = 8
"""Values of a facet a summary names, by count; the rest are added up in ``others``."""
SAMPLES = 5
assert SAMPLES <= MAX_SAMPLES

DEFAULT_WINDOW = 10.0
DEFAULT_PER_SOURCE = 5
DEFAULT_SERVER_QUOTA = 20
DEFAULT_AGENT_QUOTA = 20


@dataclass(frozen=True)
class FoldingLimits:
    """How many refusals a writer records individually. ``window`` in seconds;
    ``quota`` individual refusals a window in all; ``per_source`` of them from one
    source (None: no limit per source, the agent's case)."""

    window: float = DEFAULT_WINDOW
    quota: int = DEFAULT_SERVER_QUOTA
    per_source: int | None = DEFAULT_PER_SOURCE

    def __post_init__(self) -> None:
        if not 0 < self.window <= 86400:
            raise ValueError("the refusal window must be more than 0 and at most 86400 seconds")
        if self.quota < 1:
            raise ValueError("the refusal quota must be at least 1 (a single refusal is recorded)")
        if self.per_source is not None and self.per_source < 1:
            raise ValueError("the refusals per source must be at least 1")

    def to_json(self) -> dict[str, Any]:
        limits: dict[str, Any] = {"window_ms": round(self.window * 1000), "quota": self.quota}
        if self.per_source is not None:
            limits["per_source"] = self.per_source
        return limits


DEFAULT_AGENT_LIMITS = FoldingLimits(DEFAULT_WINDOW, DEFAULT_AGENT_QUOTA, per_source=None)
"""An agent's: a quota a window, no limit per source (its callers are a few proxies and
the API server, which carry everyone's questions)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """What is known of one refusal. Every member is untrusted (the caller chose it)
    except ``address``; none is ever a token."""

    error: str
    reason: str | None = None
    surface: str | None = None
    address: str | None = None
    issuer: str | None = None
    token_sha256: str | None = None


def source_address(host: str | None) -> str | None:
    """The caller's address as a source: IPv4 as it is, IPv6 by its /64 (an IPv4-mapped
    address as IPv4), anything else (a Unix socket) as given, cut."""
    if not host:
        return None
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return _clean(host)
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _clean(value: str) -> str:
    """A value fit for a summary: printable (lone surrogates included: they are not),
    at most :data:`MAX_VALUE_BYTES` in UTF-8."""
    if not value.isprintable():
        value = "".join(c if c.isprintable() else "\ufffd" for c in value)
    encoded = value.encode("utf-8")
    if len(encoded) > MAX_VALUE_BYTES:
        return encoded[: MAX_VALUE_BYTES - 3].decode("utf-8", "ignore") + "…"
    return value


class Tally:
    """Counts of a run of refusals: how many, first and last time, by facet, samples."""

    __slots__ = ("absent", "count", "first", "last", "others", "samples", "values")

    def __init__(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.values: dict[str, dict[str, int]] = {facet: {} for facet in FACETS}
        self.others: dict[str, int] = dict.fromkeys(FACETS, 0)
        self.absent: dict[str, int] = dict.fromkeys(FACETS, 0)
        self.samples: list[str] = []

    def add(self, at: float, refusal: Refusal) -> None:
        self._span(at, at, 1)
        for facet in FACETS:
            value = getattr(refusal, facet)
            if value is None or value == "":
                self.absent[facet] += 1
            else:
                self._count(facet, _clean(str(value)), 1)
        digest = refusal.token_sha256
        if digest is not None and len(self.samples) < SAMPLES and digest not in self.samples:
            self.samples.append(digest)

    def merge(self, other: Tally) -> None:
        if not other.count:
            return
        self._span(other.first, other.last, other.count)
        for facet in FACETS:
            for value, n in other.values[facet].items():
                self._count(facet, value, n)
            self.others[facet] += other.others[facet]
            self.absent[facet] += other.absent[facet]
        for digest in other.samples:
            if len(self.samples) < SAMPLES and digest not in self.samples:
                self.samples.append(digest)

    def _span(self, first: float, last: float, count: int) -> None:
        if not self.count:
            self.first, self.last = first, last
        else:
            self.first, self.last = min(self.first, first), max(self.last, last)
        self.count += count

    def _count(self, facet: str, value: str, n: int) -> None:
        values = self.values[facet]
        if value in values:
            values[value] += n
        elif len(values) < MAX_TRACKED:
            values[value] = n
        else:
            self.others[facet] += n

    def to_json(self, top: int = TOP) -> dict[str, Any]:
        """``first``, ``last``, ``by`` (per facet: ``values`` — the ``top`` most
        frequent, ties by value — ``others`` and ``absent``, which add up to the
        count) and ``sample_token_sha256``. A facet no refusal had is left out."""
        by: dict[str, Any] = {}
        for facet in FACETS:
            if self.absent[facet] == self.count:
                continue
            ranked = sorted(self.values[facet].items(), key=lambda item: (-item[1], item[0]))
            listed = dict(ranked[:top])
            counts: dict[str, Any] = {"values": listed} if listed else {}
            others = self.others[facet] + sum(n for _, n in ranked[top:])
            if others:
                counts["others"] = others
            if self.absent[facet]:
                counts["absent"] = self.absent[facet]
            by[facet] = counts
        facts: dict[str, Any] = {
            "first": now_time(self.first),
            "last": now_time(self.last),
            "by": by,
        }
        if self.samples:
            facts["sample_token_sha256"] = list(self.samples)
        return facts


@dataclass(frozen=True)
class Summary:
    """What a closed window folded and what was dropped before it, to be written as one
    ``audit.refusals_folded`` event."""

    folded: Tally
    dropped: Tally

    def detail(self, folded_type: str, limits: FoldingLimits, top: int = TOP) -> dict[str, Any]:
        detail: dict[str, Any] = {"folded_type": folded_type, "folded": self.folded.count}
        if self.folded.count:
            detail.update(self.folded.to_json(top))
        if self.dropped.count:
            detail["dropped"] = {"count": self.dropped.count, **self.dropped.to_json(top)}
        detail["limits"] = limits.to_json()
        return detail

    @property
    def refusals(self) -> int:
        return self.folded.count + self.dropped.count


def fitted(build: Callable[[int], dict[str, Any]], max_bytes: int) -> dict[str, Any]:
    """The event ``build(top)`` gives with as many named values as fit ``max_bytes``
    (canonical form): 8 a facet, else 2, else none (all counted as others). The counts
    are exact whichever it is."""
    event: dict[str, Any] = {}
    for top in (TOP, 2, 0):
        event = build(top)
        if len(canonical_bytes(event)) <= max_bytes:
            break
    return event


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to write for one refusal: its own event or not (folded), and, first, the
    summary of a window that ended before it, if one is due."""

    individual: bool
    due: Summary | None


class RefusalFolder:
    """The rules of the module docstring for one writer (a control-plane replica, an
    agent). Not thread-safe: the writer calls it from its event loop."""

    def __init__(self, limits: FoldingLimits) -> None:
        self.limits = limits
        self._end: float | None = None  # the open window's end; None: no window open
        self._written = 0  # individual refusals of the open window
        self._by_source: dict[tuple[str, str], int] = {}
        self._folded = Tally()
        self._dropped = Tally()
        self.owed = False
        """Whether dropped refusals wait to be reported (before the writer's next event:
        :meth:`take_dropped`). An attribute: writers check it before every event."""
        # since start (metrics): refusals folded, refusals dropped
        self.folded_total = 0
        self.dropped_total = 0

    def observe(self, now: float, refusal: Refusal) -> Verdict:
        """Count one refusal: individual, or folded into the open window."""
        due = self.due(now)
        if self._end is None:
            self._end = now + self.limits.window
        if self._admit(refusal):
            return Verdict(True, due)
        self._folded.add(now, refusal)
        self.folded_total += 1
        return Verdict(False, due)

    def _admit(self, refusal: Refusal) -> bool:
        if self._written >= self.limits.quota:
            return False
        keys: list[tuple[str, str]] = []
        per_source = self.limits.per_source
        if per_source is not None:
            for facet in LIMITED:
                value = getattr(refusal, facet)
                if value:
                    key = (facet, value)
                    if self._by_source.get(key, 0) >= per_source:
                        return False
                    keys.append(key)
        self._written += 1
        for key in keys:
            self._by_source[key] = self._by_source.get(key, 0) + 1
        return True

    def due(self, now: float) -> Summary | None:
        """Close the open window if it has ended by ``now``; its summary, if it folded
        anything (or refusals were dropped meanwhile)."""
        if self._end is None or now < self._end:
            return None
        return self.flush()

    def flush(self) -> Summary | None:
        """Close the open window now (shutdown); its summary, if there is anything to
        say."""
        self._end = None
        self._written = 0
        self._by_source = {}
        folded, self._folded = self._folded, Tally()
        return self._summary(folded)

    def take_dropped(self) -> Summary | None:
        """A summary of the dropped refusals alone, without closing the window."""
        return self._summary(Tally())

    def _summary(self, folded: Tally) -> Summary | None:
        if not folded.count and not self._dropped.count:
            return None
        dropped, self._dropped = self._dropped, Tally()
        self.owed = False
        return Summary(folded, dropped)

    def drop(self, now: float, refusal: Refusal) -> None:
        """A refusal whose individual event could not be written."""
        self._dropped.add(now, refusal)
        self.dropped_total += 1
        self.owed = True

    def unwritten(self, summary: Summary) -> None:
        """A summary that could not be written: everything it stands for is dropped,
        and reported with the next summary."""
        self._dropped.merge(summary.folded)
        self._dropped.merge(summary.dropped)
        self.dropped_total += summary.folded.count
        self.owed = self._dropped.count > 0

    def pending(self) -> Mapping[str, int]:
        """What is held in memory now (for status pages and tests)."""
        return {"folded": self._folded.count, "dropped": self._dropped.count}
