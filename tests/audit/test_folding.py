"""Folding refusals (``audit/folding.py``) on a clock the test chooses: whatever the
callers send, the events written stay bounded by the window's quota plus one summary,
and individual events, folded counts and dropped counts add up exactly to the
refusals seen; every summary is a valid event of the one schema."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.audit import events as ev
from trustmesh.audit.folding import (
    MAX_TRACKED,
    FoldingLimits,
    Refusal,
    RefusalFolder,
    Summary,
    fitted,
    source_address,
)
from trustmesh.common.errors import EventError

CP = {"kind": "control-plane", "id": "replica-1"}
AGENT = {"kind": "agent", "id": "spool-1", "agent": "a1", "seq": 1}
LIMITS = FoldingLimits(window=10.0, quota=20, per_source=5)


def summary_event(summary: Summary, limits: FoldingLimits, at: float, top: int = 8) -> Any:
    return ev.new_event(
        ev.REFUSALS_FOLDED,
        source=CP,
        actor="system",
        detail=summary.detail(ev.TOKEN_EXCHANGE_FAILED, limits, top),
        at=at,
    )


@dataclass
class Writer:
    """What a control-plane replica does with the verdicts: write, or fail to."""

    folder: RefusalFolder
    limits: FoldingLimits
    individual: list[tuple[float, Refusal]] = field(default_factory=list)
    summaries: list[dict[str, Any]] = field(default_factory=list)

    def summarise(self, summary: Summary | None, at: float, fails: bool = False) -> None:
        if summary is None:
            return
        if fails:
            self.folder.unwritten(summary)
            return
        event = summary_event(summary, self.limits, at)
        ev.check_event(event)  # the schema holds it, counts included
        self.summaries.append(event["detail"])

    def refuse(self, at: float, refusal: Refusal, fails: bool = False) -> None:
        if self.folder.owed and not fails:
            self.summarise(self.folder.take_dropped(), at)
        verdict = self.folder.observe(at, refusal)
        self.summarise(verdict.due, at, fails)
        if verdict.individual:
            if fails:
                self.folder.drop(at, refusal)
            else:
                self.individual.append((at, refusal))

    @property
    def folded(self) -> int:
        return sum(s["folded"] for s in self.summaries)

    @property
    def dropped(self) -> int:
        return sum(s.get("dropped", {}).get("count", 0) for s in self.summaries)


def refusal(address: str = "192.0.2.1", issuer: str | None = None, n: int = 0) -> Refusal:
    return Refusal(
        error="invalid_grant",
        reason="invalid_grant: token expired",
        surface="token",
        address=address,
        issuer=issuer,
        token_sha256=ev.token_sha256(f"token-{n}"),
    )


def test_a_single_refusal_is_an_individual_event() -> None:
    writer = Writer(RefusalFolder(LIMITS), LIMITS)
    writer.refuse(1000.0, refusal())
    writer.summarise(writer.folder.flush(), 1000.0)
    assert len(writer.individual) == 1 and writer.summaries == []


def test_a_flood_from_one_source_is_five_events_and_one_exact_summary() -> None:
    writer = Writer(RefusalFolder(LIMITS), LIMITS)
    for n in range(10_000):
        writer.refuse(1000.0 + n * 0.0005, refusal(n=n))  # 5 s: one window
    assert len(writer.individual) == 5
    assert writer.summaries == []  # the window is still open
    writer.summarise(writer.folder.due(1010.0), 1010.0)
    (summary,) = writer.summaries
    assert summary["folded"] == 9_995 and summary["folded_type"] == "token.exchange_failed"
    assert summary["by"]["address"] == {"values": {"192.0.2.1": 9_995}}
    assert summary["by"]["error"] == {"values": {"invalid_grant": 9_995}}
    assert "issuer" not in summary["by"]  # no refusal claimed one
    assert len(summary["sample_token_sha256"]) == 5
    assert summary["first"] < summary["last"]
    assert summary["limits"] == {"window_ms": 10_000, "quota": 20, "per_source": 5}


def test_per_source_per_issuer_and_the_quota() -> None:
    writer = Writer(RefusalFolder(LIMITS), LIMITS)
    # 10 addresses, one claimed issuer: the issuer's 5 go first
    for n in range(10):
        writer.refuse(1000.0, refusal(address=f"192.0.2.{n}", issuer="https://victim", n=n))
    assert len(writer.individual) == 5
    # 100 addresses, no issuer: 5 already written; the quota of 20 stops the rest
    for n in range(100):
        writer.refuse(1001.0, refusal(address=f"198.51.100.{n}", n=n))
    assert len(writer.individual) == 20
    # an IPv6 host varying its address inside its /64 is one source
    writer.summarise(writer.folder.flush(), 1002.0)
    for n in range(10):
        writer.refuse(2000.0, refusal(address=source_address(f"2001:db8::{n + 1:x}") or ""))
    assert len(writer.individual) == 25
    assert source_address("2001:db8::1") == "2001:db8::/64"
    assert source_address("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_address(None) is None


def test_values_are_bounded_in_memory_and_in_the_summary() -> None:
    writer = Writer(RefusalFolder(LIMITS), LIMITS)
    for n in range(2_000):
        writer.refuse(1000.0, refusal(issuer=f"https://{n}.example/" + "\x1b[2J" * 100, n=n))
    writer.summarise(writer.folder.flush(), 1000.0)
    (summary,) = writer.summaries
    issuers = summary["by"]["issuer"]
    assert len(issuers["values"]) == 8
    assert sum(issuers["values"].values()) + issuers["others"] == summary["folded"] == 1_995
    for value in issuers["values"]:
        assert "\x1b" not in value and len(value.encode()) <= 200
    tally = writer.folder._folded
    assert all(len(values) <= MAX_TRACKED for values in tally.values.values())


def test_summaries_shrink_to_fit_and_keep_exact_counts() -> None:
    folder = RefusalFolder(LIMITS)
    for n in range(400):
        folder.observe(1000.0, refusal(issuer=f"https://{n}.example/" + "é" * 200, n=n))
    summary = folder.flush()
    assert summary is not None
    event = fitted(lambda top: summary_event(summary, LIMITS, 1000.0, top), 2_000)
    ev.check_event(event)
    issuers = event["detail"]["by"]["issuer"]
    assert len(issuers.get("values", {})) < 8
    assert sum(issuers.get("values", {}).values()) + issuers["others"] == 395
    assert len(ev.check_event(event)) <= 2_000


def test_a_summary_that_cannot_be_written_is_counted_as_dropped_in_the_next() -> None:
    writer = Writer(RefusalFolder(LIMITS), LIMITS)
    for n in range(50):
        writer.refuse(1000.0, refusal(n=n))
    # the window ends while the log cannot be written: its summary is not lost count of
    writer.refuse(1011.0, refusal(address="203.0.113.9"), fails=True)
    assert writer.folder.owed and writer.folder.dropped_total == 46
    writer.refuse(1012.0, refusal(address="203.0.113.10"))
    (summary,) = writer.summaries
    assert summary["folded"] == 0 and summary["dropped"]["count"] == 46
    assert summary["dropped"]["by"]["address"]["values"] == {"192.0.2.1": 45, "203.0.113.9": 1}
    assert len(writer.individual) == 6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(folded=d["folded"] + 1), "counts"),
        (lambda d: d["by"]["error"].update(others=1), "counts"),
        (lambda d: d.update(folded_type="authz.decision"), "folded_type"),
        (lambda d: d.update(sample_token_sha256=["not-a-hash"]), "SHA-256"),
        (lambda d: d.update(last="1970-01-01T00:00:00.000Z"), "before"),
        (lambda d: d.update(folded=-1), "at least 0"),
    ],
)
def test_the_schema_checks_that_a_summary_adds_up(change: Any, message: str) -> None:
    folder = RefusalFolder(LIMITS)
    for n in range(30):
        folder.observe(1000.0 + n, refusal(n=n))
    summary = folder.flush()
    assert summary is not None
    event = summary_event(summary, LIMITS, 1030.0)
    ev.check_event(event)
    change(event["detail"])
    with pytest.raises(EventError, match=message):
        ev.check_event(event)
    agent_event = summary_event(summary, LIMITS, 1030.0)
    agent_event["source"] = AGENT
    with pytest.raises(EventError, match=r"folded_type must be authz\.decision"):
        ev.check_event(agent_event)


def test_limits_are_checked() -> None:
    for bad in ({"window": 0}, {"quota": 0}, {"per_source": 0}):
        with pytest.raises(ValueError):
            FoldingLimits(**bad)  # type: ignore[arg-type]


STEP = st.tuples(
    st.floats(min_value=0, max_value=4, allow_nan=False),  # seconds since the previous one
    st.integers(0, 6),  # address
    st.one_of(st.none(), st.integers(0, 3)),  # claimed issuer
    st.sampled_from(["invalid_grant", "invalid_request", "invalid_target"]),
    st.booleans(),  # the write fails
)


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(STEP, max_size=300),
    window=st.sampled_from([1.0, 5.0, 10.0]),
    quota=st.integers(1, 12),
    per_source=st.integers(1, 6),
)
def test_every_refusal_is_accounted_for_exactly_and_the_events_are_bounded(
    steps: list[tuple[float, int, int | None, str, bool]],
    window: float,
    quota: int,
    per_source: int,
) -> None:
    limits = FoldingLimits(window=window, quota=quota, per_source=per_source)
    writer = Writer(RefusalFolder(limits), limits)
    now = 1_000_000.0
    start: float | None = None  # the open window, as the module docstring defines it
    written: dict[tuple[float, str], int] = {}
    for n, (delta, address, issuer, error, fails) in enumerate(steps):
        now += delta
        opens = start is None or now >= start + window
        if opens:
            start = now
        assert start is not None
        before = writer.folder.dropped_total + len(writer.individual) + writer.folder.folded_total
        individual = len(writer.individual)
        writer.refuse(
            now,
            Refusal(
                error=error,
                reason=f"{error}: #{n % 3}",
                surface="token",
                address=f"192.0.2.{address}",
                issuer=None if issuer is None else f"https://issuer-{issuer}",
                token_sha256=ev.token_sha256(str(n)),
            ),
            fails,
        )
        folded = writer.folder.folded_total + len(writer.individual) + writer.folder.dropped_total
        assert folded > before
        if opens and not fails:  # the first refusal of a window is always its own event
            assert len(writer.individual) == individual + 1
        if len(writer.individual) > individual:
            for key in ((start, f"192.0.2.{address}"), (start, "")):
                written[key] = written.get(key, 0) + 1
            assert written[(start, f"192.0.2.{address}")] <= per_source
            assert written[(start, "")] <= quota
    writer.summarise(writer.folder.flush(), now)
    held = writer.folder.pending()
    assert held["folded"] == 0
    accounted = len(writer.individual) + writer.folded + writer.dropped + held["dropped"]
    assert accounted == len(steps)
    assert writer.folder.folded_total >= writer.folded
