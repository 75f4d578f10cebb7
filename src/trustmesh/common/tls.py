"""TLS for trustmesh's HTTP servers and for its clients (DESIGN §7: ``--tls-cert FILE
--tls-key FILE`` on ``trustmesh server`` and ``trustmesh agent``; the Kubernetes API
server calls admission webhooks only over HTTPS).

**Serving** (:class:`ServerTls`). The certificate file holds the chain (PEM, leaf
first), the key file its private key (PEM, unencrypted: a server that starts on its own
has no one to type a passphrase). Both are read as mounted secrets are
(``common/files.read_mounted_file``: a Kubernetes Secret's symlinks are followed, a
file others may write is refused), the key must match the leaf, and every problem is
one :class:`~trustmesh.common.errors.ConfigError` line before the server binds. TLS 1.2
is the oldest version offered; ALPN offers ``http/1.1`` only. The files are watched:
once a second at most, on a new connection, their identity (device, inode, size,
modification time) is compared with the loaded one, and a changed pair is loaded for
the connections that follow (cert-manager and kubelet replace Secret files by swapping
a symlink, which this sees). A pair that does not load (half written, a key that does
not match yet) is logged and the previous one kept.

The handshake itself runs inside the bounded HTTP protocol (``common/serving.py``), so
a connection counts against ``--max-connections`` from its TCP accept and must finish
its handshake *and* its request head within ``--header-timeout``.

**Clients** (:func:`client_verify`): every trustmesh client of the control plane or of
an agent (CLI, agent, sidecar, SDK) verifies the server's certificate; by default
against the public roots (certifi, as httpx does), or — with ``--ca-file PEM`` or
``TRUSTMESH_CA_FILE`` — against the CA certificates of that file alone (as curl's
``--cacert``), for servers behind a private CA. :func:`tls_problem` turns a failed
verification, wherever it sits in an exception chain, into one line that says what to
do."""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from trustmesh.common.errors import ConfigError
from trustmesh.common.files import read_mounted_file

log = logging.getLogger("trustmesh.tls")

CA_FILE_ENV = "TRUSTMESH_CA_FILE"
RELOAD_CHECK_INTERVAL = 1.0
"""Seconds between two looks at the certificate and key files (on a new connection)."""
CA_HINT = f"give the CA that signed it with --ca-file PEM or {CA_FILE_ENV}"


def certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    """The PEM certificates in ``data`` (read from ``path``); ConfigError for none."""
    try:
        found = x509.load_pem_x509_certificates(data)
    except ValueError:
        found = []
    if not found:
        raise ConfigError(f"{what} {path} holds no PEM certificate")
    return found


def read_ca_file(path: Path, what: str = "CA file") -> bytes:
    """A PEM file of CA certificates as given (ConfigError: missing, writable by
    others, larger than 1 MiB, or no certificate in it)."""
    data = read_mounted_file(path, what)
    certificates(data, path, what)
    return data


def _no_passphrase() -> bytes:
    raise ConfigError("encrypted")


@dataclass(frozen=True)
class _Loaded:
    context: ssl.SSLContext
    identity: tuple[tuple[int, int, int, int], ...]
    subject: str


def _identity(*paths: Path) -> tuple[tuple[int, int, int, int], ...]:
    stats = [os.stat(path) for path in paths]
    return tuple((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) for st in stats)


def load_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """An SSL server context from a PEM chain and its key; ConfigError (one line)
    naming the file and the problem otherwise."""
    return _load(cert, key).context


def _load(cert: Path, key: Path) -> _Loaded:
    try:
        identity = _identity(cert, key)
    except OSError as exc:
        missing = cert if not cert.exists() else key
        raise ConfigError(f"cannot read TLS file {missing}: {exc.strerror}") from None
    chain = certificates(read_mounted_file(cert, "TLS certificate file"), cert, "--tls-cert")
    key_pem = read_mounted_file(key, "TLS key file")
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"--tls-key {key} is encrypted: give an unencrypted PEM key (keep it in a "
            "Secret readable by the server only)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"--tls-key {key} holds no PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if private.public_key().public_bytes(der, spki) != chain[0].public_key().public_bytes(
        der, spki
    ):
        raise ConfigError(
            f"--tls-key {key} is not the key of the first certificate in --tls-cert {cert}"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except (ssl.SSLError, OSError, ConfigError) as exc:
        # the files changed between the checks above and this load
        raise ConfigError(f"cannot load --tls-cert {cert} with --tls-key {key}: {exc}") from None
    return _Loaded(context, identity, chain[0].subject.rfc4514_string())


class ServerTls:
    """The serving certificate of one process: loaded at start (ConfigError), then
    reloaded when its files change (see the module docstring)."""

    def __init__(self, cert: Path, key: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self.cert = cert
        self.key = key
        self._clock = clock
        self._loaded = _load(cert, key)
        self._checked = clock()
        self._lock = threading.Lock()
        self.reloads = 0

    @property
    def subject(self) -> str:
        return self._loaded.subject

    def context(self) -> ssl.SSLContext:
        """The context for a new connection (the newest pair that loaded)."""
        now = self._clock()
        if now - self._checked >= RELOAD_CHECK_INTERVAL and self._lock.acquire(blocking=False):
            try:
                self._checked = now
                self._reload_if_changed()
            finally:
                self._lock.release()
        return self._loaded.context

    def _reload_if_changed(self) -> None:
        try:
            if _identity(self.cert, self.key) == self._loaded.identity:
                return
            loaded = _load(self.cert, self.key)
        except (OSError, ConfigError) as exc:
            log.warning("TLS: keeping the loaded certificate: %s", exc)
            return
        self._loaded = loaded
        self.reloads += 1
        log.warning("TLS: reloaded the certificate of %s from %s", loaded.subject, self.cert)


def server_tls(cert: Path | None, key: Path | None) -> ServerTls | None:
    """``--tls-cert``/``--tls-key`` as given: both (HTTPS), neither (HTTP), or a
    ConfigError for one alone."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise ConfigError(f"{given} needs {missing} too (both, or neither for plain HTTP)")
    return ServerTls(cert, key)


# -- clients ------------------------------------------------------------------------------
def client_verify(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext | bool:
    """What an httpx client verifies servers with (its ``verify=``): the CA
    certificates of ``ca_file`` — or of ``TRUSTMESH_CA_FILE`` when ``ca_file`` is None —
    trusted alone; ``True`` (httpx's default roots) when neither names a file.
    ConfigError (one line) for a file that is missing, writable by others, or holds no
    PEM certificate."""
    if ca_file is None:
        ca_file = os.environ.get(CA_FILE_ENV) or None
    if ca_file is None:
        return True
    path = Path(ca_file)
    data = read_ca_file(path)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=data.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise ConfigError(f"CA file {path} cannot be used: {exc}") from None
    return context


def tls_problem(exc: BaseException) -> str | None:
    """One line for a failed TLS handshake anywhere in ``exc``'s chain (httpx wraps the
    ``ssl`` error twice), None when it is not one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            reason = current.verify_message or current.reason or "verification failed"
            return f"the server's TLS certificate is not trusted ({reason}): {CA_HINT}"
        if isinstance(current, ssl.SSLError):
            return f"the TLS handshake failed ({current.reason or current})"
        current = current.__cause__ or current.__context__
    return None
