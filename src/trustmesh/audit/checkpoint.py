"""C2SP transparency log checkpoints (c2sp.org/tlog-checkpoint), signed as notes.

A checkpoint's note text is, line by line (tlog-checkpoint "Note text"):

1. the origin, a non-empty identifier of the log;
2. the tree size in ASCII decimal, without leading zeroes;
3. the RFC 6962 root hash of the tree at that size, in standard base64;
4. optional extension lines, each non-empty (their use is NOT RECOMMENDED).

:func:`sign_checkpoint` / :func:`verify_checkpoint` wrap the text in a signed
note (:mod:`trustmesh.audit.note`); the log's key name is its origin, as the
spec recommends (tlog-checkpoint "Signatures").
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from trustmesh.audit.note import Verifier, check_text, sign_note, verify_note
from trustmesh.audit.rfc6962 import HASH_SIZE
from trustmesh.common.errors import CheckpointError, NoteError


@dataclass(frozen=True)
class Checkpoint:
    """A log's signed statement of its tree at one size."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_origin(self.origin)
        if self.size < 0:
            raise CheckpointError(f"tree size {self.size} is negative")
        if len(self.root_hash) != HASH_SIZE:
            raise CheckpointError(
                f"root hash has {len(self.root_hash)} bytes, expected {HASH_SIZE}"
            )
        for line in self.extensions:
            if not line or "\n" in line:
                raise CheckpointError("extension lines must be non-empty single lines")

    def text(self) -> str:
        """The note text of this checkpoint, final newline included."""
        return format_checkpoint(self.origin, self.size, self.root_hash, self.extensions)


def _check_origin(origin: str) -> None:
    if not origin:
        raise CheckpointError("origin line is empty")
    if "\n" in origin:
        raise CheckpointError("origin must be a single line")


def format_checkpoint(
    origin: str, size: int, root_hash: bytes, extensions: tuple[str, ...] = ()
) -> str:
    """The checkpoint note text: origin, decimal size, base64 root, extension lines."""
    _check_origin(origin)
    if size < 0:
        raise CheckpointError(f"tree size {size} is negative")
    if len(root_hash) != HASH_SIZE:
        raise CheckpointError(f"root hash has {len(root_hash)} bytes, expected {HASH_SIZE}")
    lines = [origin, str(size), base64.b64encode(root_hash).decode(), *extensions]
    for line in extensions:
        if not line or "\n" in line:
            raise CheckpointError("extension lines must be non-empty single lines")
    text = "\n".join(lines) + "\n"
    try:
        check_text(text)
    except NoteError as exc:
        raise CheckpointError(str(exc)) from None
    return text


def parse_checkpoint(text: str) -> Checkpoint:
    """Parse a checkpoint note text (not a signed note: see :func:`verify_checkpoint`)."""
    if not text.endswith("\n"):
        raise CheckpointError("checkpoint text must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError(f"checkpoint has {len(lines)} lines, needs at least 3")
    origin, size_line, root_line, *extensions = lines
    if not origin:
        raise CheckpointError("origin line is empty")
    # ASCII decimal, no sign, no leading zeroes unless the tree is empty.
    if not size_line or not all("0" <= c <= "9" for c in size_line):
        raise CheckpointError(f"tree size {size_line!r} is not an ASCII decimal number")
    if len(size_line) > 1 and size_line[0] == "0":
        raise CheckpointError(f"tree size {size_line!r} has leading zeroes")
    if len(size_line) > 20:
        raise CheckpointError(f"tree size {size_line!r} does not fit in 64 bits")
    size = int(size_line)
    if size >= 1 << 64:
        raise CheckpointError(f"tree size {size_line!r} does not fit in 64 bits")
    try:
        root_hash = base64.b64decode(root_line.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise CheckpointError(f"root hash {root_line!r} is not standard base64") from None
    if base64.b64encode(root_hash).decode() != root_line:
        raise CheckpointError(f"root hash {root_line!r} is not in canonical base64")
    for number, line in enumerate(extensions, 4):
        if not line:
            raise CheckpointError(f"extension line {number} is empty")
    try:
        check_text(text)
    except NoteError as exc:
        raise CheckpointError(str(exc)) from None
    return Checkpoint(origin, size, root_hash, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, private_key: Ed25519PrivateKey) -> str:
    """The checkpoint as a signed note, signed under the key name ``checkpoint.origin``."""
    return sign_note(checkpoint.text(), checkpoint.origin, private_key)


def verify_checkpoint(note: str, verifier: str | Verifier, origin: str | None = None) -> Checkpoint:
    """Verify a signed checkpoint with the log's verifier key and parse it.

    The origin line must equal ``origin`` when given, else the verifier's key
    name -- a checkpoint for another log is rejected even if the key matches.
    Raises :class:`CheckpointError` (a :class:`NoteError` for signature failures
    is wrapped, with its message).
    """
    try:
        text = verify_note(note, verifier)
        name = verifier.name if isinstance(verifier, Verifier) else verifier.split("+", 1)[0]
    except NoteError as exc:
        raise CheckpointError(f"checkpoint signature: {exc}") from exc
    checkpoint = parse_checkpoint(text)
    expected = name if origin is None else origin
    if checkpoint.origin != expected:
        raise CheckpointError(
            f"checkpoint origin {checkpoint.origin!r} is not the expected {expected!r}"
        )
    return checkpoint
