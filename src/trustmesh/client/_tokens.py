"""Leases on federated tokens (DESIGN §2, §5): a token source that exchanges the
workload's Kubernetes service-account token for a JWT-SVID at ``POST /oauth2/token``
(RFC 8693), keeps it, and refreshes it before it expires.

The rules, shared by :class:`TokenSource` (threads) and :class:`AsyncTokenSource`
(asyncio):

* The first call to ``token()`` fetches. A lease is refreshed once
  ``refresh_fraction`` (± ``jitter``) of its lifetime has passed, so that many
  workloads started together do not all come back at the same second.
* The control-plane URLs are tried in order, starting with the one that answered last
  (failover). Connection errors, timeouts, 429 and 5xx move on to the next URL.
* When every URL fails, the current token is still handed out as long as it is valid,
  and the next attempt waits for an exponential, jittered delay
  (:class:`trustmesh.common.backoff.Backoff`), but never past the point where the token
  stops being usable.
* Other 4xx answers (``invalid_grant``: the service-account token is bad,
  ``unauthorized_client``: no Workload entry, ...) are not retried on other URLs; they
  raise :class:`ExchangeRejected` carrying the server's ``error_description``, and the
  next attempt also waits for the backoff.
* An expired token, or one expiring within the safety margin (5 s, or a tenth of the
  lifetime for very short leases), is never returned: :class:`TokenUnavailable` is
  raised instead, saying why.
* The subject token is read again on every exchange: kubelet rotates projected
  service-account token files in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trustmesh.common.backoff import Backoff
from trustmesh.common.errors import ControlPlaneError, Unreachable
from trustmesh.common.failover import Failover, TryNext
from trustmesh.common.tls import client_verify
from trustmesh.common.token_exchange import TOKEN_PATH, exchange_form

log = logging.getLogger("trustmesh.client")

SAFETY_MARGIN = 5.0
DEFAULT_TIMEOUT = httpx.Timeout(5.0, connect=2.0)
_RETRYABLE_STATUS = frozenset({408, 429})

SubjectToken = Callable[[], str] | str | os.PathLike[str]
"""Where the Kubernetes service-account token comes from: a callable returning it, or
the path of the projected token file (read again before every exchange)."""


class TokenUnavailable(ControlPlaneError):
    """No valid token can be handed out; the message says why (and what failed)."""


class ExchangeRejected(TokenUnavailable):
    """The control plane refused the exchange with an RFC 6749 error other than 429 or
    503 (``invalid_grant``, ``unauthorized_client``, ``invalid_target``, ...): asking
    again with the same subject token would fail the same way."""

    def __init__(self, server: str, status: int, error: str, description: str) -> None:
        detail = f": {description}" if description else ""
        super().__init__(
            f"{server} refused the token exchange ({error}, HTTP {status}){detail}",
            error=error,
            status=status,
        )
        self.server = server
        self.description = description  # the server's error_description alone


@dataclass(frozen=True)
class Lease:
    """One exchanged token. Times are on the token source's clock."""

    token: str
    server: str
    """The control-plane URL that issued it."""
    lifetime: int
    """``expires_in`` as the server answered it, in seconds."""
    issued_at: float
    """When the request was sent (so ``expires_at`` errs on the early side)."""
    expires_at: float
    refresh_at: float
    """When the source asks for the next token."""
    margin: float
    """The token is not handed out within this many seconds of ``expires_at``."""

    def usable(self, now: float) -> bool:
        return now < self.expires_at - self.margin

    def expires_in(self, now: float) -> float:
        return self.expires_at - now


def _subject_reader(subject_token: SubjectToken) -> Callable[[], str]:
    if callable(subject_token):
        return subject_token
    if isinstance(subject_token, str) and subject_token.startswith("eyJ"):
        # Never echo it: it is a credential, not a file name.
        raise TypeError(
            "subject_token looks like a token, not a file path: pass lambda: token instead"
        )
    path = Path(subject_token)

    def read() -> str:
        try:
            return path.read_text()
        except OSError as exc:
            raise TokenUnavailable(
                f"cannot read subject token file {path}: {exc.strerror or exc}"
            ) from None

    return read


class _LeaseKeeper:
    """What both token sources share: the lease, the failure state, the rules."""

    def __init__(
        self,
        servers: Sequence[str],
        subject_token: SubjectToken,
        audiences: Sequence[str],
        *,
        lifetime: int | None,
        refresh_fraction: float,
        jitter: float,
        clock: Callable[[], float],
        backoff: Backoff | None,
        safety_margin: float,
        on_refresh: Callable[[Lease], None] | None,
        on_error: Callable[[TokenUnavailable, float], None] | None,
    ) -> None:
        self.failover = Failover(servers)
        self._read_subject = _subject_reader(subject_token)
        self.audiences = [audiences] if isinstance(audiences, str) else list(audiences)
        if not self.audiences or not all(self.audiences):
            raise ValueError("TokenSource needs at least one non-empty audience")
        if lifetime is not None and lifetime <= 0:
            raise ValueError("lifetime must be a positive number of seconds")
        if not 0 < refresh_fraction < 1:
            raise ValueError("refresh_fraction must be between 0 and 1")
        if not 0 <= jitter < min(refresh_fraction, 1 - refresh_fraction):
            raise ValueError("jitter must keep refresh_fraction ± jitter within (0, 1)")
        self.lifetime = lifetime
        self.refresh_fraction = refresh_fraction
        self.jitter = jitter
        self.clock = clock
        self.backoff = backoff or Backoff(base=1.0, factor=2.0, cap=30.0)
        self.safety_margin = safety_margin
        self.on_refresh = on_refresh
        self.on_error = on_error
        self._rng = random.Random()  # noqa: S311 (spreading load, not a secret)
        self._lease: Lease | None = None
        self._retry_at = 0.0
        self._last_error: TokenUnavailable | None = None

    @property
    def servers(self) -> list[str]:
        return self.failover.urls

    # -- state --------------------------------------------------------------------------
    @property
    def lease(self) -> Lease | None:
        """The current lease (possibly expired), or None before the first success."""
        return self._lease

    def _due(self, now: float) -> bool:
        return self._lease is None or now >= self._lease.refresh_at

    def _usable(self, now: float) -> bool:
        return self._lease is not None and self._lease.usable(now)

    def _may_attempt(self, now: float) -> bool:
        return now >= self._retry_at

    def _current(self, now: float) -> str:
        lease = self._lease
        if lease is not None and lease.usable(now):
            return lease.token
        if lease is None:
            state = "no token has been issued yet"
        elif now >= lease.expires_at:
            state = f"the last token expired {now - lease.expires_at:.0f} s ago"
        else:
            state = (
                f"the last token expires in {lease.expires_in(now):.0f} s, inside the safety margin"
            )
        error = self._last_error
        if isinstance(error, ExchangeRejected):
            raise ExchangeRejected(error.server, error.status, error.error, error.description)
        retry = max(0.0, self._retry_at - now)
        why = f": {error}" if error is not None else ""
        wait = f"; next attempt in {retry:.1f} s" if retry > 0 else ""
        raise TokenUnavailable(f"no valid token ({state}){why}{wait}")

    def _form(self) -> dict[str, Any]:
        subject = self._read_subject().strip()
        if not subject:
            raise TokenUnavailable("the subject token is empty")
        return exchange_form(subject, self.audiences, self.lifetime)

    def _lease_from(self, server: str, response: httpx.Response, issued_at: float) -> Lease:
        """The lease in a 200 answer; TryNext (another URL may answer) or
        ExchangeRejected otherwise."""
        try:
            body = response.json()
        except ValueError:
            body = None
        status = response.status_code
        if status != 200:
            error = description = ""
            if isinstance(body, dict):
                error = str(body.get("error") or "")
                description = str(body.get("error_description") or "")
            if status >= 500 or status in _RETRYABLE_STATUS:
                detail = f" {error}: {description}" if error else ""
                raise TryNext(f"HTTP {status}{detail}")
            raise ExchangeRejected(server, status, error or "http_error", description)
        if not isinstance(body, dict):
            raise TryNext("the token response is not a JSON object")
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if not isinstance(token, str) or not token:
            raise TryNext("the token response has no access_token")
        if isinstance(expires_in, bool) or not isinstance(expires_in, int) or expires_in <= 0:
            raise TryNext("the token response has no positive expires_in")
        margin = min(self.safety_margin, expires_in / 10)
        expires_at = issued_at + expires_in
        fraction = self.refresh_fraction + self._rng.uniform(-self.jitter, self.jitter)
        refresh_at = min(issued_at + expires_in * fraction, expires_at - margin)
        return Lease(token, server, expires_in, issued_at, expires_at, refresh_at, margin)

    def _succeeded(self, lease: Lease) -> None:
        self._lease = lease
        self._retry_at = 0.0
        self._last_error = None
        self.backoff.reset()
        if self.on_refresh is not None:
            self.on_refresh(lease)

    def _failed(self, error: TokenUnavailable) -> None:
        now = self.clock()
        delay = self.backoff.next_delay()
        retry_at = now + delay
        lease = self._lease
        if lease is not None and lease.usable(now):
            retry_at = min(retry_at, lease.expires_at - lease.margin)  # one last try in time
        self._retry_at = retry_at
        self._last_error = error
        keeping = (
            f"; keeping the current token ({lease.expires_in(now):.0f} s left)"
            if lease is not None and lease.usable(now)
            else ""
        )
        log.warning(
            "token refresh failed: %s%s; retrying in %.1f s", error, keeping, retry_at - now
        )
        if self.on_error is not None:
            self.on_error(error, retry_at - now)

    @staticmethod
    def _all_failed(exc: Unreachable) -> TokenUnavailable:
        return TokenUnavailable(f"no control plane answered ({exc})")

    def _next_wakeup(self) -> float:
        """Seconds until the background refresher should look again."""
        now = self.clock()
        if self._lease is None or self._last_error is not None:
            target = self._retry_at
        else:
            target = self._lease.refresh_at
        return min(max(target - now, 0.05), 1.0)


def verify_for(
    http_client: object, ca_file: str | os.PathLike[str] | None
) -> ssl.SSLContext | bool:
    """How the client the source creates checks the control plane's certificate: the CA
    certificates of ``ca_file`` (or of ``TRUSTMESH_CA_FILE``) alone, else the public
    roots. A caller's own ``http_client`` brings its own."""
    if http_client is None:
        return client_verify(ca_file)
    if ca_file is not None:
        raise ValueError("give ca_file or http_client, not both (the client has its own)")
    return True


class TokenSource(_LeaseKeeper):
    """A lease on a federated token, for threaded code (sync ``httpx``).

    ``servers``: control-plane URLs, tried in order (a comma-separated entry counts as
    several). ``subject_token``: a callable returning the Kubernetes service-account
    token, or the path of the projected token file, re-read before every exchange.
    ``audiences``: the target audiences (``spiffe://TD/cluster/NAME``). ``lifetime``:
    requested lifetime in seconds (the server clamps it; default: the server's).
    ``ca_file``: trust only the CA certificates of this PEM file for the control
    plane's HTTPS (default: ``TRUSTMESH_CA_FILE``, else the public roots); a
    ``ConfigError`` names a file that cannot be used.

    ``token()`` is safe to call from any number of threads: one refresh runs at a time,
    and while it does, callers holding a still-valid token do not wait for it.
    ``start()`` runs a background refresher thread (for sidecars), ``close()`` stops it
    and closes the HTTP client if the source created it."""

    def __init__(
        self,
        servers: Sequence[str],
        subject_token: SubjectToken,
        audiences: Sequence[str],
        lifetime: int | None = None,
        refresh_fraction: float = 0.8,
        jitter: float = 0.1,
        clock: Callable[[], float] = time.time,
        http_client: httpx.Client | None = None,
        *,
        backoff: Backoff | None = None,
        safety_margin: float = SAFETY_MARGIN,
        on_refresh: Callable[[Lease], None] | None = None,
        on_error: Callable[[TokenUnavailable, float], None] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            servers,
            subject_token,
            audiences,
            lifetime=lifetime,
            refresh_fraction=refresh_fraction,
            jitter=jitter,
            clock=clock,
            backoff=backoff,
            safety_margin=safety_margin,
            on_refresh=on_refresh,
            on_error=on_error,
        )
        verify = verify_for(http_client, ca_file)
        self._owns_client = http_client is None
        self._http = http_client or httpx.Client(
            timeout=DEFAULT_TIMEOUT, trust_env=False, verify=verify
        )
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def token(self) -> str:
        """A valid token: the current one, or a new one when the lease is due.

        Raises TokenUnavailable (ExchangeRejected for a refused exchange) when there is
        no token that stays valid beyond the safety margin."""
        now = self.clock()
        if not self._due(now) and self._usable(now):
            return self._current(now)
        # Someone else refreshing and our token still good: do not wait for them.
        if self._lock.acquire(blocking=not self._usable(now)):
            try:
                self._refresh_if_due()
            finally:
                self._lock.release()
        return self._current(self.clock())

    def refresh(self) -> Lease:
        """Exchange now, whatever the lease and the backoff say; raises on failure."""
        with self._lock:
            self._attempt()
            assert self._lease is not None
            return self._lease

    def _refresh_if_due(self) -> None:
        now = self.clock()
        if self._due(now) and self._may_attempt(now):
            # A failure is recorded; token() decides whether the current lease still serves.
            with contextlib.suppress(TokenUnavailable):
                self._attempt()

    def _attempt(self) -> None:
        def exchange(server: str) -> Lease:
            issued_at = self.clock()
            return self._lease_from(
                server, self._http.post(server + TOKEN_PATH, data=form), issued_at
            )

        try:
            form = self._form()
            try:
                lease = self.failover.run_sync(exchange)
            except Unreachable as exc:
                raise self._all_failed(exc) from None
        except TokenUnavailable as exc:
            self._failed(exc)
            raise
        self._succeeded(lease)

    # -- background refresher --------------------------------------------------------------
    def start(self) -> TokenSource:
        """Refresh in a daemon thread, so that ``token()`` never waits for the network
        and ``on_refresh`` sees every new token as soon as it arrives."""
        if self._thread is None or not self._thread.is_alive():
            self._stopping.clear()
            self._thread = threading.Thread(
                target=self._run, name="trustmesh-token-refresher", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background refresher (waits for a refresh in flight)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                with self._lock:
                    self._refresh_if_due()
            except Exception:  # a failing on_refresh must not end the refresher
                log.exception("token refresher: unexpected error")
            self._stopping.wait(self._next_wakeup())

    def close(self) -> None:
        """Stop the refresher and close the HTTP client if this source created it."""
        self.stop()
        if self._owns_client:
            self._http.close()

    def __enter__(self) -> TokenSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncTokenSource(_LeaseKeeper):
    """:class:`TokenSource` for asyncio code: ``await source.token()``, with
    ``httpx.AsyncClient``. Same arguments, same rules; one refresh at a time per
    source (an ``asyncio.Lock``). Use it from one event loop."""

    def __init__(
        self,
        servers: Sequence[str],
        subject_token: SubjectToken,
        audiences: Sequence[str],
        lifetime: int | None = None,
        refresh_fraction: float = 0.8,
        jitter: float = 0.1,
        clock: Callable[[], float] = time.time,
        http_client: httpx.AsyncClient | None = None,
        *,
        backoff: Backoff | None = None,
        safety_margin: float = SAFETY_MARGIN,
        on_refresh: Callable[[Lease], None] | None = None,
        on_error: Callable[[TokenUnavailable, float], None] | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(
            servers,
            subject_token,
            audiences,
            lifetime=lifetime,
            refresh_fraction=refresh_fraction,
            jitter=jitter,
            clock=clock,
            backoff=backoff,
            safety_margin=safety_margin,
            on_refresh=on_refresh,
            on_error=on_error,
        )
        verify = verify_for(http_client, ca_file)
        self._owns_client = http_client is None
        self._http = http_client or httpx.AsyncClient(
            timeout=DEFAULT_TIMEOUT, trust_env=False, verify=verify
        )
        self._lock = asyncio.Lock()

    async def token(self) -> str:
        """A valid token (see :meth:`TokenSource.token`)."""
        now = self.clock()
        if not self._due(now) and self._usable(now):
            return self._current(now)
        if self._lock.locked() and self._usable(now):
            return self._current(now)
        async with self._lock:
            now = self.clock()
            if self._due(now) and self._may_attempt(now):
                with contextlib.suppress(TokenUnavailable):
                    await self._attempt()
        return self._current(self.clock())

    async def refresh(self) -> Lease:
        """Exchange now, whatever the lease and the backoff say; raises on failure."""
        async with self._lock:
            await self._attempt()
            assert self._lease is not None
            return self._lease

    async def _attempt(self) -> None:
        async def exchange(server: str) -> Lease:
            issued_at = self.clock()
            response = await self._http.post(server + TOKEN_PATH, data=form)
            return self._lease_from(server, response, issued_at)

        try:
            form = self._form()
            try:
                lease = await self.failover.run(exchange)
            except Unreachable as exc:
                raise self._all_failed(exc) from None
        except TokenUnavailable as exc:
            self._failed(exc)
            raise
        self._succeeded(lease)

    async def aclose(self) -> None:
        """Close the HTTP client if this source created it."""
        if self._owns_client:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncTokenSource:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
