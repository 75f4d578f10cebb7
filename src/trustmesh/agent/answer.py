"""An answer of the agent's decision surfaces as data — status, JSON body, headers —
and its bytes, so the surfaces build answers without a web framework
(``agent/envoy.py``, ``agent/hot.py``).

Bodies are encoded with orjson. What orjson will not encode (an integer beyond 64 bits,
a lone surrogate) is encoded by the stdlib exactly as Starlette's ``JSONResponse``
does, so every answer that could be given before still is."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


def json_bytes(document: Any) -> bytes:
    try:
        return orjson.dumps(document)
    except orjson.JSONEncodeError:
        return json.dumps(
            document, ensure_ascii=False, allow_nan=False, separators=(",", ":")
        ).encode("utf-8")


def raw_headers(answer: Answer, length: int) -> list[tuple[bytes, bytes]]:
    """The answer's headers as ASGI wants them (lowercase names, latin-1), then
    ``content-length`` and ``content-type`` (Starlette's order)."""
    headers = [
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in answer.headers.items()
    ]
    headers.append((b"content-length", str(length).encode("latin-1")))
    headers.append((b"content-type", b"application/json"))
    return headers
