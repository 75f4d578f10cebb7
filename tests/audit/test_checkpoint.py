"""C2SP tlog-checkpoint bodies, and checkpoints signed as notes."""

from __future__ import annotations

import re
from typing import Any

import pytest
from audit_vectors import load, probes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.audit.checkpoint import (
    Checkpoint,
    format_checkpoint,
    parse_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from trustmesh.audit.compact import MerkleLog
from trustmesh.audit.note import verifier_key
from trustmesh.common.errors import CheckpointError

CASES = load("checkpoint.json")["cases"]
KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ORIGIN = "audit.trustmesh.example/log"
VKEY = verifier_key(ORIGIN, KEY.public_key())


@pytest.mark.parametrize("case", CASES, ids=[c["desc"] for c in CASES])
def test_checkpoint_body_vector(case: dict[str, Any]) -> None:
    if "want_error" in case:
        with pytest.raises(CheckpointError, match=case["want_error"]):
            parse_checkpoint(case["text"])
        return
    parsed = parse_checkpoint(case["text"])
    want = case["want"]
    assert parsed == Checkpoint(
        want["origin"], want["size"], bytes.fromhex(want["root"]), tuple(want["extensions"])
    )
    assert parsed.text() == case["text"]


def test_signed_checkpoint_vector_verifies() -> None:
    (vector,) = [p.values[0] for p in probes("note") if p.id.endswith("checkpoint-tree8.json")]
    checkpoint = verify_checkpoint(vector["note"], vector["verifier_key"])
    assert checkpoint == Checkpoint(vector["origin"], 8, bytes.fromhex(vector["root"]))


origins = st.text(
    alphabet=st.characters(min_codepoint=0x21, exclude_categories=("Cs", "Zs", "Zl", "Zp")),
    min_size=1,
    max_size=40,
)


@given(
    origins,
    st.integers(min_value=0, max_value=2**64 - 1),
    st.binary(min_size=32, max_size=32),
    st.lists(origins, max_size=3),
)
def test_format_and_parse_round_trip(origin: str, size: int, root: bytes, ext: list[str]) -> None:
    text = format_checkpoint(origin, size, root, tuple(ext))
    assert parse_checkpoint(text) == Checkpoint(origin, size, root, tuple(ext))


def test_log_checkpoint_signs_and_verifies() -> None:
    log = MerkleLog()
    log.extend([b"a", b"b", b"c"])
    note = sign_checkpoint(Checkpoint(ORIGIN, log.size, log.root()), KEY)
    assert note.startswith(f"{ORIGIN}\n3\n")
    checkpoint = verify_checkpoint(note, VKEY)
    assert (checkpoint.size, checkpoint.root_hash) == (3, log.root())


def test_tampered_size_is_rejected() -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 3, bytes(32)), KEY)
    with pytest.raises(CheckpointError, match="does not verify"):
        verify_checkpoint(note.replace("\n3\n", "\n4\n", 1), VKEY)


def test_checkpoint_of_another_origin_is_rejected() -> None:
    note = sign_checkpoint(Checkpoint(ORIGIN, 3, bytes(32)), KEY)
    with pytest.raises(CheckpointError, match=re.escape("not the expected 'other.example/log'")):
        verify_checkpoint(note, VKEY, origin="other.example/log")


def test_origin_must_match_key_name_by_default() -> None:
    from trustmesh.audit.note import sign_note

    text = format_checkpoint("some.other/log", 3, bytes(32))
    note = sign_note(text, ORIGIN, KEY)
    with pytest.raises(CheckpointError, match=re.escape("origin 'some.other/log'")):
        verify_checkpoint(note, VKEY)
    assert verify_checkpoint(note, VKEY, origin="some.other/log").size == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("", 1, bytes(32)), "origin"),
        (("a\nb", 1, bytes(32)), "single line"),
        (("o", -1, bytes(32)), "negative"),
        (("o", 1, bytes(31)), "31 bytes"),
        (("o", 1, bytes(32), ("",)), "extension"),
    ],
)
def test_format_refuses_bad_fields(args: Any, message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        format_checkpoint(*args)
