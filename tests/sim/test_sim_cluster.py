"""The simulated cluster is a real OIDC service-account issuer: everything here goes over
real HTTP on loopback, and tokens are verified from the discovery document alone."""

from __future__ import annotations

import base64
import hashlib
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from trustmesh.sim import SimulatedCluster


@pytest.fixture
def cluster() -> Iterator[SimulatedCluster]:
    with SimulatedCluster("east") as served:
        yield served


def verify_from_discovery(issuer: str, token: str, audience: str = "trustmesh") -> dict[str, Any]:
    """What a relying party (the control plane, AWS STS, GCP STS…) does: discovery, then
    the JWKS it names, then a signature and claims check."""
    discovery = httpx.get(issuer + "/.well-known/openid-configuration").json()
    assert discovery["issuer"] == issuer
    jwks_client = jwt.PyJWKClient(discovery["jwks_uri"], cache_keys=False, cache_jwk_set=False)
    signing_key = jwks_client.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        signing_key.key,
        algorithms=discovery["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=discovery["issuer"],
        options={"require": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"]},
    )
    return claims


def kube_kid(jwk: dict[str, Any]) -> str:
    """kube-apiserver's keyIDFromPublicKey, computed independently from the published JWK."""
    der = jwt.PyJWK(jwk).key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def test_issuer_is_unknown_until_the_cluster_serves() -> None:
    cluster = SimulatedCluster("idle")
    with pytest.raises(RuntimeError, match="until it serves"):
        _ = cluster.issuer
    with pytest.raises(RuntimeError):
        cluster.mint("default", "app")


def test_discovery_document_has_the_fields_kube_apiserver_serves(cluster: SimulatedCluster) -> None:
    response = httpx.get(cluster.issuer + "/.well-known/openid-configuration")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "public, max-age=3600"
    assert response.headers["content-type"] == "application/json"
    assert cluster.issuer.startswith("http://127.0.0.1:")
    assert response.json() == {
        "issuer": cluster.issuer,
        "jwks_uri": cluster.issuer + "/openid/v1/jwks",
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }


def test_jwks_publishes_only_public_rsa_keys_with_kube_kids(cluster: SimulatedCluster) -> None:
    response = httpx.get(cluster.issuer + "/openid/v1/jwks")
    assert response.status_code == 200
    assert response.headers["cache-control"] == "public, max-age=3600"
    assert response.headers["content-type"] == "application/jwk-set+json"
    (jwk,) = response.json()["keys"]
    assert set(jwk) == {"kty", "n", "e", "kid", "use", "alg"}
    assert (jwk["kty"], jwk["use"], jwk["alg"]) == ("RSA", "sig", "RS256")
    assert jwk["kid"] == cluster.signing_kid == kube_kid(jwk)
    assert cluster.kids == [jwk["kid"]]
    modulus = base64.urlsafe_b64decode(jwk["n"] + "==")
    assert len(modulus) * 8 == 2048


def test_minted_token_has_the_projected_service_account_token_layout(
    cluster: SimulatedCluster,
) -> None:
    before = int(time.time())
    token = cluster.mint("payments", "api", audience=["trustmesh", "vault"], ttl=600)
    after = int(time.time())

    header = jwt.get_unverified_header(token)
    assert header == {"alg": "RS256", "kid": cluster.signing_kid}  # no "typ", as in Kubernetes

    claims = verify_from_discovery(cluster.issuer, token, audience="vault")
    assert set(claims) == {"iss", "sub", "aud", "exp", "iat", "nbf", "jti", "kubernetes.io"}
    assert claims["iss"] == cluster.issuer
    assert claims["sub"] == "system:serviceaccount:payments:api"
    assert claims["aud"] == ["trustmesh", "vault"]
    assert before <= claims["iat"] <= after
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] == claims["iat"] + 600
    assert uuid.UUID(claims["jti"]).version == 4

    kube = claims["kubernetes.io"]
    assert set(kube) == {"namespace", "serviceaccount", "pod", "node"}
    assert kube["namespace"] == "payments"
    assert kube["serviceaccount"]["name"] == "api"
    assert kube["serviceaccount"]["uid"] == cluster.service_account_uid("payments", "api")
    assert kube["pod"]["name"].startswith("api-")
    assert len(kube["pod"]["name"]) == len("api-") + 5
    assert kube["node"]["name"] == "east-node-1"
    for obj in ("serviceaccount", "pod", "node"):
        uuid.UUID(kube[obj]["uid"])


def test_single_audience_string_becomes_a_list_and_pod_and_node_can_be_named(
    cluster: SimulatedCluster,
) -> None:
    token = cluster.mint("default", "web", audience="trustmesh", pod_name="web-0", node_name="n7")
    claims = verify_from_discovery(cluster.issuer, token)
    assert claims["aud"] == ["trustmesh"]
    assert claims["kubernetes.io"]["pod"]["name"] == "web-0"
    assert claims["kubernetes.io"]["node"]["name"] == "n7"


def test_uids_are_stable_per_object_and_distinct_across_clusters(
    cluster: SimulatedCluster,
) -> None:
    def kube(token: str) -> dict[str, Any]:
        return dict(jwt.decode(token, options={"verify_signature": False})["kubernetes.io"])

    first = kube(cluster.mint("ns", "sa", pod_name="sa-aaaaa"))
    second = kube(cluster.mint("ns", "sa", pod_name="sa-aaaaa"))
    other_pod = kube(cluster.mint("ns", "sa"))
    assert first["serviceaccount"]["uid"] == second["serviceaccount"]["uid"]
    assert first["pod"]["uid"] == second["pod"]["uid"]
    assert first["pod"]["uid"] != other_pod["pod"]["uid"]
    assert first["node"]["uid"] == other_pod["node"]["uid"]
    assert first["serviceaccount"]["uid"] != cluster.service_account_uid("ns", "other")
    assert (
        SimulatedCluster("east").service_account_uid("ns", "sa") == first["serviceaccount"]["uid"]
    )
    assert (
        SimulatedCluster("west").service_account_uid("ns", "sa") != first["serviceaccount"]["uid"]
    )


def test_now_sets_the_issue_time_and_expired_tokens_fail(cluster: SimulatedCluster) -> None:
    issued = time.time() - 7200
    token = cluster.mint("ns", "sa", ttl=3600, now=issued)
    claims = jwt.decode(token, options={"verify_signature": False})
    assert (claims["iat"], claims["exp"]) == (int(issued), int(issued) + 3600)
    with pytest.raises(jwt.ExpiredSignatureError):
        verify_from_discovery(cluster.issuer, token)


def test_wrong_audience_is_rejected_by_the_verifier(cluster: SimulatedCluster) -> None:
    token = cluster.mint("ns", "sa", audience="someone-else")
    with pytest.raises(jwt.InvalidAudienceError):
        verify_from_discovery(cluster.issuer, token)


def test_rotation_keeps_old_tokens_verifiable_until_the_old_key_is_dropped(
    cluster: SimulatedCluster,
) -> None:
    old_kid = cluster.signing_kid
    old_token = cluster.mint("ns", "sa")

    new_kid = cluster.rotate_key()
    assert new_kid != old_kid
    assert cluster.signing_kid == new_kid
    assert cluster.kids == [old_kid, new_kid]
    published = [k["kid"] for k in httpx.get(cluster.issuer + "/openid/v1/jwks").json()["keys"]]
    assert published == [old_kid, new_kid]

    new_token = cluster.mint("ns", "sa")
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    verify_from_discovery(cluster.issuer, old_token)
    verify_from_discovery(cluster.issuer, new_token)

    cluster.drop_key(old_kid)
    assert cluster.kids == [new_kid]
    with pytest.raises(jwt.PyJWKClientError, match="Unable to find a signing key"):
        verify_from_discovery(cluster.issuer, old_token)
    verify_from_discovery(cluster.issuer, new_token)


def test_the_signing_key_and_unknown_keys_cannot_be_dropped(cluster: SimulatedCluster) -> None:
    with pytest.raises(ValueError, match="rotate before dropping"):
        cluster.drop_key(cluster.signing_kid)
    with pytest.raises(ValueError, match="has no key"):
        cluster.drop_key("nope")


def test_keys_persist_in_the_data_dir_with_mode_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "east"
    first = SimulatedCluster("east", data_dir=data_dir)
    keys_file = data_dir / "keys.pem"
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert keys_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")

    restarted = SimulatedCluster("east", data_dir=data_dir)
    assert restarted.kids == first.kids

    new_kid = restarted.rotate_key()
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    again = SimulatedCluster("east", data_dir=data_dir)
    assert again.kids == [first.signing_kid, new_kid]
    assert again.signing_kid == new_kid

    again.drop_key(first.signing_kid)
    assert SimulatedCluster("east", data_dir=data_dir).kids == [new_kid]


def test_restarted_cluster_signs_tokens_the_old_jwks_still_verifies(tmp_path: Path) -> None:
    with SimulatedCluster("east", data_dir=tmp_path) as first:
        jwks = httpx.get(first.issuer + "/openid/v1/jwks").json()
    with SimulatedCluster("east", data_dir=tmp_path) as restarted:
        token = restarted.mint("ns", "sa")
        key = jwt.PyJWKSet.from_dict(jwks)[restarted.signing_kid]
        jwt.decode(token, key, algorithms=["RS256"], audience="trustmesh")
    assert (tmp_path / "issuer").read_text().strip() == restarted.issuer


def test_data_dir_with_keys_for_another_algorithm_is_refused(tmp_path: Path) -> None:
    SimulatedCluster("east", data_dir=tmp_path, alg="ES256")
    with pytest.raises(ValueError, match="cannot sign RS256"):
        SimulatedCluster("east", data_dir=tmp_path, alg="RS256")


def test_corrupt_key_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "keys.pem").write_text("not a key\n")
    (tmp_path / "keys.pem").chmod(0o600)
    with pytest.raises(ValueError, match="not an unencrypted PEM key"):
        SimulatedCluster("east", data_dir=tmp_path)


def test_es256_cluster_publishes_a_p256_key_and_signs_es256() -> None:
    with SimulatedCluster("edge", alg="ES256") as cluster:
        discovery = httpx.get(cluster.issuer + "/.well-known/openid-configuration").json()
        assert discovery["id_token_signing_alg_values_supported"] == ["ES256"]
        (jwk,) = httpx.get(discovery["jwks_uri"]).json()["keys"]
        assert set(jwk) == {"kty", "crv", "x", "y", "kid", "use", "alg"}
        assert (jwk["kty"], jwk["crv"], jwk["alg"], jwk["use"]) == ("EC", "P-256", "ES256", "sig")
        assert jwk["kid"] == kube_kid(jwk) == cluster.signing_kid

        token = cluster.mint("ns", "sa")
        assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": cluster.signing_kid}
        claims = verify_from_discovery(cluster.issuer, token)
        assert claims["sub"] == "system:serviceaccount:ns:sa"

        cluster.rotate_key()
        assert len(httpx.get(discovery["jwks_uri"]).json()["keys"]) == 2
        verify_from_discovery(cluster.issuer, token)


def test_stop_closes_the_listener() -> None:
    cluster = SimulatedCluster("brief").serve()
    issuer = cluster.issuer
    assert httpx.get(issuer + "/.well-known/openid-configuration").status_code == 200
    cluster.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(issuer + "/.well-known/openid-configuration")
    assert cluster.issuer == issuer  # tokens minted later still name it


def test_unknown_paths_and_methods_are_client_errors(cluster: SimulatedCluster) -> None:
    assert httpx.get(cluster.issuer + "/openid/v1/nope").status_code == 404
    assert httpx.post(cluster.issuer + "/openid/v1/jwks").status_code == 405


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"audience": []}, "audience"),
        ({"audience": [""]}, "audience"),
        ({"ttl": 0}, "ttl"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"namespace": "a:b"}, "namespace"),
        ({"namespace": "ns\n"}, "namespace"),
        ({"service_account": "sa\n"}, "service account"),
        ({"service_account": ""}, "service account"),
        ({"service_account": "x" * 254}, "service account"),
        ({"pod_name": "UPPER"}, "pod"),
    ],
)
def test_bad_mint_arguments_are_value_errors(
    cluster: SimulatedCluster, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"namespace": "ns", "service_account": "sa", **kwargs}
    with pytest.raises(ValueError, match=message):
        cluster.mint(**args)


def test_unsupported_algorithm_is_refused() -> None:
    with pytest.raises(ValueError, match="not supported"):
        SimulatedCluster("x", alg="HS256")


def test_an_issuer_with_a_path_serves_discovery_under_it() -> None:
    """As EKS's issuers (``https://oidc.eks.<region>.amazonaws.com/id/<id>``): the
    discovery document is at ``{issuer}/.well-known/openid-configuration``."""
    cluster = SimulatedCluster("pathed").serve(path="/id/0123abcd")
    try:
        assert cluster.issuer.endswith("/id/0123abcd")
        claims = verify_from_discovery(cluster.issuer, cluster.mint("shop", "api"))
        assert claims["iss"] == cluster.issuer
        root = cluster.issuer.removesuffix("/id/0123abcd")
        assert httpx.get(root + "/.well-known/openid-configuration").status_code == 404
    finally:
        cluster.stop()
    for bad in ("id", "/a b", "/../x", "/a?b"):
        with pytest.raises(ValueError, match="issuer path"):
            SimulatedCluster("bad").serve(path=bad)
