"""Protection of private keys at rest.

Signing keys live in the database so that every control-plane replica can sign, but
never in the clear: each private key (PKCS#8 DER) is sealed with AES-256-GCM under a
32-byte master key that is *not* in the database. The key id is the associated data,
so a sealed key copied onto another row fails to open. The master key comes from
``TRUSTMESH_MASTER_KEY_FILE`` or ``<data-dir>/master.key`` (created on first start,
mode 0600). A database dump or replica without the master key yields no signing key."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from trustmesh.common.errors import MasterKeyError
from trustmesh.common.files import write_atomically

_PREFIX = "aes256gcm:v1:"
CHECK_AAD = b"trustmesh master key check"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class MasterKey:
    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise MasterKeyError("master key must be 32 bytes")
        self._aead = AESGCM(key)

    @classmethod
    def load_or_create(cls, path: Path) -> MasterKey:
        if path.exists():
            try:
                key = _unb64(path.read_text().strip())
            except OSError as exc:
                raise MasterKeyError(f"cannot read master key {path}: {exc.strerror}") from None
            except ValueError:
                key = b""
            if len(key) != 32:
                raise MasterKeyError(f"master key {path} is not 32 base64url-encoded bytes")
            return cls(key)
        key = secrets.token_bytes(32)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, _b64(key) + "\n")
        return cls(key)

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
