"""OpenID Shared Signals (SSF 1.0) poll delivery (RFC 8936) of revocation SETs (RFC 8417),
against a real control plane on SQLite and PostgreSQL. SETs are verified with joserfc,
an independent JOSE library, using only the keys behind the advertised ``jwks_uri``."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import httpx
import jwt as pyjwt
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from helpers import Server, cluster_yaml, register_federation, start_server, unique
from trustmesh.sim import SimulatedCluster

SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
CREDENTIAL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/credential-change"


def poll(server: Server, token: str, body: Any, timeout: float = 40) -> httpx.Response:
    return httpx.post(
        server.url + "/v1/ssf/poll",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=timeout,
    )


def poll_ok(server: Server, token: str, body: dict[str, Any]) -> dict[str, Any]:
    response = poll(server, token, body)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    result: dict[str, Any] = response.json()
    assert set(result) == {"sets", "moreAvailable"}
    return result


def drain(server: Server, token: str) -> None:
    """Acknowledge everything pending for this receiver."""
    while True:
        result = poll_ok(server, token, {"returnImmediately": True, "maxEvents": 1000})
        if not result["sets"]:
            return
        poll_ok(server, token, {"ack": list(result["sets"]), "maxEvents": 0})


def revoke(server: Server, kind: str, value: str, reason: str = "test") -> dict[str, Any]:
    response = server.admin.post(
        "/v1/revocations", json={"kind": kind, "value": value, "reason": reason}
    )
    assert response.status_code == 201, response.text
    entry: dict[str, Any] = response.json()["revocation"]
    return entry


def new_receiver(server: Server) -> str:
    """A fresh receiver: a credential of a newly registered cluster."""
    name = unique("ssf-")
    server.apply(cluster_yaml(name, f"http://127.0.0.1:9/{name}"))
    return server.credential(name)


def receiver_keys(server: Server) -> KeySet:
    """What an outside receiver knows: the configuration document and its jwks_uri."""
    config = httpx.get(server.url + "/.well-known/ssf-configuration", timeout=10).json()
    return KeySet.import_key_set(httpx.get(config["jwks_uri"], timeout=10).json())


def verify(token: str, keys: KeySet) -> tuple[dict[str, Any], dict[str, Any]]:
    decoded = jwt.decode(token, keys, algorithms=["ES256"])
    return dict(decoded.header), dict(decoded.claims)


def test_configuration_documents(shared_server: Server) -> None:
    base = shared_server.url
    discovery = httpx.get(base + "/.well-known/openid-configuration").json()
    assert discovery["ssf_configuration_endpoint"] == base + "/.well-known/ssf-configuration"
    response = httpx.get(discovery["ssf_configuration_endpoint"])
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    config = response.json()
    assert config["spec_version"] == "1_0"
    assert config["issuer"] == discovery["issuer"]
    assert config["jwks_uri"] == discovery["jwks_uri"]
    assert config["delivery_methods_supported"] == ["urn:ietf:rfc:8936"]
    assert config["authorization_schemes"] == [{"spec_urn": "urn:ietf:rfc:6750"}]
    assert config["default_subjects"] == "ALL"
    assert config["poll_endpoint"] == base + "/v1/ssf/poll"
    assert config["configuration_endpoint"] == base + "/v1/ssf/stream"

    streams = shared_server.admin.get("/v1/ssf/stream")
    assert streams.status_code == 200, streams.text
    (stream,) = streams.json()
    assert stream["iss"] == config["issuer"]
    assert stream["delivery"] == {
        "method": "urn:ietf:rfc:8936",
        "endpoint_url": config["poll_endpoint"],
    }
    assert set(stream["events_delivered"]) == {SESSION_REVOKED, CREDENTIAL_CHANGE}
    one = shared_server.admin.get("/v1/ssf/stream", params={"stream_id": stream["stream_id"]})
    assert one.json() == stream
    assert shared_server.admin.get("/v1/ssf/stream", params={"stream_id": "x"}).status_code == 404
    status = shared_server.admin.get("/v1/ssf/status").json()
    assert status == {"stream_id": stream["stream_id"], "status": "enabled"}
    assert httpx.get(base + "/v1/ssf/stream").status_code == 401


def test_revocations_become_signed_sets(
    tmp_path: Path, db_url: str | None, sim_cluster: SimulatedCluster
) -> None:
    server = start_server(tmp_path / "cp", db_url)
    try:
        fed = register_federation(server, sim_cluster)
        svid = fed.svid()
        token_jti = pyjwt.decode(svid, options={"verify_signature": False})["jti"]
        kid = pyjwt.get_unverified_header(svid)["kid"]
        spiffe_id = pyjwt.decode(svid, options={"verify_signature": False})["sub"]
        workload = revoke(server, "workload", fed.workload, reason="compromised pod")
        one_token = revoke(server, "jti", token_jti, reason="leaked")
        key = revoke(server, "key", kid, reason="key compromised")  # the active key goes

        keys = receiver_keys(server)
        assert kid not in {k.kid for k in keys}
        config = httpx.get(server.url + "/.well-known/ssf-configuration").json()
        (stream,) = server.admin.get("/v1/ssf/stream").json()

        result = poll_ok(server, server.admin_token, {"returnImmediately": True})
        assert result["moreAvailable"] is False
        assert len(result["sets"]) == 3
        by_kind: dict[str, dict[str, Any]] = {}
        for set_jti, token in result["sets"].items():
            header, claims = verify(token, keys)
            assert header["typ"] == "secevent+jwt" and header["alg"] == "ES256"
            assert header["kid"] != kid  # signed with the key that took over
            assert claims["jti"] == set_jti
            assert claims["iss"] == config["issuer"]
            assert claims["aud"] == stream["aud"]
            assert abs(claims["iat"] - time.time()) < 60
            assert "sub" not in claims and "exp" not in claims  # the SSF 1.0 SET profile
            (event_type, event), *rest = claims["events"].items()
            assert not rest
            by_kind[event["trustmesh"]["kind"]] = {"type": event_type, **claims}
            assert claims["txn"] == f"revocation-{event['trustmesh']['revision']}"

        subject = by_kind["subject"]
        assert subject["type"] == SESSION_REVOKED
        assert subject["sub_id"] == {"format": "uri", "uri": spiffe_id}
        event = subject["events"][SESSION_REVOKED]
        assert event["reason_admin"] == {"en": "compromised pod"}
        assert event["event_timestamp"] == int(workload["revoked_at"])
        assert event["trustmesh"]["revision"] == workload["revision"]

        jti_set = by_kind["jti"]
        assert jti_set["type"] == SESSION_REVOKED
        assert jti_set["sub_id"] == {"format": "jwt_id", "iss": config["issuer"], "jti": token_jti}
        assert jti_set["events"][SESSION_REVOKED]["trustmesh"]["revision"] == one_token["revision"]

        key_set = by_kind["key"]
        assert key_set["type"] == CREDENTIAL_CHANGE
        assert key_set["sub_id"] == {"format": "opaque", "id": kid}
        change = key_set["events"][CREDENTIAL_CHANGE]
        assert change["change_type"] == "revoke"
        assert change["credential_type"] == "jwt-svid-signing-key"
        assert change["reason_admin"] == {"en": "key compromised"}
        assert change["trustmesh"]["revision"] == key["revision"]

        # Unacknowledged SETs come again, with the same jti.
        again = poll_ok(server, server.admin_token, {"returnImmediately": True})
        assert set(again["sets"]) == set(result["sets"])

        # A second receiver has its own stream: other aud and jti, the same events.
        cluster_token = server.credential(fed.target_name)
        other = poll_ok(server, cluster_token, {"returnImmediately": True, "maxEvents": 1})
        assert len(other["sets"]) == 1 and other["moreAvailable"] is True
        first_jti, first_token = next(iter(other["sets"].items()))
        assert first_jti not in result["sets"]
        _, other_claims = verify(first_token, keys)
        assert other_claims["aud"] != stream["aud"]

        # The admin acknowledges everything (plus jtis that mean nothing, which are
        # ignored, and the other receiver's, which it cannot acknowledge).
        acked = poll_ok(
            server,
            server.admin_token,
            {
                "ack": [*result["sets"], "nonsense", first_jti],
                "returnImmediately": True,
            },
        )
        assert acked == {"sets": {}, "moreAvailable": False}
        assert poll_ok(server, server.admin_token, {"returnImmediately": True})["sets"] == {}

        # The second receiver still gets all three; one acknowledged, one reported as
        # an error (not delivered again), one left.
        everything = poll_ok(server, cluster_token, {"returnImmediately": True})["sets"]
        assert len(everything) == 3 and first_jti in everything
        jtis = sorted(everything)
        errs = {jtis[1]: {"err": "invalid_key", "description": "cannot verify"}}
        rest_ = poll_ok(
            server,
            cluster_token,
            {"ack": [jtis[0]], "setErrs": errs, "returnImmediately": True},
        )
        assert set(rest_["sets"]) == {jtis[2]} and rest_["moreAvailable"] is False

        # maxEvents 0: acknowledge only, at once (even when long polling).
        started = time.monotonic()
        only_ack = poll_ok(server, cluster_token, {"ack": [jtis[2]], "maxEvents": 0})
        assert only_ack == {"sets": {}, "moreAvailable": False}
        assert time.monotonic() - started < 5
        assert poll_ok(server, cluster_token, {"returnImmediately": True})["sets"] == {}
    finally:
        server.stop()


def test_long_poll_wakes_on_a_new_revocation(shared_server: Server) -> None:
    token = new_receiver(shared_server)
    drain(shared_server, token)
    outcome: dict[str, Any] = {}

    def long_poll() -> None:
        outcome["response"] = poll(shared_server, token, {"returnImmediately": False})
        outcome["answered"] = time.monotonic()

    waiter = threading.Thread(target=long_poll)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive(), outcome  # nothing pending: the poll is held open
    value = f"ssf-wake-{time.time_ns()}"
    revoked = time.monotonic()
    revoke(shared_server, "jti", value)
    waiter.join(30)
    assert not waiter.is_alive()
    latency = outcome["answered"] - revoked
    assert latency < 1.0, latency
    response = outcome["response"]
    assert response.status_code == 200, response.text
    (set_token,) = response.json()["sets"].values()
    _, claims = verify(set_token, receiver_keys(shared_server))
    assert claims["sub_id"]["jti"] == value


@pytest.mark.parametrize(
    ("content", "headers", "fragment"),
    [
        (b"not json", {}, "not valid JSON"),
        (b"[1, 2]", {}, "JSON object"),
        (b"", {}, "not valid JSON"),
        (b'{"maxEvents": -1}', {}, "maxEvents"),
        (b'{"maxEvents": "5"}', {}, "maxEvents"),
        (b'{"maxEvents": true}', {}, "maxEvents"),
        (b'{"maxEvents": 1.5}', {}, "maxEvents"),
        (b'{"returnImmediately": "yes"}', {}, "returnImmediately"),
        (b'{"ack": "abc"}', {}, "ack must be"),
        (b'{"ack": [1]}', {}, "ack must be"),
        (b'{"setErrs": []}', {}, "setErrs"),
        (b'{"setErrs": {"a": {"description": "x"}}}', {}, "setErrs"),
        (b'{"setErrs": {"a": {"err": "x", "description": 3}}}', {}, "description"),
        (b"{}", {"Content-Type": "text/plain"}, "Content-Type"),
    ],
)
def test_bad_poll_requests(
    shared_server: Server, content: bytes, headers: dict[str, str], fragment: str
) -> None:
    response = httpx.post(
        shared_server.url + "/v1/ssf/poll",
        content=content,
        headers={
            "Authorization": f"Bearer {shared_server.admin_token}",
            "Content-Type": "application/json",
            **headers,
        },
        timeout=10,
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["err"] == "invalid_request" and fragment in body["description"]


def test_poll_needs_a_credential(shared_server: Server) -> None:
    url = shared_server.url + "/v1/ssf/poll"
    body = {"returnImmediately": True}
    assert httpx.post(url, json=body, timeout=10).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer tma_nope"}, timeout=10)
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(url, timeout=10).status_code == 405
