"""The control plane's public documents (DESIGN §2, §9): OpenID Connect discovery, the
JWKS and the SPIFFE bundle, built from the key set and the CA roots in force."""

from __future__ import annotations

from typing import Any

from trustmesh.common.token_exchange import TOKEN_EXCHANGE_GRANT
from trustmesh.identity.keys import KeySet
from trustmesh.identity.x509ca import CaSet

SPIFFE_REFRESH_HINT = 60


def discovery(issuer: str, trust_domain: str, keyset: KeySet) -> dict[str, Any]:
    """OpenID Connect Discovery 1.0 §3, plus the SPIFFE, revocation and SSF endpoints."""
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "token_endpoint": f"{issuer}/oauth2/token",
        "introspection_endpoint": f"{issuer}/oauth2/introspect",
        "spiffe_bundle_endpoint": f"{issuer}/.well-known/spiffe-bundle",
        "revocation_list_endpoint": f"{issuer}/v1/revocations",
        "revocation_stream_endpoint": f"{issuer}/v1/revocations/stream",
        "ssf_configuration_endpoint": f"{issuer}/.well-known/ssf-configuration",
        "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": ["bearer"],
        "id_token_signing_alg_values_supported": sorted({k.alg for k in keyset.published}),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "trust_domain": f"spiffe://{trust_domain}",
    }


def spiffe_bundle(keyset: KeySet, ca: CaSet) -> dict[str, Any]:
    """SPIFFE Trust Domain and Bundle §4: a JWKS whose keys carry ``use: jwt-svid`` (each
    with its ``kid``) and ``use: x509-svid`` (one per published CA root, with ``x5c``,
    §4.2; DESIGN §9). ``spiffe_sequence`` (§4.1.1) is the sum of the two monotonic
    revision counters, so it grows whenever either set of keys changes."""
    bundle = keyset.jwks(use="jwt-svid")
    bundle["keys"].extend(ca.jwks())
    bundle["spiffe_sequence"] = keyset.revision + ca.revision
    bundle["spiffe_refresh_hint"] = SPIFFE_REFRESH_HINT
    return bundle
