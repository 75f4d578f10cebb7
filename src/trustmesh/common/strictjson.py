"""JSON from the network, read one way (RFC 8259): a member named twice in one object
is refused (RFC 8259 §4 leaves its meaning to the reader, and readers differ: Python
and Go keep the last, others the first), as are the non-standard ``NaN``,
``Infinity`` and ``-Infinity`` Python would take, and nesting too deep for the parser
(a 400, never a ``RecursionError`` and a 500)."""

from __future__ import annotations

import json
from typing import Any

from trustmesh.common.errors import InvalidRequest


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise InvalidRequest(f"member {key[:64]!r} appears twice in the request body")
        document[key] = value
    return document


def _constant(name: str) -> Any:
    raise InvalidRequest(f"request body holds {name}, which is not JSON")


def loads_strict(body: bytes | str) -> Any:
    """The document in ``body``; InvalidRequest naming the problem otherwise."""
    try:
        return json.loads(body, object_pairs_hook=_unique, parse_constant=_constant)
    except InvalidRequest:
        raise
    except (ValueError, RecursionError):
        raise InvalidRequest("request body is not valid JSON") from None
