"""Audit (DESIGN §6): the pure core of the tamper-evident log.

One module per spec: ``rfc6962`` (RFC 9162 §2.1.1 tree hashing), ``proof``
(RFC 9162 §2.1.3-2.1.4 proofs), ``compact`` (the append-only in-memory tree),
``note`` (C2SP signed-note, Ed25519), ``checkpoint`` (C2SP tlog-checkpoint) and
``canonical`` (RFC 8785 canonical JSON of events). No server, database or HTTP
code is imported here.
"""

from trustmesh.audit.canonical import canonical_bytes, format_time, parse_time
from trustmesh.audit.checkpoint import (
    Checkpoint,
    format_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.note import Verifier, parse_verifier_key, sign_note, verifier_key, verify_note
from trustmesh.audit.proof import (
    consistency_proof,
    inclusion_proof,
    verify_consistency,
    verify_inclusion,
)
from trustmesh.audit.rfc6962 import EMPTY_ROOT, leaf_hash, node_hash, root
from trustmesh.common.errors import CanonicalError, CheckpointError, NoteError, ProofError

__all__ = [
    "EMPTY_ROOT",
    "CanonicalError",
    "Checkpoint",
    "CheckpointError",
    "MerkleLog",
    "NoteError",
    "ProofError",
    "Verifier",
    "canonical_bytes",
    "consistency_proof",
    "format_checkpoint",
    "format_time",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "parse_checkpoint",
    "parse_time",
    "parse_verifier_key",
    "root",
    "sign_checkpoint",
    "sign_note",
    "verifier_key",
    "verify_checkpoint",
    "verify_consistency",
    "verify_inclusion",
    "verify_note",
]
