"""Authorization from mTLS (DESIGN §9): the identity of a client certificate that the
Envoy in front verified and forwarded in ``x-forwarded-client-cert`` (XFCC), read only
when the agent runs with ``--trust-xfcc`` and the check carries no bearer token.

**The header** (Envoy's format, docs "HTTP header manipulation: x-forwarded-client-cert"):
comma-separated *elements*, one per proxy that added one, each a ``;``-separated list of
``Key=Value`` pairs; keys are case-insensitive; a value containing ``,``, ``;`` or ``=``
is double-quoted, with ``\\"`` for a quote inside. Envoy's keys: ``By``, ``Hash`` (SHA-256
of the client certificate's DER), ``Cert`` (the certificate, URL-encoded PEM), ``Chain``
(the chain, leaf first, URL-encoded PEM), ``Subject``, ``URI``, ``DNS``.

**Which element counts: the last one.** A proxy appends its element at the end, so the
last element is what the nearest Envoy — the one the agent trusts — says about the
connection it terminated; anything before it came from further away. With
``forward_client_cert_details: SANITIZE_SET`` (what ``trustmesh envoy config`` sets)
there is exactly one. Refused as ``malformed_xfcc``, never guessed at: more than one XFCC
header line (two proxies, or a caller, disagreeing about who the client is), more than
:data:`MAX_XFCC_BYTES`, :data:`MAX_ELEMENTS` or :data:`MAX_PAIRS`, a quoting error, an
empty element, anything but printable ASCII, a last element without exactly one
``Cert`` and one ``URI``, a second ``Hash`` or ``Chain``, a ``Hash`` that is not the
certificate's, a ``Chain`` that does not start with the certificate, and a ``URI`` that
is not the certificate's one URI SAN.

**The certificate** is then validated as an X.509-SVID (``identity/x509validate.py``):
SVID shape, validity on the decision's clock, and a chain to the bundle of its own trust
domain (:class:`~trustmesh.agent.roots.RootHolder` is the per-trust-domain lookup:
today our own roots; federated partners' bundles plug in there).

**Verified certificates are cached** by the SHA-256 of the header line (bounded, FIFO),
each until its notAfter; every use checks the validity window again on the decision's
clock. A change of the roots held empties the cache. The claims come from the policy
bundle's inventory (``identities``: every registered SPIFFE ID with its workload's
claims, ``policy/compiler.py``), taken again whenever the bundle changes; a SPIFFE ID
the inventory does not hold is refused (``unregistered``). Revocation (a subject or
cluster revocation covers a certificate whose notBefore is at or before its cut-off) is
the pipeline's next step, ``agent/revocations.py``, as for tokens: the identity's
``iat`` is the notBefore, its ``kid`` the fingerprint of the root it chains to."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from trustmesh.common.errors import InvalidToken
from trustmesh.identity.svid import VerifiedIdentity
from trustmesh.identity.x509validate import (
    MAX_INTERMEDIATES,
    VerifiedSvid,
    certificates_of_pem,
    validate_svid,
)

if TYPE_CHECKING:  # annotations only
    from trustmesh.agent.roots import RootHolder
    from trustmesh.policy.engine import Engine

HEADER = "x-forwarded-client-cert"
MAX_XFCC_BYTES = 16 * 1024
MAX_ELEMENTS = 16
MAX_PAIRS = 64
X509_SVID = "x509-svid"
"""The credential kind, as audit events name it."""

# One Key=Value pair and what follows it: a quoted value (backslash escapes) or a bare
# one (no quote, comma or semicolon), then a separator or the end.
_PAIR = re.compile(r'([A-Za-z]+)=(?:"([^"\\]*(?:\\.[^"\\]*)*)"|([^",;\\]*))([,;]|\Z)')
_ESCAPE = re.compile(r"\\(.)")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")


def _malformed(description: str) -> InvalidToken:
    return InvalidToken("malformed_xfcc", description)


@dataclass(frozen=True, slots=True)
class XfccHeader:
    """The XFCC header lines of one check, as received: the credential the pipeline
    authenticates (``agent/decide.py``)."""

    lines: tuple[bytes, ...]

    def der_sha256(self) -> str | None:
        """The SHA-256 of the certificate's DER if the header yields one, for the audit
        record of a refusal; None when it does not."""
        try:
            return hashlib.sha256(client_certificate(self).leaf).hexdigest()
        except InvalidToken:
            return None


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The last XFCC element, parsed and decoded but not yet trusted."""

    uri: str
    leaf: bytes  # DER
    intermediates: tuple[bytes, ...]


def elements(value: str) -> list[list[tuple[str, str]]]:
    """The elements of one XFCC header value, each a list of (lowercase key, value)."""
    if len(value) > MAX_XFCC_BYTES:
        raise _malformed(f"the header is longer than {MAX_XFCC_BYTES} bytes")
    if not _PRINTABLE.fullmatch(value):
        raise _malformed("the header holds a character that is not printable ASCII")
    found: list[list[tuple[str, str]]] = [[]]
    position, pairs = 0, 0
    while True:
        match = _PAIR.match(value, position)
        if match is None:
            raise _malformed(f"the header is not Key=Value pairs (at offset {position})")
        pairs += 1
        if pairs > MAX_PAIRS:
            raise _malformed(f"the header has more than {MAX_PAIRS} pairs")
        quoted = match.group(2)
        if quoted is None:
            text = match.group(3)
        elif "\\" in quoted:
            text = _ESCAPE.sub(r"\1", quoted)
        else:
            text = quoted
        found[-1].append((match.group(1).lower(), text))
        position = match.end()
        separator = match.group(4)
        if not separator:
            return found
        if position == len(value):
            raise _malformed(f"the header ends with {separator!r}")
        if separator == ",":
            if len(found) == MAX_ELEMENTS:
                raise _malformed(f"the header has more than {MAX_ELEMENTS} elements")
            found.append([])


def _only(pairs: list[tuple[str, str]], key: str, required: bool) -> str | None:
    values = [value for name, value in pairs if name == key]
    if len(values) > 1:
        raise _malformed(f"the last element has {len(values)} {key.capitalize()} values")
    if not values:
        if required:
            raise _malformed(f"the last element has no {key.capitalize()}")
        return None
    return values[0]


def _pem(value: str, what: str) -> str:
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        raise _malformed(f"{what} is not URL-encoded UTF-8") from None


def client_certificate(header: XfccHeader) -> ClientCertificate:
    """The certificate the last element of the (single) XFCC header line names, with
    its checks of the header itself (the module docstring); InvalidToken otherwise."""
    if len(header.lines) != 1:
        raise _malformed(
            f"the check carries {len(header.lines)} {HEADER} header lines; one is expected"
        )
    raw = header.lines[0]
    if len(raw) > MAX_XFCC_BYTES:
        raise _malformed(f"the header is longer than {MAX_XFCC_BYTES} bytes")
    last = elements(raw.decode("latin-1"))[-1]
    uri = _only(last, "uri", required=True)
    cert = _only(last, "cert", required=True)
    chain = _only(last, "chain", required=False)
    digest = _only(last, "hash", required=False)
    assert uri is not None and cert is not None
    (leaf,) = certificates_of_pem(_pem(cert, "Cert"), "Cert", 1)
    intermediates: tuple[bytes, ...] = ()
    if chain is not None:
        chained = certificates_of_pem(_pem(chain, "Chain"), "Chain", MAX_INTERMEDIATES + 1)
        if chained[0] != leaf:
            raise _malformed("Chain does not start with the certificate of Cert")
        intermediates = tuple(chained[1:])
    if digest is not None and digest.lower() != hashlib.sha256(leaf).hexdigest():
        raise _malformed("Hash is not the SHA-256 of the certificate of Cert")
    return ClientCertificate(uri, leaf, intermediates)


def forwarded_element(leaf_pem: str, spiffe_id: str) -> str:
    """The XFCC element Envoy's ``SANITIZE_SET`` with ``uri`` and ``cert`` writes for a
    client certificate (``Hash``, ``Cert``, ``URI``): for benchmarks and tests that
    stand in for Envoy."""
    (leaf,) = certificates_of_pem(leaf_pem, "the certificate", 1)
    cert = quote(leaf_pem, safe="")
    return f'Hash={hashlib.sha256(leaf).hexdigest()};Cert="{cert}";URI={spiffe_id}'


def registered_identity(svid: VerifiedSvid, engine: Engine) -> VerifiedIdentity:
    """The identity policy sees: the SPIFFE ID with the claims the bundle's inventory
    holds for it (those a JWT-SVID of that workload carries) and the certificate's
    validity as ``iat``/``nbf``/``exp``; InvalidToken ``unregistered`` for an ID the
    inventory does not hold."""
    entry = engine.identity(svid.spiffe_id)
    registered = entry.get("claims") if entry is not None else None
    if not isinstance(registered, dict):
        raise InvalidToken(
            "unregistered",
            f"{svid.spiffe_id} is not a registered identity of the policy bundle in force",
        )
    not_before = int(svid.not_before)
    claims: dict[str, Any] = {
        **registered,
        "sub": svid.spiffe_id,
        "iat": not_before,
        "nbf": not_before,
        "exp": int(svid.not_after),
    }
    return VerifiedIdentity(
        spiffe_id=svid.spiffe_id,
        claims=claims,
        jti="",  # a certificate has none; a jti revocation never names ""
        kid=svid.root,
        expires_at=svid.not_after,
    )


class Verified:
    """A validated certificate, and its identity under the last engine it was asked for
    (rebuilt when the policy bundle, hence the inventory, changes)."""

    __slots__ = ("engine", "identity", "svid")

    def __init__(self, svid: VerifiedSvid) -> None:
        self.svid = svid
        self.engine: Engine | None = None
        self.identity: VerifiedIdentity | None = None

    def identity_under(self, engine: Engine) -> VerifiedIdentity:
        if self.engine is not engine or self.identity is None:
            self.identity = registered_identity(self.svid, engine)
            self.engine = engine
        return self.identity


class CertificateAuthenticator:
    """XFCC header -> :class:`Verified` (cached), over the roots the agent holds."""

    def __init__(self, roots: RootHolder, cache_size: int = 10_000) -> None:
        if cache_size < 1:
            raise ValueError("cache size must be at least 1")
        self.roots = roots
        self.cache_size = cache_size
        self._entries: dict[bytes, Verified] = {}
        self._generation = roots.generation
        self.hits = 0
        self.misses = 0

    def authenticate(self, header: XfccHeader, now: float) -> Verified:
        """The validated certificate of ``header`` at ``now``, or InvalidToken."""
        if self._generation != self.roots.generation:  # roots changed: trust anew
            self._entries.clear()
            self._generation = self.roots.generation
        lines = header.lines
        key = hashlib.sha256(lines[0]).digest() if len(lines) == 1 else b""
        verified = self._entries.get(key)
        if verified is not None:
            svid = verified.svid
            if svid.not_before <= now <= svid.not_after:
                self.hits += 1
                return verified
            del self._entries[key]
        self.misses += 1
        presented = client_certificate(header)
        if not self.roots.fingerprints:
            raise InvalidToken(
                "not_ready", "the agent holds no CA roots from the control plane yet"
            )
        svid = validate_svid(
            presented.leaf,
            presented.intermediates,
            lambda domain: self.roots.store(domain, now),
            now,
        )
        if svid.spiffe_id != presented.uri:
            raise _malformed("URI is not the certificate's SPIFFE ID")
        verified = Verified(svid)
        entries = self._entries
        if len(entries) >= self.cache_size:
            del entries[next(iter(entries))]
        entries[key] = verified
        return verified

    def __len__(self) -> int:
        return len(self._entries)
