"""Failover over several control-plane URLs, shared by every client of the control
plane (agent, sidecar, SDK): the URLs are tried in order, starting with the one that
answered last, until one gives an answer. A connection error, a timeout, or an answer
the attempt marks :class:`TryNext` (a 5xx, a 429, a server that is stopping) moves on to
the next URL; any other exception ends the round at once, since asking another replica
of the same control plane would get the same answer. When no URL answers,
:class:`~trustmesh.common.errors.Unreachable` lists what each one did.

A connection that drops before its answer (the peer closed a kept-alive connection as
the request went out, or the replica died mid-request) is asked once more on the same
URL before moving on: on a fresh connection a live replica answers, a dead one refuses
at once. Without it, a stale connection to the one replica left standing while the
other is down fails the whole round. Every call made through a round is safe to repeat
(exchanges and SVIDs are issued again, audit batches are deduplicated by sequence).

What to do after a failed round (wait, back off) is the caller's: see
:class:`trustmesh.common.backoff.Backoff`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TypeVar

import httpx

from trustmesh.common.errors import Unreachable
from trustmesh.common.tls import tls_problem

T = TypeVar("T")

_DROPPED = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
"""A connection lost before the answer (not a refusal, not a timeout): ask again once."""


class TryNext(Exception):
    """Raised by an attempt: this URL failed in a way the next one may not."""


_FAILED = (*_DROPPED, httpx.HTTPError, TryNext)
"""What moves a round on to the next URL (or the same one again, for _DROPPED)."""


def normalise_urls(urls: Sequence[str] | str) -> list[str]:
    """``https://a,https://b`` or a list of them -> ``["https://a", "https://b"]``."""
    if isinstance(urls, str):
        urls = [urls]
    found = [
        part.strip().rstrip("/") for entry in urls for part in entry.split(",") if part.strip()
    ]
    if not found:
        raise ValueError("at least one control-plane URL is needed")
    for url in found:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"control-plane URL {url!r} must start with http:// or https://")
    return found


def describe(url: str, exc: BaseException) -> str:
    """One failure, for the list in Unreachable (never a response body's secrets: the
    exception text of httpx names the URL and the error, nothing more)."""
    if isinstance(exc, TryNext):
        return f"{url}: {exc}"
    problem = tls_problem(exc)  # a certificate not trusted says what to do about it
    if problem is not None:
        return f"{url}: {problem}"
    return f"{url}: {exc.__class__.__name__}: {exc}".rstrip(": ")


class Failover:
    """The URLs of one control plane and which of them answered last."""

    def __init__(self, urls: Sequence[str] | str) -> None:
        self.urls = normalise_urls(urls)
        self._preferred = 0

    @property
    def preferred(self) -> str:
        return self.urls[self._preferred]

    def order(self) -> list[str]:
        start = self._preferred
        return self.urls[start:] + self.urls[:start]

    def _answered(self, url: str) -> None:
        self._preferred = self.urls.index(url)

    async def run(self, attempt: Callable[[str], Awaitable[T]]) -> T:
        """``await attempt(url)`` on each URL in turn; the first result wins."""
        tries = _Tries(self.order())
        for url in tries:
            try:
                result = await attempt(url)
            except _FAILED as exc:
                tries.failed(url, exc)
            else:
                self._answered(url)
                return result
        raise tries.unreachable()

    def run_sync(self, attempt: Callable[[str], T]) -> T:
        """:meth:`run` for threaded code."""
        tries = _Tries(self.order())
        for url in tries:
            try:
                result = attempt(url)
            except _FAILED as exc:
                tries.failed(url, exc)
            else:
                self._answered(url)
                return result
        raise tries.unreachable()


class _Tries:
    """One round over ``urls``, the same for :meth:`Failover.run` and
    :meth:`Failover.run_sync`: each URL once, and once more at once if its first
    try's connection dropped; what each failure was, for Unreachable."""

    def __init__(self, urls: list[str]) -> None:
        self._urls = urls
        self._problems: list[str] = []
        self._first = False
        self._again = False

    def __iter__(self) -> Iterator[str]:
        for url in self._urls:
            self._first, self._again = True, False
            yield url
            if self._again:
                self._first = False
                yield url

    def failed(self, url: str, exc: BaseException) -> None:
        if self._first and isinstance(exc, _DROPPED):
            self._again = True
        else:
            self._problems.append(describe(url, exc))

    def unreachable(self) -> Unreachable:
        return Unreachable("; ".join(self._problems))
