"""C2SP signed notes with Ed25519 signatures (c2sp.org/signed-note, v1.0.0).

A signed note is a text that ends in a newline, then a blank line, then one or
more signature lines::

    — <key name> base64(4-byte key ID || signature)

The Ed25519 key ID is ``SHA-256(key name || 0x0A || 0x01 || public key)[:4]``
(signed-note "Ed25519 signatures"), and a verifier key is written
``<key name>+<hex key ID>+base64(0x01 || public key)`` (signed-note "Verifier keys").

Verification follows the spec's rules: signatures by unknown keys -- another
name, or the same name with another key ID -- are ignored; a signature by the
known key that fails to verify rejects the whole note; and a note with no valid
signature by the known key is rejected. Only Ed25519 (type 0x01) is supported.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from trustmesh.common.errors import NoteError

ALG_ED25519 = 0x01
"""Signature type identifier byte for Ed25519 (signed-note "Signature types")."""

SIGNATURE_PREFIX = "\u2014 "
"""Em dash and space: how every signature line starts (signed-note "Format")."""

MAX_SIGNATURES = 100
"""The spec requires accepting at least 16 signatures and recommends a limit."""

_ED25519_SIG_SIZE = 64
_ED25519_KEY_SIZE = 32


@dataclass(frozen=True)
class Verifier:
    """A parsed Ed25519 verifier key: the name and key ID that signatures carry,
    and the public key that checks them."""

    name: str
    key_id: int
    public_key: Ed25519PublicKey

    def __str__(self) -> str:
        return verifier_key(self.name, self.public_key)


def _raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_key_name(name: str) -> None:
    """Key names MUST be non-empty and MUST NOT contain Unicode spaces or ``+``
    (signed-note "Format"); control characters are excluded with the note's."""
    if not name:
        raise NoteError("key name is empty")
    for ch in name:
        if ch.isspace() or ch == "+" or ord(ch) < 0x20:
            raise NoteError(f"key name {name!r} contains {ch!r}: spaces and '+' are not allowed")


def key_id(name: str, public_key: Ed25519PublicKey) -> int:
    """SHA-256(key name || 0x0A || 0x01 || public key)[:4] as a big-endian uint32
    (signed-note "Ed25519 signatures")."""
    check_key_name(name)
    material = name.encode() + b"\n" + bytes([ALG_ED25519]) + _raw_public_key(public_key)
    return int.from_bytes(hashlib.sha256(material).digest()[:4], "big")


def verifier_key(name: str, public_key: Ed25519PublicKey) -> str:
    """The verifier key string ``name+hex(key ID)+base64(0x01 || public key)``
    (signed-note "Verifier keys")."""
    encoded = base64.b64encode(bytes([ALG_ED25519]) + _raw_public_key(public_key)).decode()
    return f"{name}+{key_id(name, public_key):08x}+{encoded}"


def _b64decode(text: str, what: str) -> bytes:
    # Standard base64 with padding (RFC 4648 §4), and only its canonical form, so
    # that one value has one spelling.
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise NoteError(f"{what} is not standard base64: {exc}") from None
    if base64.b64encode(raw).decode() != text:
        raise NoteError(f"{what} is not in canonical base64")
    return raw


def parse_verifier_key(vkey: str) -> Verifier:
    """Parse ``name+hexkeyid+base64(0x01||pubkey)``; the key ID must be the one the
    name and key imply (signed-note "Verifier keys": they MUST match)."""
    # The name holds no '+', the hex ID none either; the base64 key may.
    parts = vkey.split("+", 2)
    if len(parts) != 3:
        raise NoteError("verifier key must have three parts, name+keyid+key, separated by '+'")
    name, hex_id, encoded = parts
    check_key_name(name)
    if len(hex_id) != 8 or any(c not in "0123456789abcdef" for c in hex_id):
        raise NoteError(f"verifier key ID {hex_id!r} is not 8 lowercase hex digits")
    raw = _b64decode(encoded, "verifier key material")
    if not raw:
        raise NoteError("verifier key material is empty")
    if raw[0] != ALG_ED25519:
        raise NoteError(f"verifier key type 0x{raw[0]:02x} is not supported (only Ed25519, 0x01)")
    if len(raw) != 1 + _ED25519_KEY_SIZE:
        raise NoteError(
            f"Ed25519 verifier key has {len(raw) - 1} key bytes, expected {_ED25519_KEY_SIZE}"
        )
    public_key = Ed25519PublicKey.from_public_bytes(raw[1:])
    expected = key_id(name, public_key)
    if int(hex_id, 16) != expected:
        raise NoteError(
            f"verifier key ID {hex_id} does not match name and key (expected {expected:08x})"
        )
    return Verifier(name=name, key_id=expected, public_key=public_key)


def _check_characters(text: str, what: str) -> None:
    # Signed notes MUST be valid UTF-8 and MUST NOT contain ASCII control
    # characters other than newline (signed-note "Format").
    for ch in text:
        if ch != "\n" and ord(ch) < 0x20:
            raise NoteError(f"{what} contains control character {ch!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NoteError(f"{what} is not valid UTF-8: {exc.reason}") from None


def check_text(text: str) -> None:
    """A note text must be non-empty, end in a newline and hold no control characters."""
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    _check_characters(text, "note text")


def sign_note(text: str, name: str, private_key: Ed25519PrivateKey) -> str:
    """Sign ``text`` and return the signed note: text, blank line, one signature line.

    The signature is Ed25519 (RFC 8032) over the UTF-8 note text, final newline
    included, prefixed with the 4-byte key ID (signed-note "Signatures").
    """
    check_text(text)
    key = key_id(name, private_key.public_key())
    signature = private_key.sign(text.encode())
    encoded = base64.b64encode(key.to_bytes(4, "big") + signature).decode()
    return f"{text}\n{SIGNATURE_PREFIX}{name} {encoded}\n"


@dataclass(frozen=True)
class Signature:
    """One parsed signature line: key name, key ID, and the signature bytes after it."""

    name: str
    key_id: int
    signature: bytes


def split_note(note: str) -> tuple[str, list[Signature]]:
    """Split a signed note into its text and signature lines, checking the format
    (signed-note "Format"); no signature is verified here."""
    _check_characters(note, "note")
    if not note.endswith("\n"):
        raise NoteError("note must end with a newline")
    # The text is separated from the signatures by the last empty line.
    split = note.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    text, block = note[: split + 1], note[split + 2 :]
    if not block:
        raise NoteError("note has no signature lines")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has {len(lines)} signatures, more than {MAX_SIGNATURES}")
    signatures: list[Signature] = []
    for number, line in enumerate(lines, 1):
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"signature line {number} does not start with an em dash and a space")
        name, sep, encoded = line[len(SIGNATURE_PREFIX) :].partition(" ")
        if not sep:
            raise NoteError(f"signature line {number} has no space between key name and signature")
        check_key_name(name)
        raw = _b64decode(encoded, f"signature line {number}")
        if len(raw) < 5:
            raise NoteError(f"signature line {number} is too short for a key ID and a signature")
        signatures.append(Signature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return text, signatures


def verify_note(note: str, verifier: str | Verifier) -> str:
    """Verify ``note`` with one verifier key and return its text.

    Signatures whose (name, key ID) is not the verifier's are ignored, as the
    spec requires (other witnesses, rotated keys). A signature by the verifier's
    key must verify, and there must be at least one. Raises :class:`NoteError`.
    """
    known = parse_verifier_key(verifier) if isinstance(verifier, str) else verifier
    text, signatures = split_note(note)
    message = text.encode()
    verified = False
    same_name_other_id = False
    for sig in signatures:
        if sig.name != known.name:
            continue
        if sig.key_id != known.key_id:
            same_name_other_id = True
            continue
        if len(sig.signature) != _ED25519_SIG_SIZE:
            raise NoteError(
                f"signature by {known.name} is not a {_ED25519_SIG_SIZE}-byte Ed25519 signature"
            )
        try:
            known.public_key.verify(sig.signature, message)
        except InvalidSignature:
            raise NoteError(f"signature by {known.name} does not verify") from None
        verified = True
    if not verified:
        if same_name_other_id:
            raise NoteError(
                f"note is signed by {known.name} with another key (key ID differs from "
                f"{known.key_id:08x})"
            )
        raise NoteError(f"note has no signature by {known.name}")
    return text
