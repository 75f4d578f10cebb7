"""Protection of private keys at rest.

Signing keys live in the database so that every control-plane replica can sign, but
never in the clear: each private key (PKCS#8 DER) is sealed with AES-256-GCM under a
32-byte master key that is *not* in the database. The key id is the associated data,
so a sealed key copied onto another row fails to open. A database dump or replica
without the master key yields no signing key.

The master key comes from one of two places (DESIGN §7):

* ``--master-key-file F`` (or ``TRUSTMESH_MASTER_KEY_FILE``): read, never written;
  it may be a symlink and readable by others (a Kubernetes Secret mount is both), but
  not writable by others (:meth:`MasterKey.load`).
* ``<data-dir>/master.key``: created on first start, mode 0600, exclusively (two
  replicas starting at once on one data dir agree on one key); an existing one is used
  only if it is a regular file, not a symlink, ours, and open to no one else
  (:meth:`MasterKey.load_or_create`)."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustmesh.common.errors import ConfigError, MasterKeyError
from trustmesh.common.files import create_exclusively, read_mounted_file, read_private_file

_PREFIX = "aes256gcm:v1:"
CHECK_AAD = b"trustmesh master key check"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _parse(raw: bytes, path: Path) -> bytes:
    try:
        key = _unb64(raw.decode("ascii").strip())
    except ValueError:  # UnicodeDecodeError and binascii.Error are ValueErrors
        key = b""
    if len(key) != 32:
        raise MasterKeyError(f"master key {path} is not 32 base64url-encoded bytes")
    return key


def _read_own(path: Path) -> bytes:
    try:
        return read_private_file(path, "master key")
    except ConfigError as exc:
        raise MasterKeyError(exc.description) from None


class MasterKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise MasterKeyError("master key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def load(cls, path: Path) -> MasterKey:
        """A master key an operator gives (``--master-key-file``): read only; refused
        when it is missing, not a regular file, or writable by others."""
        try:
            raw = read_mounted_file(path, "master key file")
        except ConfigError as exc:
            raise MasterKeyError(exc.description) from None
        return cls(_parse(raw, path))

    @classmethod
    def load_or_create(cls, path: Path) -> MasterKey:
        """The data dir's master key: created (0600) if nothing is at ``path``, else
        read, refused unless it is a regular file, not a symlink, owned by us, and
        neither readable nor writable by group or others."""
        try:
            return cls(_parse(_read_own(path), path))
        except FileNotFoundError:
            pass
        key = secrets.token_bytes(32)
        if create_exclusively(path, _b64(key) + "\n"):
            return cls(key)
        try:  # another replica created it a moment ago: use that one
            return cls(_parse(_read_own(path), path))
        except FileNotFoundError:
            raise MasterKeyError(f"master key {path} vanished while it was created") from None

    def seal(self, plaintext: bytes, aad: bytes) -> str:
        nonce = secrets.token_bytes(12)
        return _PREFIX + _b64(nonce + self._aead.encrypt(nonce, plaintext, aad))

    def open(self, sealed: str, aad: bytes) -> bytes:
        if not sealed.startswith(_PREFIX):
            raise MasterKeyError("sealed value has an unknown format")
        raw = _unb64(sealed[len(_PREFIX) :])
        try:
            return self._aead.decrypt(raw[:12], raw[12:], aad)
        except InvalidTag:
            raise MasterKeyError(
                "the master key does not open the signing keys in this database: every replica "
                "needs the same master key (copy master.key or set TRUSTMESH_MASTER_KEY_FILE)"
            ) from None
