"""Foreign SPIFFE bundles (``identity/spiffe_bundle.py``): named vectors under
``testdata/spiffe_bundles`` (``good/`` parse, each ``bad/`` file is refused with the
reason ``bad/expected.json`` gives), the bounds, the re-read of what we keep, what the
control plane ships to agents and sidecars; and by property, never anything but a
bundle or a BundleError."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.common.errors import BundleError
from trustmesh.identity.jws import VerificationKey
from trustmesh.identity.spiffe_bundle import (
    MAX_BUNDLE_BYTES,
    MAX_BUNDLE_KEYS,
    parse_bundle,
    read_federated,
)

VECTORS = Path(__file__).parent / "testdata" / "spiffe_bundles"
GOOD = sorted((VECTORS / "good").glob("*.json"))
EXPECTED: dict[str, str] = json.loads((VECTORS / "bad" / "expected.json").read_text())
DOMAIN = "partner.example"


def vector(kind: str, name: str) -> bytes:
    return (VECTORS / kind / name).read_bytes()


@pytest.mark.parametrize("path", GOOD, ids=[p.name for p in GOOD])
def test_good_vectors_parse_and_read_back_identically(path: Path) -> None:
    bundle = parse_bundle(path.read_bytes(), DOMAIN)
    assert bundle.trust_domain == DOMAIN
    again = parse_bundle(bundle.canonical().encode(), DOMAIN)
    assert again.canonical() == bundle.canonical()
    for key in bundle.jwt_keys:  # every JWT key is pinned to one algorithm
        assert VerificationKey.from_jwk(key).alg == key["alg"]
    assert len(bundle.roots) == len(bundle.x509_keys)


def test_what_each_good_vector_holds() -> None:
    trustmesh = parse_bundle(vector("good", "trustmesh.json"), DOMAIN)
    assert (trustmesh.sequence, trustmesh.refresh_hint) == (12, 60)
    assert [k["alg"] for k in trustmesh.jwt_keys] == ["ES256"] and len(trustmesh.roots) == 1
    spire = parse_bundle(vector("good", "spire.json"), DOMAIN)
    # no alg in SPIRE's JWT keys: pinned from the key (curve), RS256 for RSA
    assert {k["kid"]: k["alg"] for k in spire.jwt_keys} == {
        "spire-p384": "ES384",
        "spire-rsa": "RS256",
    }
    ignored = parse_bundle(vector("good", "unknown-elements-ignored.json"), DOMAIN)
    assert [k["kid"] for k in ignored.jwt_keys] == ["only-one"]
    assert "future_member" not in ignored.document()
    empty = parse_bundle(vector("good", "no-keys-no-sequence.json"), DOMAIN)
    assert empty.document() == {"keys": []} and empty.sequence is None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_vectors_are_refused_naming_the_problem(name: str) -> None:
    with pytest.raises(BundleError, match=re.escape(EXPECTED[name])):
        parse_bundle(vector("bad", name), DOMAIN)


def test_bounds() -> None:
    with pytest.raises(BundleError, match="larger than"):
        parse_bundle(b" " * (MAX_BUNDLE_BYTES + 1), DOMAIN)
    with pytest.raises(BundleError, match="not UTF-8 JSON"):
        parse_bundle(b'{"keys": [\xff]}', DOMAIN)
    ignored = {"kty": "OKP", "use": "jwt-svid"}
    with pytest.raises(BundleError, match=f"more than {MAX_BUNDLE_KEYS} keys"):
        parse_bundle({"keys": [ignored] * (MAX_BUNDLE_KEYS + 1)}, DOMAIN)
    one = json.loads(vector("good", "trustmesh.json"))["keys"][0]
    many = [{**one, "kid": f"k{i}"} for i in range(33)]
    with pytest.raises(BundleError, match="more than 32 jwt-svid keys"):
        parse_bundle({"keys": many}, DOMAIN)


def test_read_federated_takes_what_parses_and_never_our_own_domain() -> None:
    good = json.loads(vector("good", "trustmesh.json"))
    found, problems = read_federated(
        {
            DOMAIN: {"bundle": good, "use_until": 2e9},
            "corp.example": {"bundle": good, "use_until": 2e9},
            "broken.example": {"bundle": {"keys": "no"}, "use_until": 2e9},
            "timeless.example": {"bundle": good},
        },
        "corp.example",
    )
    assert list(found) == [DOMAIN] and found[DOMAIN].use_until == 2e9
    assert found[DOMAIN].bundle.trust_domain == DOMAIN
    assert len(problems) == 3 and any("our own trust domain" in p for p in problems)
    assert read_federated("nonsense", "corp.example") == (
        {},
        ["the federated bundles are not a JSON object"],
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "keys",
                    "kty",
                    "use",
                    "kid",
                    "x5c",
                    "crv",
                    "alg",
                    "x",
                    "y",
                    "n",
                    "e",
                    "spiffe_sequence",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(JSON)
def test_hostile_documents_give_a_bundle_or_a_bundle_error(document: object) -> None:
    try:
        bundle = parse_bundle(json.dumps(document).encode(), DOMAIN)
    except BundleError as exc:
        assert exc.status == 400 and exc.description
    else:
        assert bundle.trust_domain == DOMAIN
        assert parse_bundle(bundle.document(), DOMAIN).canonical() == bundle.canonical()
