"""Reading an HTTP answer under a size bound (every byte from the network is hostile):
the declared ``Content-Length`` is checked first, then the body is read chunk by chunk
and given up as soon as it passes the bound, so a peer can never make us hold more."""

from __future__ import annotations

import httpx


async def read_bounded(response: httpx.Response, limit: int) -> bytes | None:
    """The body of a streamed ``response``, or None when it is (or says it is) larger
    than ``limit`` bytes."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)
