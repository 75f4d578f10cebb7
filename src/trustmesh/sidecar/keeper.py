"""The SVID keeper: the sidecar's X.509-SVID over time (DESIGN §9).

* At start, and then at half of each SVID's lifetime (± ``jitter`` of it, so that a
  fleet started together does not come back at one second), a new key is made, the
  projected service-account token file is read again (kubelet rotates it in place) and
  a CSR goes to ``POST /v1/x509-svid`` through the control-plane failover, with the
  fingerprints of the roots we hold (``bundle_sha256``: the evidence a CA rotation
  waits for, ``server/roots.py``).
* A failed attempt — no control plane answered, a refusal, an answer that is not a
  usable X509-SVID, an unreadable token file — is logged with its reason and retried
  after an exponential, jittered delay (``common/backoff.py``), never later than the
  current SVID's expiry; the current SVID stays in service until it expires, and the
  log says so and for how long.
* An SVID that expires without a successor is dropped: nothing expired is ever served.
  From then on every surface answers that there is no identity, and why.

Each change — a new SVID, an expiry, a first failure before any SVID, a change of the
federated trust domains' roots — raises ``generation`` and wakes whoever waits in
:meth:`SvidKeeper.wait_change` (the Workload API and SDS streams); ``on_rotate``
callbacks (the credential folder) run on every new SVID. Times are on the injected clock; private keys and tokens never reach
the log."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509

from trustmesh.common.backoff import Backoff
from trustmesh.common.clock import Clock
from trustmesh.common.errors import (
    ConfigError,
    IssuanceRefused,
    Unreachable,
    UnusableSvid,
)
from trustmesh.common.files import read_mounted_file
from trustmesh.identity.x509ca import MAX_REPORTED_ROOTS, fingerprint
from trustmesh.sidecar.controlplane import SidecarClient
from trustmesh.sidecar.x509 import X509Svid, csr_pem, new_private_key, svid_from_answer

log = logging.getLogger("trustmesh.sidecar")

RENEW_FRACTION = 0.5
RENEW_JITTER = 0.1
MAX_SLEEP = 1.0  # the loop looks again at least this often (clock jumps, expiry)
EXPIRY_MARGIN = 1.0  # the last retry is made this many seconds before expiry


def when(moment: float) -> str:
    """A time for the log: ISO 8601, UTC, whole seconds."""
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_subject_token(path: Path) -> str:
    """The projected service-account token, read afresh (a mounted file: symlinks into
    ``..data`` are kubelet's way; a file others may write is refused)."""
    token = read_mounted_file(path, "service-account token file").decode("ascii", "replace")
    token = token.strip()
    if not token:
        raise ConfigError(f"service-account token file {path} is empty")
    return token


class SvidKeeper:
    """The sidecar's current X.509-SVID, renewed in :meth:`run`."""

    def __init__(
        self,
        client: SidecarClient,
        sa_token_file: Path,
        clock: Clock,
        *,
        renew_fraction: float = RENEW_FRACTION,
        jitter: float = RENEW_JITTER,
        backoff: Backoff | None = None,
    ) -> None:
        if not (renew_fraction - jitter > 0 and renew_fraction + jitter < 1):
            raise ValueError("renew_fraction ± jitter must stay within (0, 1)")
        self.client = client
        self.sa_token_file = sa_token_file
        self.clock = clock
        self.renew_fraction = renew_fraction
        self.jitter = jitter
        self.backoff = backoff or Backoff(base=1.0, factor=2.0, cap=30.0)
        self.on_rotate: list[Callable[[X509Svid], None]] = []
        self.current: X509Svid | None = None
        self.problem: str | None = None
        """Why the last attempt failed (None after a success)."""
        self.refused = False
        """Whether the last failure was the control plane's refusal."""
        self.generation = 0
        self.federated: dict[str, tuple[x509.Certificate, ...]] = {}
        """Federated trust domain -> its roots (``sidecar/jwt.py`` keeps them fresh)."""
        self.renew_at = 0.0
        self.retry_at = 0.0
        self._rng = random.Random()  # noqa: S311 (spreading load, not a secret)
        self._changed = asyncio.Condition()

    # -- what the surfaces read --------------------------------------------------------------
    def x509_bundles(self, svid: X509Svid | None = None) -> dict[str, tuple[x509.Certificate, ...]]:
        """Trust bundles by trust domain: ours, as answered with ``svid`` (default: the
        SVID in service), and each federated trust domain's (DESIGN §9), kept apart as
        the Workload API serves them (FetchX509SVID's ``federated_bundles``,
        FetchX509Bundles). Empty before the first SVID."""
        svid = svid or self.current
        if svid is None:
            return {}
        return {**self.federated, svid.trust_domain: svid.bundle}

    async def set_federated(self, roots: dict[str, tuple[x509.Certificate, ...]]) -> None:
        """Take the federated trust domains' roots; on a change, the Workload API's
        streams send them."""

        def prints(found: dict[str, tuple[x509.Certificate, ...]]) -> dict[str, list[str]]:
            return {domain: [fingerprint(r) for r in certs] for domain, certs in found.items()}

        if prints(roots) == prints(self.federated):
            return
        self.federated = dict(roots)
        await self._changed_now()

    def holding(self) -> list[str] | None:
        """The fingerprints of our trust domain's roots we hold (at most the 16 the
        control plane takes), reported with each renewal so that a prepared root becomes
        active only once we hold it; None before the first SVID."""
        svid = self.current
        if svid is None:
            return None
        return sorted({fingerprint(root) for root in svid.bundle})[:MAX_REPORTED_ROOTS]

    async def wait_change(self, seen: int) -> None:
        """Return once ``generation`` is no longer ``seen``."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.generation != seen)

    async def _changed_now(self) -> None:
        self.generation += 1
        async with self._changed:
            self._changed.notify_all()

    # -- renewal ---------------------------------------------------------------------------
    async def renew(self) -> X509Svid:
        """One attempt: a new key, the token read again, the CSR sent, the answer
        checked. Raises what failed."""
        key = new_private_key()
        subject_token = read_subject_token(self.sa_token_file)
        server, answer = await self.client.issue_x509_svid(
            subject_token, csr_pem(key), self.holding()
        )
        svid = svid_from_answer(answer, key, self.clock())
        log.info(
            "X.509-SVID for %s from %s (serial %s), valid until %s",
            svid.spiffe_id,
            server,
            svid.serial,
            when(svid.not_after),
        )
        return svid

    async def _succeeded(self, svid: X509Svid) -> None:
        now = self.clock()
        fraction = self.renew_fraction + self._rng.uniform(-self.jitter, self.jitter)
        self.renew_at = now + (svid.not_after - now) * fraction
        # The files first: once the sockets serve the new SVID, the folder holds it.
        for callback in self.on_rotate:
            try:
                await asyncio.to_thread(callback, svid)
            except Exception as exc:  # a full disk must not stop the renewals
                log.error("could not hand out the new X.509-SVID: %s", exc)
        first = self.current is None
        self.current = svid
        self.problem = None
        self.refused = False
        self.backoff.reset()
        log.info(
            "%s X.509-SVID in service, expires at %s; next renewal at %s",
            "the first" if first else "the renewed",
            when(svid.not_after),
            when(self.renew_at),
        )
        await self._changed_now()

    async def _failed(self, problem: str, refused: bool) -> None:
        now = self.clock()
        first_problem = self.problem is None
        self.problem = problem
        self.refused = refused
        retry_at = now + self.backoff.next_delay()
        svid = self.current
        if svid is not None:
            last_chance = svid.not_after - EXPIRY_MARGIN
            if now < last_chance:
                retry_at = min(retry_at, last_chance)  # one more attempt before expiry
            keeping = (
                f"; keeping the current X.509-SVID, which expires at {when(svid.not_after)} "
                f"(in {svid.not_after - now:.0f} s)"
            )
        else:
            keeping = "; no X.509-SVID to serve"
        self.retry_at = retry_at
        log.warning(
            "X.509-SVID renewal failed: %s%s; retrying in %.1f s", problem, keeping, retry_at - now
        )
        if svid is None and first_problem:
            await self._changed_now()  # callers waiting for a first SVID learn why

    async def _expire(self) -> None:
        svid = self.current
        assert svid is not None
        self.current = None
        reason = self.problem or "no renewal was attempted"
        self.problem = (
            f"the X.509-SVID expired at {when(svid.not_after)} and could not be renewed ({reason})"
        )
        log.error("%s; serving no X.509 identity until a renewal succeeds", self.problem)
        await self._changed_now()

    async def attempt(self) -> None:
        """Renew once now and record the outcome."""
        try:
            svid = await self.renew()
        except IssuanceRefused as exc:
            await self._failed(str(exc), refused=True)
        except Unreachable as exc:
            await self._failed(f"no control plane answered ({exc})", refused=False)
        except (UnusableSvid, ConfigError) as exc:
            await self._failed(exc.description, refused=False)
        else:
            await self._succeeded(svid)

    def _next_wakeup(self, now: float) -> float:
        target = self.retry_at if self.problem is not None else self.renew_at
        if self.current is not None:
            target = min(target, self.current.not_after)
        return min(max(target - now, 0.0), MAX_SLEEP)

    async def step(self) -> None:
        """What is due now: the expiry of the current SVID, an attempt."""
        now = self.clock()
        if self.current is not None and now >= self.current.not_after:
            await self._expire()
        due = now >= self.renew_at if self.problem is None else now >= self.retry_at
        if (self.current is None or due) and now >= self.retry_at:
            await self.attempt()

    async def run(self) -> None:
        """Keep an SVID in service until cancelled."""
        while True:
            try:
                await self.step()
            except Exception:  # a bug in one attempt must not end the renewals
                log.exception("X.509-SVID keeper: unexpected error")
                self.retry_at = self.clock() + self.backoff.next_delay()
            await asyncio.sleep(max(self._next_wakeup(self.clock()), 0.01))
