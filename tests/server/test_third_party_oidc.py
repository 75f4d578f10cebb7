"""A token from the exchange verifies with an independent OIDC/JOSE implementation
(joserfc, from the Authlib authors) that reads nothing but our discovery document."""

from __future__ import annotations

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import BadSignatureError
from joserfc.jwk import KeySet

from helpers import Server, register_federation
from trustmesh.sim import SimulatedCluster


def test_joserfc_verifies_a_token_from_discovery_alone(
    shared_server: Server, sim_cluster: SimulatedCluster
) -> None:
    fed = register_federation(shared_server, sim_cluster)
    token = fed.svid()

    # Everything below starts from the discovery URL only (OpenID Connect Discovery 1.0).
    discovery = httpx.get(shared_server.url + "/.well-known/openid-configuration").json()
    key_set = KeySet.import_key_set(httpx.get(discovery["jwks_uri"]).json())
    algorithms = discovery["id_token_signing_alg_values_supported"]
    verified = jwt.decode(token, key_set, algorithms=algorithms)
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": discovery["issuer"]},
        aud={"essential": True, "value": fed.audience},
        sub={"essential": True},
        exp={"essential": True},
        nbf={"essential": True},
    ).validate(verified.claims)
    trust_domain = discovery["trust_domain"].removeprefix("spiffe://")
    assert verified.claims["sub"].startswith(f"spiffe://{trust_domain}/cluster/{fed.origin_name}/")
    assert verified.header["kid"] in {
        k["kid"] for k in httpx.get(discovery["jwks_uri"]).json()["keys"]
    }
    assert discovery["token_endpoint"] == discovery["issuer"] + "/oauth2/token"
    assert "urn:ietf:params:oauth:grant-type:token-exchange" in discovery["grant_types_supported"]

    # The same library refuses a payload changed under the signature.
    head, payload, signature = token.split(".")
    with pytest.raises(BadSignatureError):
        jwt.decode(f"{head}.{payload[:-4]}AAAA.{signature}", key_set, algorithms=algorithms)
