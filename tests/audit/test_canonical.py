"""Canonical event bytes: RFC 8785 (JCS) output for our value subset, and clear
refusals of everything outside it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from audit_vectors import load
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.audit.canonical import (
    MAX_SAFE_INTEGER,
    canonical_bytes,
    format_time,
    parse_time,
    slow_canonical_bytes,
)
from trustmesh.common.errors import CanonicalError

CASES = load("canonical.json")["cases"]


@pytest.mark.parametrize("case", CASES, ids=[c["desc"][:40] for c in CASES])
def test_canonical_vector(case: dict[str, Any]) -> None:
    assert canonical_bytes(case["input"]) == case["output_utf8"].encode("utf-8")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER)
    | st.text(alphabet=st.characters(codec="utf-8")),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(alphabet=st.characters(codec="utf-8")), children, max_size=4)
    ),
    max_leaves=20,
)
events = st.dictionaries(st.text(alphabet=st.characters(codec="utf-8")), json_values, max_size=6)


@given(events)
def test_output_is_json_that_parses_back_to_the_event(event: dict[str, Any]) -> None:
    assert json.loads(canonical_bytes(event)) == event


@given(events)
def test_member_order_in_the_input_does_not_matter(event: dict[str, Any]) -> None:
    reversed_event = dict(reversed(list(event.items())))
    assert canonical_bytes(reversed_event) == canonical_bytes(event)


@given(events)
def test_output_is_a_fixed_point(event: dict[str, Any]) -> None:
    once = canonical_bytes(event)
    assert canonical_bytes(json.loads(once)) == once


@given(events)
def test_matches_the_rfc8785_reference_package(event: dict[str, Any]) -> None:
    rfc8785 = pytest.importorskip("rfc8785", reason="pip install rfc8785 for the JCS cross-check")
    assert canonical_bytes(event) == rfc8785.dumps(event)


ascii_events = st.dictionaries(
    st.text(alphabet=st.characters(codec="ascii")), json_values, max_size=6
)


@given(ascii_events)
def test_fast_path_matches_the_reference_writer_and_rfc8785(event: dict[str, Any]) -> None:
    """ASCII keys take the orjson path; it must equal the pure-Python writer and JCS."""
    rfc8785 = pytest.importorskip("rfc8785", reason="pip install rfc8785 for the JCS cross-check")
    fast = canonical_bytes(event)
    assert fast == slow_canonical_bytes(event) == rfc8785.dumps(event)


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({"t": 1.5}, r"event\.t: float 1\.5 is not allowed"),
        ({"t": 1.0}, "float"),
        ({"t": float("nan")}, "float nan"),
        ({"t": float("inf")}, "float inf"),
        ({"a": {"b": [0, 2.5]}}, r"event\.a\.b\[1\]: float"),
        ({"a": {1: "x"}}, r"event\.a: object key 1 is a int, keys must be strings"),
        ({"n": 2**53}, "outside"),
        ({"n": -(2**53)}, "outside"),
        ({"b": b"bytes"}, "a bytes has no JSON form"),
        ({"s": {1, 2}}, "a set has no JSON form"),
        ({"t": datetime(2025, 1, 1, tzinfo=UTC)}, "a datetime has no JSON form"),
        ({"s": "lone \ud800 surrogate"}, "lone surrogate"),
        ({"\udc00": 1}, "lone surrogate"),
    ],
)
def test_values_outside_the_subset_are_refused(event: dict[Any, Any], message: str) -> None:
    with pytest.raises(CanonicalError, match=message):
        canonical_bytes(event)


def test_top_level_must_be_an_object() -> None:
    with pytest.raises(CanonicalError, match="JSON object"):
        canonical_bytes([1, 2])  # type: ignore[arg-type]


def test_depth_is_limited() -> None:
    deep: dict[str, Any] = {}
    cursor = deep
    for _ in range(70):
        cursor["x"] = {}
        cursor = cursor["x"]
    with pytest.raises(CanonicalError, match="nested deeper"):
        canonical_bytes(deep)


def test_times_are_rfc3339_utc_milliseconds() -> None:
    moment = datetime(2025, 1, 2, 4, 4, 5, 678_901, tzinfo=timezone(timedelta(hours=1)))
    assert format_time(moment) == "2025-01-02T03:04:05.678Z"
    assert parse_time("2025-01-02T03:04:05.678Z") == datetime(
        2025, 1, 2, 3, 4, 5, 678_000, tzinfo=UTC
    )


@pytest.mark.parametrize(
    "text",
    [
        "2025-01-02T03:04:05Z",
        "2025-01-02T03:04:05.678+00:00",
        "2025-01-02 03:04:05.678Z",
        "2025-02-30T00:00:00.000Z",
    ],
)
def test_other_time_spellings_are_refused(text: str) -> None:
    with pytest.raises(CanonicalError):
        parse_time(text)


def test_naive_times_are_refused() -> None:
    with pytest.raises(CanonicalError, match="timezone-aware"):
        format_time(datetime(2025, 1, 1))


@given(st.datetimes(timezones=st.just(UTC)))
def test_time_order_is_string_order(moment: datetime) -> None:
    later = moment + timedelta(milliseconds=1)
    if later.year > 9999 or moment.year < 1000:
        return
    assert format_time(moment) < format_time(later)
    assert parse_time(format_time(moment)) == moment.replace(
        microsecond=moment.microsecond // 1000 * 1000
    )
