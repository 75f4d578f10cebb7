"""A simulated Kubernetes cluster that is a real OIDC service-account token issuer.

It does what kube-apiserver does for ServiceAccountIssuerDiscovery (KEP-1393) and
projected service-account tokens (KEP-1205, TokenRequest API), so the control plane
verifies its tokens exactly as it verifies those of EKS, GKE or any kube-apiserver:

- ``GET /.well-known/openid-configuration`` serves the same five fields as
  kube-apiserver (``pkg/serviceaccount/openidmetadata.go``): ``issuer``, ``jwks_uri``
  (``{issuer}/openid/v1/jwks``), ``response_types_supported: ["id_token"]``,
  ``subject_types_supported: ["public"]`` and ``id_token_signing_alg_values_supported``.
- ``GET /openid/v1/jwks`` serves every public key a valid token may carry, each with
  ``kid``, ``use: sig`` and ``alg``, as ``application/jwk-set+json``.
- Both answer with ``Cache-Control: public, max-age=3600`` as kube-apiserver does.
- Tokens carry the header ``{"alg", "kid"}`` (go-jose adds no ``typ``), where ``kid`` is
  the unpadded base64url SHA-256 of the DER SubjectPublicKeyInfo
  (``keyIDFromPublicKey`` in ``pkg/serviceaccount/jwt.go``), and the claims of
  ``pkg/serviceaccount/claims.go``: ``iss``, ``sub: system:serviceaccount:NS:SA``, ``aud``
  (a list), ``exp``, ``iat``, ``nbf`` (= ``iat``), ``jti`` and the private
  ``kubernetes.io`` claim with ``namespace``, ``serviceaccount``, ``pod`` and ``node``.

Nothing here is test-only: it is the issuer side of the protocol, nothing more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from trustmesh.common.files import private_directory, read_private_file, write_atomically
from trustmesh.common.serving import BackgroundServer
from trustmesh.sim.algorithms import SUPPORTED_ALGS

__all__ = ["DISCOVERY_PATH", "JWKS_PATH", "SUPPORTED_ALGS", "SimulatedCluster", "key_id"]

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/openid/v1/jwks"
# kube-apiserver: pkg/serviceaccount/openidmetadata.go, ``cacheControl``.
_CACHE_CONTROL = "public, max-age=3600"
# One PEM file holds every published key, oldest first; the last one signs.
_KEYS_FILE = "keys.pem"
_ISSUER_FILE = "issuer"
_NAME_FILE = "name"
_PEM_END = b"-----END PRIVATE KEY-----"
# uuid5 namespace for the stable object uids (service accounts, pods, nodes).
_UID_NAMESPACE = uuid.UUID("6f1c2d0e-6a57-5b8e-9a43-3c1f8a9d2b70")
# Kubernetes' generateName suffix alphabet (k8s.io/apimachinery/pkg/util/rand): no vowels
# or look-alike digits.
_POD_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"

# Kubernetes object names (k8s.io/apimachinery/pkg/util/validation): namespaces are
# DNS-1123 labels; service accounts, pods and nodes DNS-1123 subdomains.
_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def key_id(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """The ``kid`` kube-apiserver gives a signing key (``keyIDFromPublicKey``): the
    unpadded base64url encoding of SHA-256 over the DER-encoded SubjectPublicKeyInfo."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class _SigningKey:
    kid: str
    private_key: PrivateKey

    def public_jwk(self, alg: str) -> dict[str, Any]:
        public = self.private_key.public_key()
        jwk: dict[str, Any] = (
            RSAAlgorithm.to_jwk(public, as_dict=True)
            if isinstance(public, rsa.RSAPublicKey)
            else ECAlgorithm.to_jwk(public, as_dict=True)
        )
        jwk.pop("key_ops", None)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": alg}


def _generate(alg: str) -> _SigningKey:
    # kube-apiserver's own keys are RSA-2048 (RS256); ES256 is what it signs with when
    # --service-account-signing-key-file holds a P-256 key.
    private_key: PrivateKey = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "RS256"
        else ec.generate_private_key(ec.SECP256R1())
    )
    return _SigningKey(key_id(private_key.public_key()), private_key)


def _alg_of(private_key: object) -> str | None:
    """The JWS algorithm a private key signs with here, or None if it is unsuitable."""
    if isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size >= 2048:
        return "RS256"
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return "ES256"
    return None


def _read_keys(path: Path) -> list[_SigningKey]:
    """The keys in a PEM file of concatenated PKCS#8 keys, oldest first."""
    keys: list[_SigningKey] = []
    try:
        pem = read_private_file(path, "simulated cluster keys")  # not a symlink, 0600, ours
    except FileNotFoundError:
        raise ValueError(f"{path} does not exist") from None
    for block in pem.split(_PEM_END):
        if not block.strip():
            continue
        try:
            loaded = serialization.load_pem_private_key(block + _PEM_END, password=None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path} holds something that is not an unencrypted PEM key") from exc
        if _alg_of(loaded) is None:
            raise ValueError(f"{path} holds a key that is neither RSA-2048+ nor P-256")
        private_key = cast(PrivateKey, loaded)
        keys.append(_SigningKey(key_id(private_key.public_key()), private_key))
    if not keys:
        raise ValueError(f"{path} holds no keys")
    return keys


def _check_name(kind: str, value: str, rule: re.Pattern[str]) -> None:
    if not rule.fullmatch(value):
        raise ValueError(
            f"{kind} name {value!r} is not a valid Kubernetes name "
            "(lowercase letters, digits and '-', starting and ending alphanumeric)"
        )


class SimulatedCluster:
    """One simulated Kubernetes cluster: the issuer half of a kube-apiserver.

    ``alg`` is ``RS256`` (RSA-2048, kube-apiserver's default) or ``ES256`` (P-256). With
    ``data_dir`` the keys live in ``data_dir/keys.pem`` (mode 0600) and are reloaded by
    the next instance, so a restarted simulator keeps its keys as a restarted
    kube-apiserver keeps ``--service-account-signing-key-file``. The data dir follows
    the control plane's rules (``common/files.py``): ours, writable by no one else,
    0700; ``keys.pem`` is read only as a regular file of ours open to no one else.
    """

    def __init__(self, name: str, *, data_dir: Path | None = None, alg: str = "RS256") -> None:
        if alg not in SUPPORTED_ALGS:
            raise ValueError(
                f"alg {alg!r} is not supported: use one of {', '.join(SUPPORTED_ALGS)}"
            )
        if not name or any(c.isspace() for c in name):
            raise ValueError(f"cluster name {name!r} must be non-empty, without whitespace")
        self.name = name
        self.alg = alg
        self.data_dir = data_dir
        self._issuer: str | None = None
        self._server: BackgroundServer | None = None
        keys_file = None if data_dir is None else data_dir / _KEYS_FILE
        if data_dir is not None:
            private_directory(data_dir, "simulated cluster data dir")
        # lexists: a symlink at keys.pem is read (and refused), never written through
        if keys_file is not None and os.path.lexists(keys_file):
            self._keys = _read_keys(keys_file)
            if any(_alg_of(key.private_key) != alg for key in self._keys):
                raise ValueError(f"{keys_file} holds keys that cannot sign {alg}")
        else:
            self._keys = [_generate(alg)]
            self._save()
        if data_dir is not None:
            write_atomically(data_dir / _NAME_FILE, name + "\n")

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> SimulatedCluster:
        """Reopen a cluster from its data dir (keys, name, and the issuer written when it
        served), to mint tokens without serving it again. The algorithm follows from
        the stored keys."""
        keys_file, issuer_file = data_dir / _KEYS_FILE, data_dir / _ISSUER_FILE
        if not keys_file.is_file():
            raise ValueError(f"{data_dir} holds no simulated-cluster keys ({_KEYS_FILE})")
        if not issuer_file.is_file():
            raise ValueError(f"{data_dir} holds no issuer URL: serve the cluster there first")
        issuer = issuer_file.read_text(encoding="utf-8").strip()
        if not issuer:
            raise ValueError(f"{issuer_file} is empty")
        name_file = data_dir / _NAME_FILE
        name = name_file.read_text(encoding="utf-8").strip() if name_file.is_file() else ""
        alg = _alg_of(_read_keys(keys_file)[-1].private_key) or "RS256"
        cluster = cls(name or data_dir.resolve().name, data_dir=data_dir, alg=alg)
        cluster._issuer = issuer
        return cluster

    # -- issuer and serving -------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """The ``iss`` of this cluster's tokens: the base URL its discovery is served at."""
        if self._issuer is None:
            raise RuntimeError(f"simulated cluster {self.name!r} has no issuer until it serves")
        return self._issuer

    def app(self, path: str = "") -> Starlette:
        """The discovery endpoints kube-apiserver serves (ServiceAccountIssuerDiscovery),
        under ``path`` when the issuer has one."""
        return Starlette(
            routes=[
                Route(path + DISCOVERY_PATH, self._discovery_endpoint, methods=["GET"]),
                Route(path + JWKS_PATH, self._jwks_endpoint, methods=["GET"]),
            ]
        )

    def serve(self, host: str = "127.0.0.1", port: int = 0, path: str = "") -> SimulatedCluster:
        """Serve discovery and JWKS on a background thread; the issuer becomes its URL,
        plus ``path`` if given (an issuer with a path, as EKS's
        ``https://oidc.eks.<region>.amazonaws.com/id/<id>``: discovery is then at
        ``{issuer}/.well-known/openid-configuration``)."""
        if self._server is not None:
            raise RuntimeError(f"simulated cluster {self.name!r} is already serving")
        path = path.rstrip("/")
        segments = path.split("/")[1:]
        if path and (
            not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", path) or {".", ".."} & set(segments)
        ):
            raise ValueError(
                f"issuer path {path!r} must be /segment[/segment…] of URL-safe characters"
            )
        server = BackgroundServer(self.app(path), host, port)
        # The issuer is known before the first request can arrive.
        self.set_issuer(server.url + path)
        self._server = server.start()
        return self

    def set_issuer(self, url: str) -> None:
        """Fix the issuer URL (``--service-account-issuer``); with a data dir it is also
        written to ``data_dir/issuer`` for ``trustmesh.sim.cli token``."""
        self._issuer = url.rstrip("/")
        if self.data_dir is not None:
            write_atomically(self.data_dir / _ISSUER_FILE, self._issuer + "\n")

    def stop(self) -> None:
        """Stop serving. The issuer URL is kept, so tokens minted later still name it."""
        server, self._server = self._server, None
        if server is not None:
            server.stop()

    def __enter__(self) -> SimulatedCluster:
        if self._server is None:
            self.serve()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- documents --------------------------------------------------------------------

    def discovery(self) -> dict[str, Any]:
        """The OpenID provider metadata kube-apiserver serves, field for field."""
        return {
            "issuer": self.issuer,
            "jwks_uri": self.issuer + JWKS_PATH,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self.alg],
        }

    def jwks(self) -> dict[str, Any]:
        """Every published public key, the signing one last."""
        return {"keys": [key.public_jwk(self.alg) for key in self._keys]}

    async def _discovery_endpoint(self, request: Request) -> Response:
        if self._issuer is None:
            return JSONResponse({"error": "issuer not configured yet"}, status_code=503)
        return JSONResponse(self.discovery(), headers={"Cache-Control": _CACHE_CONTROL})

    async def _jwks_endpoint(self, request: Request) -> Response:
        return Response(
            json.dumps(self.jwks(), separators=(",", ":")),
            media_type="application/jwk-set+json",
            headers={"Cache-Control": _CACHE_CONTROL},
        )

    # -- keys -------------------------------------------------------------------------

    @property
    def kids(self) -> list[str]:
        """The kids of every published key, oldest first."""
        return [key.kid for key in self._keys]

    @property
    def signing_kid(self) -> str:
        return self._keys[-1].kid

    def rotate_key(self) -> str:
        """Make a new key the signing key. The old one stays published, as kube-apiserver
        keeps verifying with every key in ``--service-account-key-file``. -> the new kid."""
        self._keys = [*self._keys, _generate(self.alg)]
        self._save()
        return self.signing_kid

    def drop_key(self, kid: str) -> None:
        """Stop publishing a retired key; tokens it signed no longer verify."""
        if kid == self.signing_kid:
            raise ValueError(f"key {kid} signs new tokens: rotate before dropping it")
        if kid not in self.kids:
            raise ValueError(f"simulated cluster {self.name!r} has no key {kid}")
        self._keys = [key for key in self._keys if key.kid != kid]
        self._save()

    def _save(self) -> None:
        if self.data_dir is None:
            return
        private_directory(self.data_dir, "simulated cluster data dir")
        pem = b"".join(
            key.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            for key in self._keys
        )
        write_atomically(self.data_dir / _KEYS_FILE, pem)

    # -- tokens -----------------------------------------------------------------------

    def service_account_uid(self, namespace: str, service_account: str) -> str:
        """A stable uid per (cluster, namespace, service account), as a real
        ServiceAccount object keeps its ``metadata.uid`` for its whole life."""
        return self._uid("serviceaccount", namespace, service_account)

    def _uid(self, kind: str, *names: str) -> str:
        # Objects keep their metadata.uid for life; a stable uuid5 per (cluster, kind,
        # names) stands in for it, so the same pod or node always shows the same uid.
        return str(uuid.uuid5(_UID_NAMESPACE, "/".join((self.name, kind, *names))))

    def mint(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: list[str] | str = "trustmesh",
        ttl: int = 3600,
        pod_name: str | None = None,
        now: float | None = None,
        node_name: str | None = None,
    ) -> str:
        """A projected service-account token, as the TokenRequest API returns it for a
        pod-bound token: ``kubernetes.io`` names the namespace, service account, pod and
        (since Kubernetes 1.30, ServiceAccountTokenPodNodeInfo) the node. The pod name
        defaults to ``{sa}-xxxxx`` and the node to ``{cluster}-node-1``."""
        _check_name("namespace", namespace, _DNS1123_LABEL)
        _check_name("service account", service_account, _DNS1123_SUBDOMAIN)
        audiences = [audience] if isinstance(audience, str) else list(audience)
        if not audiences or not all(audiences):
            raise ValueError("a token needs at least one non-empty audience")
        if ttl <= 0:
            raise ValueError(f"ttl must be positive, not {ttl}")
        issued_at = int(time.time() if now is None else now)
        if pod_name is None:
            suffix = "".join(secrets.choice(_POD_SUFFIX_ALPHABET) for _ in range(5))
            pod_name = f"{service_account}-{suffix}"
        _check_name("pod", pod_name, _DNS1123_SUBDOMAIN)
        node = node_name or f"{self.name}-node-1"
        claims: dict[str, Any] = {
            "aud": audiences,
            "exp": issued_at + ttl,
            "iat": issued_at,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": {
                "namespace": namespace,
                "node": {"name": node, "uid": self._uid("node", node)},
                "pod": {"name": pod_name, "uid": self._uid("pod", namespace, pod_name)},
                "serviceaccount": {
                    "name": service_account,
                    "uid": self.service_account_uid(namespace, service_account),
                },
            },
            "nbf": issued_at,
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
        }
        key = self._keys[-1]
        # typ=None drops PyJWT's default "typ": "JWT"; kube-apiserver's header has none.
        return jwt.encode(
            claims, key.private_key, algorithm=self.alg, headers={"kid": key.kid, "typ": None}
        )
