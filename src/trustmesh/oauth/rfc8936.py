"""RFC 8936 Poll-Based Security Event Token Delivery: the poll request (§2.4) and its
errors, in the error shape of RFC 8935 §2.3 (which RFC 8936 reuses; codes from the
registry of RFC 8935 §7.1)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from trustmesh.common.errors import PollError

POLL_DELIVERY = "urn:ietf:rfc:8936"  # SSF 1.0 "Poll Delivery using HTTP"
DEFAULT_MAX_EVENTS = 100
MAX_EVENTS_CAP = 1000  # larger requests get at most this many (§2.4: "up to")
MAX_ACKS = 10_000
MAX_POLL_BODY = 1024 * 1024
LONG_POLL_SECONDS = 25.0


@dataclass(frozen=True)
class PollRequest:
    """§2.4 poll request members."""

    max_events: int = DEFAULT_MAX_EVENTS
    return_immediately: bool = False
    ack: list[str] = field(default_factory=list)
    set_errs: dict[str, tuple[str, str]] = field(default_factory=dict)


def parse_poll_request(body: bytes) -> PollRequest:
    """Validate a poll body; unknown members are ignored (forward compatibility)."""
    try:
        document = json.loads(body)
    except ValueError:
        raise PollError("request body is not valid JSON") from None
    if not isinstance(document, dict):
        raise PollError("request body must be a JSON object")
    max_events = document.get("maxEvents", DEFAULT_MAX_EVENTS)
    if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 0:
        raise PollError("maxEvents must be a non-negative integer")
    immediate = document.get("returnImmediately", False)
    if not isinstance(immediate, bool):
        raise PollError("returnImmediately must be true or false")
    ack = document.get("ack", [])
    if not isinstance(ack, list) or not all(isinstance(j, str) for j in ack):
        raise PollError("ack must be an array of SET jti strings")
    if len(ack) > MAX_ACKS:
        raise PollError(f"ack may list at most {MAX_ACKS} jti values per poll")
    raw_errs = document.get("setErrs", {})
    if not isinstance(raw_errs, dict):
        raise PollError('setErrs must be an object {jti: {"err": …, "description": …}}')
    if len(raw_errs) > MAX_ACKS:
        raise PollError(f"setErrs may list at most {MAX_ACKS} jti values per poll")
    set_errs: dict[str, tuple[str, str]] = {}
    for jti, detail in raw_errs.items():
        if not isinstance(detail, dict) or not isinstance(detail.get("err"), str):
            raise PollError(f"setErrs[{jti[:64]!r}] must be an object with a string err")
        description = detail.get("description", "")
        if not isinstance(description, str):
            raise PollError(f"setErrs[{jti[:64]!r}].description must be a string")
        set_errs[jti] = (detail["err"][:64], description[:1000])
    return PollRequest(min(max_events, MAX_EVENTS_CAP), immediate, ack, set_errs)
