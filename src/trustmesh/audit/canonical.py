"""Canonical JSON bytes of an audit event: the exact bytes the Merkle log hashes.

The reference is RFC 8785, the JSON Canonicalization Scheme (JCS): no
whitespace, object members sorted by the UTF-16 code units of their names
(§3.2.3), strings escaped as ECMAScript's ``JSON.stringify`` does (§3.2.2.2),
UTF-8 output (§3.2.4). For the values events hold -- strings, integers,
booleans, null, objects and arrays -- this module's output is byte-for-byte the
JCS output.

Numbers are where JCS is subtle (§3.2.2.3 serialises every number as an IEEE 754
double in ECMAScript's shortest form), so events carry none that need it:

* floats, NaN and infinities are rejected;
* integers must be within ±(2**53 - 1) (I-JSON, RFC 7493 §2.2), where the
  double and decimal forms coincide;
* times are strings: RFC 3339 in UTC with exactly millisecond precision and a
  ``Z`` suffix (``2025-01-02T03:04:05.678Z``; see :func:`format_time`). Text,
  unlike epoch numbers, reads at a glance in a log dump, and fixed width keeps
  string order equal to time order.

Anything else -- bytes, sets, datetimes, non-string object keys, lone
surrogates -- raises :class:`CanonicalError` naming where in the event it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from trustmesh.common.errors import CanonicalError

MAX_SAFE_INTEGER = 2**53 - 1
"""The largest integer a JSON number holds exactly in every implementation (RFC 7493 §2.2)."""

MAX_DEPTH = 64

_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f]')
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    return _ESCAPES.get(ch) or f"\\u{ord(ch):04x}"


def _string(value: str, where: str) -> str:
    # JCS §3.2.2.2: only '"', '\' and C0 controls are escaped; the short forms
    # where ECMAScript has them, else \u00xx in lowercase hex. Everything else,
    # including U+2028/U+2029 and non-ASCII, is written as UTF-8.
    if _SURROGATE.search(value):
        raise CanonicalError(f"{where}: string contains a lone surrogate, not valid Unicode")
    return '"' + _NEEDS_ESCAPE.sub(_escape, value) + '"'


def _utf16_key(name: str) -> bytes:
    return name.encode("utf-16-be")


def _serialise(value: object, where: str, depth: int, out: list[str]) -> None:
    if depth > MAX_DEPTH:
        raise CanonicalError(f"{where}: nested deeper than {MAX_DEPTH} levels")
    # bool before int: bool is a subclass of int in Python.
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise CanonicalError(
                f"{where}: integer {value} is outside ±(2**53 - 1); send it as a string"
            )
        out.append(str(int(value)))
    elif isinstance(value, float):
        raise CanonicalError(
            f"{where}: float {value!r} is not allowed; use an integer, or a string "
            "(times are RFC 3339 strings)"
        )
    elif isinstance(value, str):
        out.append(_string(value, where))
    elif isinstance(value, Mapping):
        for key in value:
            if not isinstance(key, str):
                raise CanonicalError(
                    f"{where}: object key {key!r} is a {type(key).__name__}, keys must be strings"
                )
            if _SURROGATE.search(key):
                raise CanonicalError(f"{where}: object key contains a lone surrogate")
        out.append("{")
        # JCS §3.2.3: members sorted by the UTF-16 code units of their names.
        for i, key in enumerate(sorted(value, key=_utf16_key)):
            if i:
                out.append(",")
            out.append(_string(key, f"{where} key"))
            out.append(":")
            _serialise(value[key], f"{where}.{key}", depth + 1, out)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _serialise(item, f"{where}[{i}]", depth + 1, out)
        out.append("]")
    else:
        raise CanonicalError(
            f"{where}: a {type(value).__name__} has no JSON form here; "
            "convert it to a string, integer, boolean, null, object or array"
        )


def _plain(event: dict[str, Any]) -> bool:
    """True when orjson's sorted output is the JCS output: only dicts with ASCII string
    keys (where code-point order is UTF-16 order), lists, strings, safe integers,
    booleans and null. Anything else goes the slow way, which names the problem.
    Iterative, with exact type checks: this runs for every event the log takes."""
    stack: list[tuple[Any, int]] = [(event, 0)]
    while stack:
        container, depth = stack.pop()
        if depth >= MAX_DEPTH:
            return False
        if type(container) is dict:
            for key in container:
                if type(key) is not str or not key.isascii():
                    return False
            items = container.values()
        else:
            items = container
        for item in items:
            kind = type(item)
            if kind is str or item is None or kind is bool:
                continue
            if kind is int:
                if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                    return False
            elif kind is dict or kind is list:
                stack.append((item, depth + 1))
            else:
                return False
    return True


def canonical_bytes(event: Mapping[str, object]) -> bytes:
    """The RFC 8785 canonical UTF-8 JSON of ``event`` (an object at the top).

    Raises :class:`CanonicalError` for any value outside the subset above. Plain
    values are serialised by orjson with sorted keys (its escaping is ECMAScript's for
    every code point; the tests compare both paths with the ``rfc8785`` package),
    about 50 times faster than the pure-Python writer below.
    """
    if not isinstance(event, Mapping):
        raise CanonicalError(f"an event is a JSON object, got a {type(event).__name__}")
    if type(event) is dict and _plain(event):
        try:
            return orjson.dumps(event, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass  # e.g. a lone surrogate: the writer below names it
    return slow_canonical_bytes(event)


def slow_canonical_bytes(event: Mapping[str, object]) -> bytes:
    """The pure-Python RFC 8785 writer (the reference for :func:`canonical_bytes`)."""
    if not isinstance(event, Mapping):
        raise CanonicalError(f"an event is a JSON object, got a {type(event).__name__}")
    out: list[str] = []
    _serialise(event, "event", 0, out)
    return "".join(out).encode("utf-8")


def format_time(moment: datetime) -> str:
    """An aware datetime as the event time format: RFC 3339, UTC, milliseconds, ``Z``."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise CanonicalError("event times must be timezone-aware")
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")


def parse_time(text: str) -> datetime:
    """Parse a time written by :func:`format_time`; any other spelling is rejected."""
    if not _TIME.fullmatch(text):
        raise CanonicalError(
            f"time {text!r} is not RFC 3339 UTC with milliseconds, e.g. 2025-01-02T03:04:05.678Z"
        )
    try:  # the shape is checked above; fromisoformat (C) checks the date itself
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise CanonicalError(f"time {text!r} is not a valid date and time: {exc}") from None
