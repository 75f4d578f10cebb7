"""C2SP signed notes: the spec's and Go's vectors, round trips, and tampering."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from audit_vectors import probes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.audit.note import (
    key_id,
    parse_verifier_key,
    sign_note,
    split_note,
    verifier_key,
    verify_note,
)
from trustmesh.common.errors import NoteError

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
NAME = "audit.trustmesh.example/log"
VKEY = verifier_key(NAME, KEY.public_key())
VKEY_PREFIX = "+".join(VKEY.split("+", 2)[:2]) + "+"  # name+keyid+


@pytest.mark.parametrize("vector", probes("note"))
def test_note_vector(vector: dict[str, Any]) -> None:
    if vector["want_error"]:
        with pytest.raises(NoteError):
            verify_note(vector["note"], vector["verifier_key"])
    else:
        assert verify_note(vector["note"], vector["verifier_key"]) == vector["want_text"]


def test_vector_keys_reencode_identically() -> None:
    for param in probes("note"):
        vkey = param.values[0]["verifier_key"]
        parsed = parse_verifier_key(vkey)
        assert verifier_key(parsed.name, parsed.public_key) == vkey == str(parsed)


def test_signing_reproduces_the_fixed_key_vector() -> None:
    (vector,) = [p.values[0] for p in probes("note") if p.id.endswith("checkpoint-tree8.json")]
    key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(vector["private_seed"]))
    assert verifier_key(vector["origin"], key.public_key()) == vector["verifier_key"]
    # Ed25519 is deterministic, so the whole note is reproducible.
    assert sign_note(vector["want_text"], vector["origin"], key) == vector["note"]


def test_round_trip() -> None:
    note = sign_note("hello\nworld\n", NAME, KEY)
    assert note.startswith("hello\nworld\n\n\u2014 audit.trustmesh.example/log ")
    assert verify_note(note, VKEY) == "hello\nworld\n"


def test_text_may_contain_blank_lines() -> None:
    text = "first\n\nsecond\n"
    assert verify_note(sign_note(text, NAME, KEY), VKEY) == text


@given(
    st.lists(
        st.text(alphabet=st.characters(min_codepoint=0x20, codec="utf-8"), max_size=30),
        min_size=1,
        max_size=5,
    )
)
def test_any_valid_text_round_trips(lines: list[str]) -> None:
    text = "\n".join(lines) + "\n"
    assert verify_note(sign_note(text, NAME, KEY), VKEY) == text


def _resign(note: str, signature: bytes) -> str:
    text, _ = split_note(note)
    kid = key_id(NAME, KEY.public_key()).to_bytes(4, "big")
    return f"{text}\n\u2014 {NAME} {base64.b64encode(kid + signature).decode()}\n"


def test_changed_text_is_rejected() -> None:
    note = sign_note("size 10\n", NAME, KEY)
    with pytest.raises(NoteError, match="does not verify"):
        verify_note(note.replace("size 10", "size 11"), VKEY)


def test_changed_signature_is_rejected() -> None:
    note = sign_note("size 10\n", NAME, KEY)
    _, (sig,) = split_note(note)
    forged = bytes([sig.signature[0] ^ 1]) + sig.signature[1:]
    with pytest.raises(NoteError, match="does not verify"):
        verify_note(_resign(note, forged), VKEY)


def test_truncated_signature_is_rejected() -> None:
    note = sign_note("size 10\n", NAME, KEY)
    _, (sig,) = split_note(note)
    with pytest.raises(NoteError, match="64-byte Ed25519"):
        verify_note(_resign(note, sig.signature[:-1]), VKEY)


def test_other_key_under_the_same_name_is_not_accepted() -> None:
    other = Ed25519PrivateKey.from_private_bytes(bytes(32))
    note = sign_note("size 10\n", NAME, other)
    with pytest.raises(NoteError, match="with another key"):
        verify_note(note, VKEY)


def test_signature_under_another_name_is_not_accepted() -> None:
    note = sign_note("size 10\n", "someone.else/log", KEY)
    with pytest.raises(NoteError, match=re.escape(f"no signature by {NAME}")):
        verify_note(note, VKEY)


def test_text_without_final_newline_cannot_be_signed() -> None:
    with pytest.raises(NoteError, match="end with a newline"):
        sign_note("no newline", NAME, KEY)


def test_note_without_final_newline_is_rejected() -> None:
    with pytest.raises(NoteError, match="end with a newline"):
        verify_note(sign_note("x\n", NAME, KEY)[:-1], VKEY)


def test_control_characters_are_refused() -> None:
    with pytest.raises(NoteError, match="control character"):
        sign_note("a\rb\n", NAME, KEY)


@pytest.mark.parametrize("name", ["", "has space", "has+plus", "tab\there", "nbsp\u00a0"])
def test_bad_key_names_are_refused(name: str) -> None:
    with pytest.raises(NoteError, match="key name"):
        sign_note("x\n", name, KEY)


def test_signature_count_is_limited() -> None:
    note = sign_note("x\n", NAME, KEY)
    extra = "\u2014 other.example/w AAAAAAAA\n" * 100
    with pytest.raises(NoteError, match="more than 100"):
        verify_note(note + extra, VKEY)


def test_verifier_key_format() -> None:
    name, hex_id, material = VKEY.split("+", 2)
    assert "+" in material  # this key's base64 has a '+': parsing must not split there
    assert name == NAME
    assert hex_id == f"{key_id(NAME, KEY.public_key()):08x}"
    raw = base64.b64decode(material)
    assert raw[0] == 0x01
    assert len(raw) == 33


@pytest.mark.parametrize(
    ("vkey", "message"),
    [
        ("only+two", "three parts"),
        ("a+b+c+d", "8 lowercase hex"),
        (f"+{VKEY.split('+', 1)[1]}", "key name is empty"),
        (VKEY.replace("+", "+0", 1), "8 lowercase hex"),
        (VKEY.replace(VKEY.split("+")[1], VKEY.split("+")[1].upper()), "hex"),
        (VKEY[:-1] + "!", "base64"),
        (VKEY_PREFIX + base64.b64encode(b"\x02" + bytes(32)).decode(), "0x02"),
        (VKEY_PREFIX + base64.b64encode(b"\x01" + bytes(31)).decode(), "31 key"),
        (VKEY_PREFIX, "empty"),
        (VKEY.replace(VKEY.split("+")[1], "00000000"), "does not match"),
        ("other.example+" + VKEY.split("+", 1)[1], "does not match"),
    ],
)
def test_malformed_verifier_keys_are_refused(vkey: str, message: str) -> None:
    with pytest.raises(NoteError, match=message):
        parse_verifier_key(vkey)
