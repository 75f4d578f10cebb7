"""RFC 8693 token exchange against a real control plane process (SQLite and
PostgreSQL) and a real simulated cluster issuer, both on loopback."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jwt
import pytest

from attacks import alg_none, hs256_with_public_key, signed_by_stranger, swapped_payload, with_kid
from helpers import (
    EXCHANGE_GRANT,
    JWT_TYPE,
    TRUST_DOMAIN,
    Federation,
    Server,
    register_federation,
    serve_cluster,
    unique,
    workload_yaml,
)
from trustmesh.sim import SimulatedCluster


@pytest.fixture
def federation(shared_server: Server, sim_cluster: SimulatedCluster) -> Federation:
    return register_federation(shared_server, sim_cluster)


def verify_with_discovery(server: Server, token: str, audience: str) -> dict[str, Any]:
    discovery = httpx.get(server.url + "/.well-known/openid-configuration").json()
    jwks = httpx.get(discovery["jwks_uri"]).json()
    kid = jwt.get_unverified_header(token)["kid"]
    key = next(jwt.PyJWK(k) for k in jwks["keys"] if k["kid"] == kid)
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=discovery["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=discovery["issuer"],
    )
    return claims


def test_exchange_issues_a_jwt_svid(federation: Federation) -> None:
    server = federation.server
    response = server.exchange(federation.sa_token(), federation.audience)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == JWT_TYPE
    assert body["token_type"] == "N_A"
    assert body["expires_in"] == 300
    assert response.headers["cache-control"] == "no-store"
    header = jwt.get_unverified_header(body["access_token"])
    assert header["alg"] == "ES256" and header["typ"] == "JWT"
    claims = verify_with_discovery(server, body["access_token"], federation.audience)
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/cluster/{federation.origin_name}/ns/shop/sa/payments"
    assert claims["sub"] == spiffe_id
    assert claims["aud"] == [federation.audience]
    assert claims["exp"] - claims["iat"] == 300
    assert claims["nbf"] == claims["iat"]
    assert claims["workload_id"] == federation.workload
    assert (claims["project"], claims["environment"], claims["tier"]) == ("shop", "prod", "gold")
    assert (claims["cluster"], claims["namespace"], claims["service_account"]) == (
        federation.origin_name,
        "shop",
        "payments",
    )
    assert len(claims["jti"]) >= 16


def test_lifetime_is_clamped_to_the_workload_maximum(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    name = unique("short-")
    shared_server.apply(
        workload_yaml(name, fed.origin_name, "batch", "cron", "  maxTokenTTL: 2m\n")
    )
    token = sim_cluster.mint("batch", "cron")
    assert shared_server.exchange(token, fed.audience, lifetime="3000").json()["expires_in"] == 120
    assert shared_server.exchange(token, fed.audience, lifetime="60").json()["expires_in"] == 60
    assert (
        fed.server.exchange(fed.sa_token(), fed.audience, lifetime="3600").json()["expires_in"]
        == 3600
    )


def test_multiple_audiences_and_spiffe_id_override(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    name = unique("named-")
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/payments/{name}"
    shared_server.apply(
        workload_yaml(name, fed.origin_name, "pay", "api", f"  spiffeId: {spiffe_id}\n")
    )
    audiences = [fed.audience, "https://api.partner.example"]
    response = shared_server.exchange(sim_cluster.mint("pay", "api"), audiences)
    claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == spiffe_id and claims["aud"] == audiences


def error_of(response: httpx.Response) -> tuple[int, str, str]:
    body = response.json()
    assert set(body) == {"error", "error_description"}, body
    assert "Traceback" not in response.text
    return response.status_code, body["error"], body["error_description"]


def test_bad_subject_tokens_are_refused(
    federation: Federation, sim_cluster: SimulatedCluster
) -> None:
    server, good = federation.server, federation.sa_token()
    stranger = SimulatedCluster("stranger")
    stranger.set_issuer(sim_cluster.issuer)  # same issuer URL, keys nobody published
    now = time.time()
    cases = {
        "unknown key": (
            stranger.mint("shop", "payments"),
            "invalid_grant",
            "not a known signing key",
        ),
        "other algorithm, known kid": (
            signed_by_stranger(good),
            "invalid_grant",
            "does not match its key",
        ),
        "stranger's key, known kid": (
            with_kid(stranger.mint("shop", "payments"), sim_cluster.signing_kid),
            "invalid_grant",
            "bad signature",
        ),
        "alg none": (alg_none(good), "invalid_request", "not a compact JWS"),
        "alg none, signature kept": (
            alg_none(good, keep_signature=True),
            "invalid_grant",
            "not allowed",
        ),
        "HS256 with public key": (
            hs256_with_public_key(good, sim_cluster.jwks()["keys"][0]),
            "invalid_grant",
            "not allowed",
        ),
        "swapped payload": (
            swapped_payload(good, sub="system:serviceaccount:kube-system:admin"),
            "invalid_grant",
            "bad signature",
        ),
        "expired": (federation.sa_token(now=now - 7200, ttl=600), "invalid_grant", "expired"),
        "not yet valid": (federation.sa_token(now=now + 600), "invalid_grant", "not yet valid"),
        "wrong audience": (federation.sa_token(audience="kubernetes"), "invalid_grant", "audience"),
        "no workload": (
            sim_cluster.mint("shop", "nobody"),
            "unauthorized_client",
            "no Workload selects",
        ),
        "unknown issuer": (
            SimulatedCluster("x").serve().mint("shop", "payments"),
            "invalid_grant",
            "not a registered cluster",
        ),
        "kid path trick": (
            with_kid(good, "../../../../etc/passwd"),
            "invalid_grant",
            "not a known signing key",
        ),
        "garbage": ("garbage", "invalid_request", "subject_token"),
        "garbage dots": ("a.b.c", "invalid_request", "subject_token"),
    }
    for name, (token, error, fragment) in cases.items():
        status, got, description = error_of(server.exchange(token, federation.audience))
        assert (status, got) == (400, error), (name, description)
        assert fragment in description, (name, description)
        assert token not in description or len(token) < 10
    assert httpx.get(server.url + "/healthz").status_code == 200


def form(**overrides: str | list[str] | None) -> dict[str, Any]:
    base: dict[str, Any] = {
        "grant_type": EXCHANGE_GRANT,
        "subject_token": "x.y.z",
        "subject_token_type": JWT_TYPE,
        "audience": f"spiffe://{TRUST_DOMAIN}/cluster/none",
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def test_malformed_requests_are_refused(federation: Federation) -> None:
    url = federation.server.url + "/oauth2/token"
    token = federation.sa_token()
    aud = federation.audience
    cases: list[tuple[str, dict[str, Any], int, str, str]] = [
        ("no grant_type", form(grant_type=None), 400, "invalid_request", "grant_type"),
        (
            "other grant",
            form(grant_type="client_credentials"),
            400,
            "unsupported_grant_type",
            "grant_type",
        ),
        ("no subject_token", form(subject_token=None), 400, "invalid_request", "subject_token"),
        (
            "no token type",
            form(subject_token=token, subject_token_type=None, audience=aud),
            400,
            "invalid_request",
            "subject_token_type",
        ),
        (
            "unknown token type",
            form(
                subject_token=token,
                subject_token_type="urn:ietf:params:oauth:token-type:saml2",
                audience=aud,
            ),
            400,
            "invalid_request",
            "subject_token_type",
        ),
        (
            "requested saml",
            form(
                subject_token=token,
                audience=aud,
                requested_token_type="urn:ietf:params:oauth:token-type:saml2",
            ),
            400,
            "invalid_request",
            "requested_token_type",
        ),
        (
            "no audience",
            form(subject_token=token, audience=None),
            400,
            "invalid_request",
            "audience",
        ),
        (
            "unknown cluster audience",
            form(subject_token=token),
            400,
            "invalid_target",
            "no registered cluster",
        ),
        (
            "foreign spiffe audience",
            form(subject_token=token, audience="spiffe://other.example/x"),
            400,
            "invalid_target",
            "trust domain",
        ),
        (
            "too many audiences",
            form(subject_token=token, audience=[f"https://a{i}.example" for i in range(20)]),
            400,
            "invalid_target",
            "at most",
        ),
        (
            "repeated grant_type",
            form(grant_type=[EXCHANGE_GRANT, EXCHANGE_GRANT]),
            400,
            "invalid_request",
            "repeated",
        ),
        (
            "bad lifetime",
            form(subject_token=token, audience=aud, lifetime="-5"),
            400,
            "invalid_request",
            "lifetime",
        ),
        (
            "actor token",
            form(subject_token=token, audience=aud, actor_token="x"),
            400,
            "invalid_request",
            "actor_token",
        ),
        (
            "unknown parameter",
            form(subject_token=token, audience=aud, colour="blue"),
            400,
            "invalid_request",
            "unknown parameter",
        ),
    ]
    for name, data, status, error, fragment in cases:
        got = error_of(httpx.post(url, data=data))
        assert got[:2] == (status, error), (name, got)
        assert fragment in got[2], (name, got)

    raw_cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("json body", {"json": form()}, 400, "Content-Type"),
        ("no content type", {"content": b"grant_type=x"}, 400, "Content-Type"),
        (
            "bad encoding",
            {
                "content": b"\xff\xfe=\x00",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            400,
            "form-encoded",
        ),
        (
            "not a form",
            {
                "content": b"just text",
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            400,
            "form-encoded",
        ),
    ]
    for name, kwargs, status, fragment in raw_cases:
        got = error_of(httpx.post(url, **kwargs))
        assert got[0] == status and got[1] == "invalid_request" and fragment in got[2], (name, got)


def test_one_megabyte_token_is_refused_before_parsing(federation: Federation) -> None:
    big = "eyJ" + "A" * (1024 * 1024)
    started = time.perf_counter()
    response = federation.server.exchange(big, federation.audience)
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"
    assert "larger than" in response.json()["error_description"]
    assert time.perf_counter() - started < 5
    # A token just under the body limit but over the SA-token limit is refused by size too.
    status, error, description = error_of(
        federation.server.exchange("eyJ" + "A" * 40000, federation.audience)
    )
    assert (status, error) == (400, "invalid_request") and "larger than" in description
    assert federation.server.exchange(federation.sa_token(), federation.audience).status_code == 200


def test_cluster_key_rotation_is_picked_up(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    assert shared_server.exchange(fed.sa_token(), fed.audience).status_code == 200
    sim_cluster.rotate_key()  # a token with a new kid makes the server refetch the JWKS
    time.sleep(1.1)  # refetches are rate-limited to one a second per cluster
    response = shared_server.exchange(fed.sa_token(), fed.audience)
    assert response.status_code == 200, response.text


def test_unreachable_cluster_answers_temporarily_unavailable(shared_server: Server) -> None:
    cluster = serve_cluster("gone")
    fed = register_federation(shared_server, cluster)
    token = fed.sa_token()
    cluster.stop()
    status, error, description = error_of(shared_server.exchange(token, fed.audience))
    assert (status, error) == (503, "temporarily_unavailable")
    assert fed.origin_name in description
