"""The load of ``trustmesh bench rotation``, in a process of its own:
``python -m trustmesh.bench._rotationload CONFIG_JSON`` (written by ``bench/rotation.py``).

**Identities through the Workload API.** For each client workload, py-spiffe's
``X509Source`` on that workload's ``trustmesh sidecar`` socket: it holds the streaming
``FetchX509SVID`` call open and receives each rotated SVID on it. On every new SVID
(a serial not seen before) a fresh TLS client context is built from it — the SVID's
chain and key, the trust bundle of its trust domain as the roots — and swapped in for
the requests that start after it; requests under way keep the one they began with.
Python's ``ssl`` loads a certificate and key only from files, so they are written to a
private (0700) directory, 0600, and removed once loaded.

**Requests.** One closed loop per workload, one request in flight each: a new TCP
connection and TLS handshake per request (so every request presents the SVID current at
that moment, and sees the receiving Envoy's current certificate), ``GET`` with
``Connection: close``, the answer read in full, the connection closed. The server's
certificate must chain to the bundle and name the receiving workload's SPIFFE ID
(checked after the handshake; hostnames mean nothing for X.509-SVIDs). A request
succeeds on a 2xx; anything else is a failure in one category: ``connect`` (TCP),
``tls`` (a handshake or TLS alert, either side refusing the other), ``peer`` (the wrong
SPIFFE ID), ``closed`` (the connection ended before a whole answer), ``timeout``,
``malformed`` (not an HTTP/1.1 answer with a length) or ``http_NNN``. The first
message of each category is kept. An update the source delivers that cannot be used
(and a source whose stream ended for good) is reported beside the requests, which go on
with the last good SVID.

**Phases.** First a check: each workload must get one 2xx (retried for up to
``ready_timeout``; a set-up that never answers is an error, not a measurement). Then the
window: ``seconds`` of load, every request sent with ``x-bench-phase: load`` so that the
upstream counts only those. Latency is from before the connect to the last byte of the
answer (the handshake included: it is what a rotation could break); the handshake alone
is reported too.

Prints ``rotation load window open`` when the window opens and, at the end, one JSON
line with the counts per workload, the SVID serials each source received during the
window, the serials of the receiving side's certificate the clients saw, and the
process's CPU time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe import WorkloadApiClient, X509Source

from trustmesh.bench._load import Malformed, round_trip, run_async

__all__ = ["PHASE_HEADER", "READY_LINE", "LoadConfig", "main"]

READY_LINE = "rotation load window open"
PHASE_HEADER = "x-bench-phase"
_EXAMPLE_CHARS = 300
_MAX_HEADER = 64 * 1024


@dataclass(frozen=True)
class LoadConfig:
    host: str
    port: int
    authority: str  # the Host header: the service the policy names
    path: str
    peer_id: str  # the SPIFFE ID the receiving Envoy must present
    workloads: list[tuple[str, str]]  # (SPIFFE ID, Workload API socket)
    seconds: float
    timeout: float = 10.0
    ready_timeout: float = 60.0

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> LoadConfig:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw["workloads"] = [tuple(pair) for pair in raw["workloads"]]
        return cls(**raw)


# -- one workload's identity, kept by py-spiffe -----------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


class Identity:
    """A workload's current TLS client context, rebuilt on each SVID its
    ``X509Source`` receives."""

    def __init__(self, spiffe_id: str, socket: str, directory: Path, timeout: float) -> None:
        self.spiffe_id = spiffe_id
        self.directory = directory
        self.client = WorkloadApiClient(f"unix:{socket}", default_timeout=timeout)
        self.source = X509Source(workload_api_client=self.client, timeout_in_seconds=timeout)
        self.received: list[tuple[float, int]] = []  # (monotonic, serial) per new SVID
        self.problems: list[str] = []  # what went wrong with an update (the first few)
        self._lock = threading.Lock()
        self._building = threading.Lock()  # one update at a time builds a context
        self.context = self._build()
        self.source.subscribe_for_updates(self._update)
        self._update()  # an SVID that arrived before the subscription

    def _build(self) -> ssl.SSLContext:
        context = self.source.get_x509_context()
        svid = context.default_svid
        if str(svid.spiffe_id) != self.spiffe_id:
            raise RuntimeError(f"the sidecar of {self.spiffe_id} served {svid.spiffe_id}")
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        if bundle is None:
            raise RuntimeError(f"no bundle for {svid.spiffe_id.trust_domain} from the sidecar")
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        tls.check_hostname = False  # an X.509-SVID names a SPIFFE ID: checked after the handshake
        tls.verify_mode = ssl.CERT_REQUIRED
        tls.load_verify_locations(
            cadata="".join(
                root.public_bytes(serialization.Encoding.PEM).decode()
                for root in bundle.x509_authorities
            )
        )
        serial = svid.leaf.serial_number
        chain = self.directory / f"{serial:x}.pem"
        key = self.directory / f"{serial:x}.key"
        _write_private(
            chain, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain)
        )
        _write_private(
            key,
            svid.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        try:
            tls.load_cert_chain(str(chain), str(key))
        finally:
            key.unlink()
            chain.unlink()
        with self._lock:
            if not self.received or self.received[-1][1] != serial:
                self.received.append((time.monotonic(), serial))
        return tls

    def _update(self) -> None:
        try:
            with self._building:
                serial = self.source.get_x509_context().default_svid.leaf.serial_number
                with self._lock:
                    if self.received and self.received[-1][1] == serial:
                        return  # a bundle-only update: the SVID in service stays
                self.context = self._build()
        except Exception as exc:  # py-spiffe's thread: record, never raise into it
            with self._lock:
                if len(self.problems) < 5:
                    self.problems.append(f"{type(exc).__name__}: {exc}"[:_EXAMPLE_CHARS])

    def serials_since(self, moment: float) -> list[int]:
        """The SVIDs in service at any time from ``moment`` on: the one then current and
        every one received after it."""
        with self._lock:
            received = list(self.received)
        before = [serial for at, serial in received if at <= moment]
        return before[-1:] + [serial for at, serial in received if at > moment]

    def close(self) -> None:
        self.source.close()
        self.client.close()


# -- the requests --------------------------------------------------------------------------


@dataclass
class Tally:
    sent: int = 0
    succeeded: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    latencies_ns: list[int] = field(default_factory=list)
    handshakes_ns: list[int] = field(default_factory=list)

    def fail(self, category: str, detail: str) -> None:
        self.failures[category] += 1
        self.examples.setdefault(category, detail[:_EXAMPLE_CHARS])


class Peers:
    """The receiving side's certificates the clients saw (DER -> serial, SPIFFE ID),
    each parsed once."""

    def __init__(self) -> None:
        self.parsed: dict[bytes, tuple[int, str | None]] = {}
        self.seen: Counter[int] = Counter()

    def identify(self, der: bytes) -> tuple[int, str | None]:
        found = self.parsed.get(der)
        if found is None:
            certificate = x509.load_der_x509_certificate(der)
            try:
                san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
            except x509.ExtensionNotFound:
                uris = []
            found = (certificate.serial_number, uris[0] if len(uris) == 1 else None)
            self.parsed[der] = found
        return found


def _request(config: LoadConfig, phase: str) -> bytes:
    return (
        f"GET {config.path} HTTP/1.1\r\nHost: {config.authority}\r\n"
        f"{PHASE_HEADER}: {phase}\r\nConnection: close\r\n\r\n"
    ).encode()


async def one_request(
    config: LoadConfig, identity: Identity, request: bytes, peers: Peers, tally: Tally
) -> bool:
    """One request on a fresh mTLS connection; counted in ``tally``. -> succeeded."""
    clock = time.perf_counter_ns
    tally.sent += 1
    started = clock()
    stage = "connect"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(config.timeout):
            reader, writer = await asyncio.open_connection(
                config.host, config.port, ssl=identity.context, limit=_MAX_HEADER
            )
            connected = clock()
            stage = "request"
            ssl_object = writer.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            if not der:
                tally.fail("peer", "the receiving side presented no certificate")
                return False
            serial, uri = peers.identify(der)
            if uri != config.peer_id:
                tally.fail("peer", f"the receiving side presented {uri!r}, not {config.peer_id}")
                return False
            status, body, _ = await round_trip(reader, writer, request)
    except ssl.SSLError as exc:
        tally.fail("tls", f"{stage}: {exc}")
        return False
    except TimeoutError:
        tally.fail("timeout", f"no whole answer within {config.timeout:g} s ({stage})")
        return False
    except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
        tally.fail("closed" if stage == "request" else "connect", f"{stage}: {exc!r}")
        return False
    except Malformed as exc:
        tally.fail("malformed", str(exc))
        return False
    except OSError as exc:
        tally.fail("connect" if stage == "connect" else "closed", f"{stage}: {exc!r}")
        return False
    finally:
        if writer is not None:
            writer.close()
    finished = clock()
    if not 200 <= status < 300:
        tally.fail(f"http_{status}", body[:_EXAMPLE_CHARS].decode("utf-8", "replace"))
        return False
    peers.seen[serial] += 1
    tally.succeeded += 1
    tally.latencies_ns.append(finished - started)
    tally.handshakes_ns.append(connected - started)
    return True


async def _check(config: LoadConfig, identity: Identity, peers: Peers) -> Tally:
    """Until one request succeeds, or ``ready_timeout`` passes (RuntimeError)."""
    tally = Tally()
    request = _request(config, "check")
    deadline = time.monotonic() + config.ready_timeout
    while not await one_request(config, identity, request, peers, tally):
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{identity.spiffe_id} got no 2xx in {config.ready_timeout:g} s of trying: "
                f"{dict(tally.failures)} {tally.examples}"
            )
        await asyncio.sleep(0.2)
    return tally


async def _loop(
    config: LoadConfig, identity: Identity, peers: Peers, tally: Tally, until: float
) -> None:
    request = _request(config, "load")
    while time.monotonic() < until:
        await one_request(config, identity, request, peers, tally)


async def _drive(config: LoadConfig, identities: list[Identity]) -> dict[str, Any]:
    check_peers = Peers()
    checks = await asyncio.gather(*(_check(config, i, check_peers) for i in identities))
    peers = Peers()
    tallies = [Tally() for _ in identities]
    print(READY_LINE, flush=True)
    cpu_before = time.process_time()
    opened = time.monotonic()
    until = opened + config.seconds
    await asyncio.gather(
        *(_loop(config, i, peers, t, until) for i, t in zip(identities, tallies, strict=True))
    )
    window = time.monotonic() - opened
    cpu = time.process_time() - cpu_before
    return {
        "window_s": window,
        "cpu_s": cpu,
        "peer_serials": {f"{serial:x}": n for serial, n in peers.seen.items()},
        "workloads": [
            {
                "spiffe_id": identity.spiffe_id,
                "check_attempts": check.sent,
                "sent": tally.sent,
                "succeeded": tally.succeeded,
                "failures": dict(tally.failures),
                "examples": tally.examples,
                "latencies_ns": tally.latencies_ns,
                "handshakes_ns": tally.handshakes_ns,
                "svids_received": [f"{s:x}" for s in identity.serials_since(opened)],
                "svid_problems": list(identity.problems),
                "source_closed": identity.source.is_closed(),
            }
            for identity, tally, check in zip(identities, tallies, checks, strict=True)
        ],
    }


def run(config: LoadConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="trustmesh-rotation-") as tmp:
        identities: list[Identity] = []
        try:
            for spiffe_id, socket in config.workloads:
                directory = Path(tmp) / str(len(identities))
                directory.mkdir(mode=0o700)
                identities.append(Identity(spiffe_id, socket, directory, config.ready_timeout))
            result, loop = run_async(_drive(config, identities))
        finally:
            for identity in identities:
                with contextlib.suppress(Exception):
                    identity.close()
    return {**result, "event_loop": loop}


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m trustmesh.bench._rotationload CONFIG_JSON", file=sys.stderr)
        return 2
    try:
        result = run(LoadConfig.load(Path(argv[0])))
    except Exception as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
