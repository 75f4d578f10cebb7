"""The anomaly detectors: pure logic over audit events (docs/analytics.md#detectors).

Each detector is fed the log's entries in index order (``observe(index, event,
settings)``) and returns the findings that entry triggers. Time is the event's own
``time``, never the wall clock, so a replay of the same entries gives the same findings.
State is bounded (every map of tracked keys is capped, least recently used dropped
first, and counts what it dropped) and is JSON (``snapshot()`` / ``restore()``): the
runner persists it with its cursor, and a detector restored from a snapshot continues
exactly as one that never stopped.

Detectors never raise on what an event holds: a member that is absent or of the wrong
type makes the event irrelevant to them (the log's schema is checked when it is
written; here an odd event is skipped, not fatal).
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from trustmesh.analytics.findings import MAX_EVIDENCE, MAX_KEY, MAX_SUMMARY, Finding
from trustmesh.analytics.settings import AnomalySettings, DetectorSettings
from trustmesh.audit.canonical import parse_time
from trustmesh.common.addresses import caller_address
from trustmesh.common.errors import CanonicalError

SNAPSHOT_VERSION = 1
BASELINE_FACTOR = 3.0
"""A burst is a window's count above max(threshold, BASELINE_FACTOR x the count the
key's baseline rate predicts for a window)."""
BUCKETS_PER_WINDOW = 10
MAX_KEYS = 4096
"""Keys a burst detector tracks (per detector; each holds at most ``BUCKETS_PER_WINDOW``
buckets and ``MAX_EVIDENCE`` indexes)."""
MAX_EDGES = 50_000
"""Edges, identities, tokens or credentials a detector remembers (small entries)."""
MAX_SOURCES_PER_CREDENTIAL = 8
"""(cluster, caller address) uses concurrent_use keeps per credential."""
CONCURRENT_SNAPSHOT_VERSION = 2
"""concurrent_use's snapshots since its uses carry the caller's address (1 before)."""
MAX_TEXT = 200
CLUSTER_AUDIENCE = "/cluster/"


# -- small helpers ---------------------------------------------------------------------
_parsed: tuple[str, float | None] = ("", None)


def event_time(event: Mapping[str, Any]) -> float | None:
    """The event's ``time`` as epoch seconds, or None when it has none that parses. The
    last one parsed is kept: every detector asks for the same event's time in turn."""
    global _parsed
    text = event.get("time")
    if not isinstance(text, str):
        return None
    cached = _parsed
    if cached[0] == text:
        return cached[1]
    try:
        value: float | None = parse_time(text).timestamp()
    except CanonicalError:
        value = None
    _parsed = (text, value)
    return value


def printable(value: Any, limit: int = MAX_TEXT) -> str:
    """``value`` as text safe for a terminal and bounded: anything not printable (an
    attacker may have written it: a claimed issuer, a host) is escaped."""
    text = value if isinstance(value, str) else repr(value)
    out = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _part(event: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = event.get(name)
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def audience_clusters(audience: Any) -> list[str]:
    """The clusters a token's audiences name (``spiffe://TD/cluster/NAME``), each once,
    in order; other audiences are not clusters and are left out."""
    values = [audience] if isinstance(audience, str) else audience
    if not isinstance(values, list):
        return []
    clusters: list[str] = []
    for value in values:
        if isinstance(value, str) and value.startswith("spiffe://") and CLUSTER_AUDIENCE in value:
            name = value.rsplit(CLUSTER_AUDIENCE, 1)[1]
            if name and "/" not in name and name not in clusters:
                clusters.append(name)
    return clusters


def _workload(identity: Mapping[str, Any]) -> str | None:
    return _text(identity.get("workload")) or _text(identity.get("spiffe_id"))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pairs(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(p, list) and len(p) == 2 and _number(p[0]) and _number(p[1]) for p in value
    )


def _rate_state(state: Any) -> bool:
    """Whether ``state`` is a key's state as :class:`RateCounter` writes it (a snapshot
    from elsewhere is not trusted to be)."""
    return (
        isinstance(state, dict)
        and _number(state.get("r"))
        and _number(state.get("u"))
        and _pairs(state.get("b"))
        and _pairs(state.get("e"))
    )


def _use(value: Any) -> bool:
    """[time, index]: when and where a key was last seen."""
    return isinstance(value, list) and len(value) == 2 and _number(value[0]) and _number(value[1])


def _issuance(value: Any) -> bool:
    """[workload, spiffe_id, audiences, index] of an issued token."""
    return (
        isinstance(value, list)
        and len(value) == 4
        and all(v is None or isinstance(v, str) for v in value[:2])
        and isinstance(value[2], list)
        and all(isinstance(a, str) for a in value[2])
        and isinstance(value[3], int)
    )


def _sourced_uses(value: Any) -> bool:
    """[[cluster, source, time, index]…] of one credential, at most
    MAX_SOURCES_PER_CREDENTIAL."""
    return (
        isinstance(value, list)
        and len(value) <= MAX_SOURCES_PER_CREDENTIAL
        and all(
            isinstance(u, list)
            and len(u) == 4
            and isinstance(u[0], str)
            and isinstance(u[1], str)
            and _number(u[2])
            and isinstance(u[3], int)
            and not isinstance(u[3], bool)
            for u in value
        )
    )


class BoundedMap:
    """A map of at most ``cap`` keys, least recently touched dropped first; ``dropped``
    counts the keys it had to forget. JSON values only."""

    def __init__(self, cap: int, valid: Callable[[Any], bool] = lambda value: True) -> None:
        self.cap = cap
        self.valid = valid
        self.items: OrderedDict[str, Any] = OrderedDict()
        self.dropped = 0

    def get(self, key: str) -> Any:
        return self.items.get(key)

    def put(self, key: str, value: Any) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.cap:
            self.items.popitem(last=False)
            self.dropped += 1

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[str]:
        return iter(self.items)

    def snapshot(self) -> dict[str, Any]:
        return {"items": [[k, v] for k, v in self.items.items()], "dropped": self.dropped}

    def restore(self, state: Any) -> None:
        """Take back a :meth:`snapshot`; an item that is not what this map holds is
        left out and counted as dropped."""
        self.items = OrderedDict()
        self.dropped = 0
        if not isinstance(state, dict):
            return
        items = state.get("items")
        for pair in items if isinstance(items, list) else []:
            if (
                isinstance(pair, list)
                and len(pair) == 2
                and isinstance(pair[0], str)
                and self.valid(pair[1])
            ):
                self.items[pair[0]] = pair[1]
            else:
                self.dropped += 1
        while len(self.items) > self.cap:
            self.items.popitem(last=False)
            self.dropped += 1
        self.dropped += _count(state.get("dropped"))


# -- the protocol and the common part --------------------------------------------------
class Detector(Protocol):
    name: str

    def observe(
        self, index: int, event: Mapping[str, Any], policy: AnomalySettings
    ) -> list[Finding]: ...

    def snapshot(self) -> dict[str, Any]: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...


def bounded_key(key: str) -> str:
    """A finding's key within MAX_KEY characters: a longer one (an attacker-written issuer,
    say) keeps its start and ends in the SHA-256 of the whole, so it stays stable and
    distinct, and never makes the Finding refuse to exist."""
    if len(key) <= MAX_KEY:
        return key
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{key[: MAX_KEY - len(digest) - 1]}#{digest}"


class _Base:
    """What every detector shares: the warm-up clock (the time of the first event it
    saw, and the latest), and the keys it reported recently (nothing fires twice for a
    key within its window)."""

    name = ""
    names: tuple[str, ...] = ()
    """The detector names whose settings this class uses (one class may report two)."""
    version = SNAPSHOT_VERSION
    """The version its snapshots carry."""
    compatible: tuple[int, ...] = (SNAPSHOT_VERSION,)
    """The snapshot versions it takes back (the common part at least)."""

    def __init__(self, cap: int = MAX_EDGES) -> None:
        self.first: float | None = None
        self.latest: float | None = None
        self.fired = BoundedMap(cap, _number)

    def observe(
        self, index: int, event: Mapping[str, Any], policy: AnomalySettings
    ) -> list[Finding]:
        """Every detector's way in: the event's time recorded on the detector's clock,
        then, if the detector is enabled, :meth:`_seen` with its settings."""
        settings = policy.of(self.name)
        t = self._clock(event)
        if t is None or not settings.enabled:
            return []
        return self._seen(index, event, settings, t)

    def _seen(
        self, index: int, event: Mapping[str, Any], settings: DetectorSettings, t: float
    ) -> list[Finding]:
        raise NotImplementedError

    def _clock(self, event: Mapping[str, Any]) -> float | None:
        """The event's time, recorded on the detector's clock whatever the event is
        about: the warm-up counts the log the detector has seen since its first event."""
        t = event_time(event)
        if t is not None:
            self._tick(t)
        return t

    def _tick(self, t: float) -> float:
        """Record ``t``; the detector's clock (the latest event time seen)."""
        if self.first is None or t < self.first:
            self.first = t
        self.latest = t if self.latest is None else max(self.latest, t)
        return self.latest

    def _warm(self, t: float, settings: DetectorSettings) -> bool:
        return self.first is not None and t - self.first >= settings.warmup

    def _may_fire(self, key: str, t: float, settings: DetectorSettings) -> bool:
        """Whether ``key`` may be reported at ``t`` (not reported in the last window);
        if so, it counts as reported from now."""
        last = self.fired.get(key)
        if isinstance(last, (int, float)) and t - last < max(settings.window, 0.0):
            return False
        self.fired.put(key, t)
        return True

    def _finding(
        self,
        detector: str,
        key: str,
        subject: dict[str, Any],
        summary: str,
        evidence: Iterable[int],
        severity: str,
        t: float,
        start: float,
        details: dict[str, Any],
    ) -> Finding:
        indexes = sorted(set(evidence))[-MAX_EVIDENCE:]
        return Finding(
            detector=detector,
            key=bounded_key(f"{detector}:{key}"),
            subject=subject,
            summary=printable(summary, MAX_SUMMARY),
            evidence=indexes,
            severity=severity,
            detected_at=t,
            window=(start, t),
            details=details,
        )

    def _base_snapshot(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "detector": self.name,
            "first": self.first,
            "latest": self.latest,
            "fired": self.fired.snapshot(),
        }

    def _base_restore(self, state: Mapping[str, Any]) -> bool:
        """Take back the common part; False (and a fresh state) when ``state`` is not
        a snapshot of this detector at a version it takes back."""
        version = state.get("version")
        if (
            not isinstance(version, int)
            or isinstance(version, bool)
            or version not in self.compatible
            or state.get("detector") != self.name
        ):
            self.first = self.latest = None
            self.fired.restore(None)
            return False
        first, latest = state.get("first"), state.get("latest")
        self.first = float(first) if isinstance(first, (int, float)) else None
        self.latest = float(latest) if isinstance(latest, (int, float)) else None
        self.fired.restore(state.get("fired"))
        return True

    def dropped(self) -> dict[str, int]:
        """Keys forgotten for lack of room, per map (for metrics and the docs' bounds)."""
        return {"fired": self.fired.dropped}


# -- 1. new edges ----------------------------------------------------------------------
class NewEdge(_Base):
    """A workload reaching a (source cluster -> target cluster) pair, or a service
    host, not seen within ``baseline_window``. Reaching is a token issued for the
    target cluster (each audience once) or a decision allowed at an agent of the target
    cluster (its ``host``: the service). Reported after ``warmup`` only; edges are
    learned during the warm-up too."""

    name = "new_edge"
    names = ("new_edge",)

    def __init__(self, cap: int = MAX_EDGES) -> None:
        super().__init__(cap)
        self.edges = BoundedMap(cap, _use)

    def _edges(self, event: Mapping[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        identity = _part(event, "identity")
        workload = _workload(identity)
        if workload is None:
            return []
        source = _text(identity.get("origin_cluster")) or _text(event.get("cluster"))
        found: list[tuple[str, str, dict[str, Any]]] = []
        kind = event.get("type")
        request = _part(event, "request")
        targets: list[str] = []
        if kind == "token.issued":
            targets = audience_clusters(request.get("audience"))
        elif kind == "authz.decision" and _part(event, "decision").get("allowed") is True:
            target = _text(event.get("cluster"))
            targets = [target] if target else []
            host = _text(request.get("host"))
            if host is not None:
                found.append(
                    (
                        f"{workload}|host:{host}",
                        "low",
                        {"workload": workload, "host": printable(host), "cluster": target},
                    )
                )
        if source is not None:
            for target in targets:
                if target != source:
                    found.append(
                        (
                            f"{workload}|{source}->{target}",
                            "medium",
                            {"workload": workload, "from": source, "to": target},
                        )
                    )
        return found

    def _seen(
        self, index: int, event: Mapping[str, Any], settings: DetectorSettings, t: float
    ) -> list[Finding]:
        findings = []
        for key, severity, facts in self._edges(event):
            last = self.edges.get(key)
            seen = last[0] if isinstance(last, list) and last else None
            self.edges.put(key, [t if seen is None else max(seen, t), index])
            if seen is not None and t - seen <= settings.baseline_window:
                continue
            if not self._warm(t, settings) or not self._may_fire(key, t, settings):
                continue
            what = f"{facts['from']} -> {facts['to']}" if "to" in facts else f"host {facts['host']}"
            since = "never seen" if seen is None else "not seen in the baseline window"
            findings.append(
                self._finding(
                    self.name,
                    key,
                    {"workload": facts["workload"]},
                    f"new edge: workload {facts['workload']} reached {what} ({since})",
                    [index],
                    "medium" if severity == "medium" else "low",
                    t,
                    t - settings.baseline_window,
                    {**facts, "last_seen": seen, "via": event.get("type")},
                )
            )
        return findings

    def snapshot(self) -> dict[str, Any]:
        return {**self._base_snapshot(), "edges": self.edges.snapshot()}

    def restore(self, state: Mapping[str, Any]) -> None:
        known = self._base_restore(state)
        self.edges.restore(state.get("edges") if known else None)

    def dropped(self) -> dict[str, int]:
        return {**super().dropped(), "edges": self.edges.dropped}


# -- 2./3. bursts ----------------------------------------------------------------------
class RateCounter:
    """Counts per key over a sliding ``window`` (``BUCKETS_PER_WINDOW`` buckets), and a
    baseline rate per key: an exponentially weighted rate with time constant
    ``baseline_window``, fed by the buckets as they leave the window (so the window's
    own count never raises its baseline). State per key (JSON):
    ``{"b": [[bucket_start, count]...], "r": rate_per_s, "u": rate_at, "e": [[t, index]...]}``."""

    def __init__(self, cap: int = MAX_KEYS) -> None:
        self.keys = BoundedMap(cap, _rate_state)

    def add(
        self, key: str, t: float, now: float, count: int, index: int, settings: DetectorSettings
    ) -> tuple[int, float, list[int]]:
        """Count ``count`` at ``t`` (the detector's clock is ``now``); the window's
        count, the count the baseline predicts for a window, the window's evidence."""
        window = max(settings.window, 1e-3)
        width = window / BUCKETS_PER_WINDOW
        tau = max(settings.baseline_window, window)
        state = self.keys.get(key)
        if not _rate_state(state):
            state = {"b": [], "r": 0.0, "u": t - window, "e": []}
        rate, updated = float(state["r"]), float(state["u"])
        kept = []
        start_of_window = now - window
        for start, n in sorted(state["b"]):
            if start + width <= start_of_window:  # left the window: into the baseline
                end = start + width
                if end > updated:
                    rate *= math.exp(-(end - updated) / tau)
                    updated = end
                rate += n / tau
            else:
                kept.append([start, n])
        bucket = math.floor(t / width) * width
        if bucket + width <= start_of_window:  # a late event, older than the window
            rate += count / tau
        else:
            for entry in kept:
                if entry[0] == bucket:
                    entry[1] += count
                    break
            else:
                kept.append([bucket, count])
        evidence = [e for e in state["e"] if e[0] > start_of_window][-(MAX_EVIDENCE - 1) :]
        evidence.append([t, index])
        state = {"b": kept, "r": rate, "u": updated, "e": evidence}
        self.keys.put(key, state)
        # decayed over the quiet time only: the span between the last bucket fed and the
        # start of the window (the window itself is the count being judged)
        expected = rate * math.exp(-max(start_of_window - updated, 0.0) / tau) * window
        in_window = sum(n for _, n in kept)
        return in_window, expected, [i for _, i in evidence]

    def snapshot(self) -> dict[str, Any]:
        return self.keys.snapshot()

    def restore(self, state: Any) -> None:
        self.keys.restore(state)


class _Burst(_Base):
    """A count per key in ``window`` above max(``threshold``, BASELINE_FACTOR x its
    baseline): see :class:`RateCounter`."""

    def __init__(self, cap: int = MAX_KEYS) -> None:
        super().__init__(cap)
        self.counter = RateCounter(cap)

    def _count(
        self,
        key: str,
        subject: dict[str, Any],
        what: str,
        t: float,
        now: float,
        count: int,
        index: int,
        settings: DetectorSettings,
    ) -> Finding | None:
        in_window, expected, evidence = self.counter.add(key, t, now, count, index, settings)
        limit = max(float(settings.threshold), BASELINE_FACTOR * expected)
        if in_window <= limit or not self._warm(t, settings):
            return None
        if not self._may_fire(key, t, settings):
            return None
        severity: str = "high" if in_window > 10 * limit else "medium"
        return self._finding(
            self.name,
            key,
            subject,
            f"{in_window} {what} in {settings.window:g} s "
            f"(threshold {settings.threshold}, baseline {expected:.1f} a window)",
            evidence,
            severity,
            t,
            t - settings.window,
            {
                "count": in_window,
                "threshold": settings.threshold,
                "baseline": round(expected, 3),
                "factor": BASELINE_FACTOR,
            },
        )

    def snapshot(self) -> dict[str, Any]:
        return {**self._base_snapshot(), "counts": self.counter.snapshot()}

    def restore(self, state: Mapping[str, Any]) -> None:
        known = self._base_restore(state)
        self.counter.restore(state.get("counts") if known else None)

    def dropped(self) -> dict[str, int]:
        return {**super().dropped(), "counts": self.counter.keys.dropped}


def _is_denial(decision: Mapping[str, Any]) -> bool:
    """A decision that refused: not ``no opinion`` (a SubjectAccessReview the engine
    left to others is not a denial)."""
    reason = decision.get("reason")
    no_opinion = isinstance(reason, str) and reason.startswith("no opinion")
    return decision.get("allowed") is False and not no_opinion


class DenialBurst(_Burst):
    """Denials (``authz.decision`` with ``allowed: false``, unauthenticated ones
    included) per identity (SPIFFE ID, or the person ``user:NAME``) and per cluster (the
    agent's); an agent's ``audit.refusals_folded`` adds its ``folded`` and dropped
    counts to its cluster."""

    name = "denial_burst"
    names = ("denial_burst",)

    def _seen(
        self, index: int, event: Mapping[str, Any], settings: DetectorSettings, t: float
    ) -> list[Finding]:
        kind = event.get("type")
        cluster = _text(event.get("cluster"))
        counts: list[tuple[str, dict[str, Any], str, int]] = []
        if kind == "authz.decision":
            if not _is_denial(_part(event, "decision")):
                return []
            identity = _part(event, "identity")
            who = _text(identity.get("spiffe_id"))
            actor = _text(event.get("actor"))
            if who is None and actor is not None and actor.startswith("user:"):
                who = actor
            if who is not None:
                subject = {"user": who} if who.startswith("user:") else {"spiffeId": who}
                counts.append((f"identity:{who}", subject, f"denials for {who}", 1))
            if cluster is not None:
                counts.append(
                    (f"cluster:{cluster}", {"cluster": cluster}, f"denials in {cluster}", 1)
                )
        elif kind == "audit.refusals_folded" and cluster is not None:
            detail = _part(event, "detail")
            if detail.get("folded_type") != "authz.decision":
                return []
            n = _count(detail.get("folded")) + _count(_part(detail, "dropped").get("count"))
            if n:
                counts.append(
                    (f"cluster:{cluster}", {"cluster": cluster}, f"denials in {cluster}", n)
                )
        if not counts:
            return []
        now = self._tick(t)
        found = [self._count(k, s, w, t, now, n, index, settings) for k, s, w, n in counts]
        return [f for f in found if f is not None]


class RefusalBurst(_Burst):
    """Refused exchanges (``token.exchange_failed``, and the control plane's
    ``audit.refusals_folded`` by claimed issuer) per claimed cluster issuer: forged or
    stolen service-account tokens. A refusal that claims no issuer is not counted."""

    name = "refusal_burst"
    names = ("refusal_burst",)

    def _seen(
        self, index: int, event: Mapping[str, Any], settings: DetectorSettings, t: float
    ) -> list[Finding]:
        kind = event.get("type")
        detail = _part(event, "detail")
        by_issuer: dict[str, int] = {}
        if kind == "token.exchange_failed":
            issuer = _text(_part(detail, "claimed").get("iss"))
            if issuer is not None:
                by_issuer[issuer] = 1
        elif kind == "audit.refusals_folded":
            if detail.get("folded_type") != "token.exchange_failed":
                return []
            for part in (detail, _part(detail, "dropped")):
                values = _part(_part(_part(part, "by"), "issuer"), "values")
                for issuer, n in values.items():
                    if isinstance(issuer, str) and issuer and _count(n):
                        by_issuer[issuer] = by_issuer.get(issuer, 0) + _count(n)
        if not by_issuer:
            return []
        now = self._tick(t)
        findings = []
        for issuer, n in sorted(by_issuer.items()):
            shown = printable(issuer)
            found = self._count(
                f"issuer:{issuer}",
                {"issuer": shown},
                f"refused exchanges claiming issuer {shown}",
                t,
                now,
                n,
                index,
                settings,
            )
            if found is not None:
                findings.append(found)
        return findings


# -- 3. tokens presented to the wrong cluster ------------------------------------------
WRONG_AUDIENCE = "unauthenticated: wrong_audience"


class WrongCluster(_Base):
    """A JWT-SVID presented at an agent of a cluster not in its audience: the agent
    refuses it ``unauthenticated: wrong_audience`` with only the token's SHA-256, which
    joins it to its ``token.issued`` (``detail.issued_token_sha256``) when that is
    still remembered — then the finding names the workload and the token's audiences.
    An agent's ``audit.refusals_folded`` counting ``wrong_audience`` refusals is a
    finding about the cluster when it counts ``threshold`` or more."""

    name = "wrong_cluster"
    names = ("wrong_cluster",)

    def __init__(self, cap: int = MAX_EDGES) -> None:
        super().__init__(cap)
        self.issued = BoundedMap(cap, _issuance)

    def _seen(
        self, index: int, event: Mapping[str, Any], settings: DetectorSettings, t: float
    ) -> list[Finding]:
        kind = event.get("type")
        if kind == "token.issued":
            identity = _part(event, "identity")
            digest = _text(_part(event, "detail").get("issued_token_sha256"))
            if digest is not None:
                audiences = audience_clusters(_part(event, "request").get("audience"))
                self.issued.put(
                    digest, [_workload(identity), identity.get("spiffe_id"), audiences, index]
                )
            return []
        cluster = _text(event.get("cluster"))
        if cluster is None:
            return []
        if kind == "authz.decision" and _part(event, "decision").get("reason") == WRONG_AUDIENCE:
            return self._refused(index, event, cluster, t, settings)
        if kind == "audit.refusals_folded":
            detail = _part(event, "detail")
            if detail.get("folded_type") != "authz.decision":
                return []
            n = 0
            for part in (detail, _part(detail, "dropped")):
                n += _count(
                    _part(_part(_part(part, "by"), "error"), "values").get("wrong_audience")
                )
            if n < max(settings.threshold, 1) or not self._warm(t, settings):
                return []
            key = f"cluster:{cluster}"
            if not self._may_fire(key, t, settings):
                return []
            return [
                self._finding(
                    self.name,
                    key,
                    {"cluster": cluster},
                    f"{n} tokens for other clusters presented at agents of {cluster} (folded)",
                    [index],
                    "medium",
                    t,
                    t - settings.window,
                    {"cluster": cluster, "count": n},
                )
            ]
        return []

    def _refused(
        self,
        index: int,
        event: Mapping[str, Any],
        cluster: str,
        t: float,
        settings: DetectorSettings,
    ) -> list[Finding]:
        digest = _text(_part(event, "identity").get("token_sha256"))
        known = self.issued.get(digest) if digest is not None else None
        if not self._warm(t, settings):
            return []
        if isinstance(known, list) and len(known) == 4:
            workload, spiffe_id, audiences, issued_at = known
            key = f"{spiffe_id or workload}|{cluster}"
            subject: dict[str, Any] = {"workload": workload} if workload else {}
            if spiffe_id and not workload:
                subject = {"spiffeId": spiffe_id}
            summary = (
                f"a token of {workload or spiffe_id} for {', '.join(audiences) or 'no cluster'} "
                f"was presented at an agent of {cluster}"
            )
            evidence = [issued_at, index] if isinstance(issued_at, int) else [index]
            details = {"cluster": cluster, "audiences": audiences, "token_sha256": digest}
        else:
            key = f"token:{digest or 'unknown'}|{cluster}"
            subject = {"cluster": cluster}
            summary = f"a token for another cluster (issuance not known) was presented at {cluster}"
            evidence = [index]
            details = {"cluster": cluster, "token_sha256": digest}
        if not self._may_fire(key, t, settings):
            return []
        return [
            self._finding(
                self.name,
                key,
                subject,
                summary,
                evidence,
                "medium",
                t,
                t - settings.window,
                details,
            )
        ]

    def snapshot(self) -> dict[str, Any]:
        return {**self._base_snapshot(), "issued": self.issued.snapshot()}

    def restore(self, state: Mapping[str, Any]) -> None:
        known = self._base_restore(state)
        self.issued.restore(state.get("issued") if known else None)

    def dropped(self) -> dict[str, int]:
        return {**super().dropped(), "issued": self.issued.dropped}


# -- 4. dormant identities, concurrent credentials -------------------------------------
def _used_identity(event: Mapping[str, Any]) -> str | None:
    """The SPIFFE ID a use is of: a credential issued for it, or a decision about its
    verified credential (one that carries ``jti`` or an X.509 serial)."""
    kind = event.get("type")
    identity = _part(event, "identity")
    spiffe_id = _text(identity.get("spiffe_id"))
    if kind in ("token.issued", "svid.issued"):
        return spiffe_id
    if kind == "authz.decision" and (identity.get("jti") or identity.get("x509_serial")):
        return spiffe_id
    return None


class DormantUse(_Base):
    """An identity used after more than ``baseline_window`` without use (from its
    previous use seen in the log)."""

    name = "dormant_use"
    names = ("dormant_use",)

    def __init__(self, cap: int = MAX_EDGES) -> None:
        super().__init__(cap)
        self.last = BoundedMap(cap, _use)

    def _seen(
        self, index: int, event: Mapping[str, Any], settings: DetectorSettings, t: float
    ) -> list[Finding]:
        spiffe_id = _used_identity(event)
        if spiffe_id is None:
            return []
        previous = self.last.get(spiffe_id)
        self.last.put(
            spiffe_id,
            [t, index] if not isinstance(previous, list) or t >= previous[0] else previous,
        )
        if not isinstance(previous, list) or t - previous[0] <= settings.baseline_window:
            return []
        if not self._warm(t, settings) or not self._may_fire(spiffe_id, t, settings):
            return []
        idle = t - previous[0]
        return [
            self._finding(
                self.name,
                spiffe_id,
                {"spiffeId": spiffe_id},
                f"{spiffe_id} used after {idle:.0f} s without use "
                f"(baseline window {settings.baseline_window:g} s)",
                [int(previous[1]), index],
                "medium",
                t,
                float(previous[0]),
                {"idle": round(idle, 3), "last_used": previous[0], "via": event.get("type")},
            )
        ]

    def snapshot(self) -> dict[str, Any]:
        return {**self._base_snapshot(), "last": self.last.snapshot()}

    def restore(self, state: Mapping[str, Any]) -> None:
        known = self._base_restore(state)
        self.last.restore(state.get("last") if known else None)

    def dropped(self) -> dict[str, int]:
        return {**super().dropped(), "last": self.last.dropped}


class ConcurrentUse(_Base):
    """One credential — a JWT-SVID's ``jti``, an X.509-SVID's serial — presented from two
    different places at once: in decisions of agents of two different clusters within
    ``window``, each with a caller address (``request.source``), and the addresses
    differ. A credential is bound to the one workload instance it was issued to: the
    same credential from one address at two clusters (a token with several audiences,
    one workload's X.509-SVID calling two clusters) is that workload, and a decision
    without an address (a Kubernetes webhook, an agent older than ``request.source``)
    says nothing about where the credential is.

    Per credential it keeps the latest use of each (cluster, source) seen, at most
    :data:`MAX_SOURCES_PER_CREDENTIAL`, the oldest dropped first."""

    name = "concurrent_use"
    names = ("concurrent_use",)
    version = CONCURRENT_SNAPSHOT_VERSION
    compatible = (SNAPSHOT_VERSION, CONCURRENT_SNAPSHOT_VERSION)

    def __init__(self, cap: int = MAX_EDGES) -> None:
        super().__init__(cap)
        self.uses = BoundedMap(cap, _sourced_uses)

    def _seen(
        self, index: int, event: Mapping[str, Any], settings: DetectorSettings, t: float
    ) -> list[Finding]:
        if event.get("type") != "authz.decision":
            return []
        identity = _part(event, "identity")
        cluster = _text(event.get("cluster"))
        # an agent writes it canonical; read again, so nothing else lands in a finding
        source = caller_address(_part(event, "request").get("source"))
        jti, serial = _text(identity.get("jti")), _text(identity.get("x509_serial"))
        if cluster is None or source is None or (jti is None and serial is None):
            return []
        credential = f"jti:{jti}" if jti is not None else f"x509:{serial}"
        seen = self.uses.get(credential)
        uses: list[list[Any]] = list(seen) if isinstance(seen, list) else []
        others = [
            use
            for use in uses
            if use[0] != cluster and use[1] != source and abs(t - use[2]) <= settings.window
        ]
        self.uses.put(credential, _with_use(uses, [cluster, source, t, index]))
        if not others or not self._warm(t, settings):
            return []
        if not self._may_fire(credential, t, settings):
            return []
        both = sorted([[cluster, source, t, index], *others], key=lambda use: use[3])
        where = sorted({str(use[0]) for use in both})
        sources = sorted({str(use[1]) for use in both})
        spiffe_id = _text(identity.get("spiffe_id"))
        return [
            self._finding(
                self.name,
                credential,
                {"spiffeId": spiffe_id} if spiffe_id else {"cluster": cluster},
                f"credential {printable(credential, 80)} of {spiffe_id or 'an unknown identity'} "
                f"presented from {', '.join(sources)} at agents of "
                f"{', '.join(printable(c, 80) for c in where)} within {settings.window:g} s",
                [int(use[3]) for use in both],
                "high",
                t,
                min(float(use[2]) for use in both),
                {
                    "credential": credential,
                    "clusters": [printable(c, 100) for c in where],
                    "sources": sources,
                    "uses": [
                        {"cluster": printable(use[0], 100), "source": use[1], "index": use[3]}
                        for use in both
                    ],
                },
            )
        ]

    def snapshot(self) -> dict[str, Any]:
        return {**self._base_snapshot(), "uses": self.uses.snapshot()}

    def restore(self, state: Mapping[str, Any]) -> None:
        """A snapshot of version 1 (uses without a source, which can never make a
        finding now) keeps its clock and the keys it reported; its uses are left out."""
        known = self._base_restore(state)
        current = known and state.get("version") == self.version
        self.uses.restore(state.get("uses") if current else None)

    def dropped(self) -> dict[str, int]:
        return {**super().dropped(), "uses": self.uses.dropped}


def _with_use(uses: list[list[Any]], use: list[Any]) -> list[list[Any]]:
    """``uses`` with ``use`` as the latest of its (cluster, source) — a late entry older
    than the one held leaves it — at most MAX_SOURCES_PER_CREDENTIAL, the oldest
    dropped first."""
    place = (use[0], use[1])
    held = next((u for u in uses if (u[0], u[1]) == place), None)
    kept = [u for u in uses if (u[0], u[1]) != place]
    kept.append(use if held is None or use[2] >= held[2] else held)
    while len(kept) > MAX_SOURCES_PER_CREDENTIAL:
        kept.remove(min(kept, key=lambda u: u[2]))
    return kept


# -- all of them -----------------------------------------------------------------------
def all_detectors() -> list[Detector]:
    """A fresh instance of every event detector (``escalation`` reads policy diffs and
    is not here)."""
    return [NewEdge(), DenialBurst(), RefusalBurst(), WrongCluster(), DormantUse(), ConcurrentUse()]


def observe_all(
    detectors: Iterable[Detector],
    entries: Iterable[tuple[int, Mapping[str, Any]]],
    policy: AnomalySettings,
) -> list[Finding]:
    """Feed ``entries`` (index, event), in index order, to every detector; their
    findings in order."""
    listed = list(detectors)
    findings: list[Finding] = []
    for index, event in entries:
        for detector in listed:
            findings.extend(detector.observe(index, event, policy))
    return findings
