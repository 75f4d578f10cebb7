"""Every error trustmesh raises on purpose, in one hierarchy (as httpx keeps its
exceptions in one ``_exceptions.py`` and authlib one class per OAuth error in
``rfc6749/errors.py``).

Each class carries the HTTP status and the machine-readable code it is answered
with, so every app has one exception handler (``common/http.py``) and no handler
maps errors by hand. The body is ``{"error": code, "error_description": text}``
(the RFC 6749 §5.2 shape, which the admin API shares) plus any ``extra`` members;
descriptions are sentences for people and never contain a token or a secret::

    TrustmeshError                    500 server_error
    ├── InvalidRequest                400 invalid_request
    │   ├── PayloadTooLarge           413
    │   ├── RequestTimeout            408 request_timeout (headers or body too slow)
    │   ├── HeadersTooLarge           431 headers_too_large
    │   ├── ManifestError             400 invalid_manifest (problems, with file and line)
    │   ├── SpiffeIdError, RequestError, ReviewError, RevocationError, AuditError
│   ├── CsrRejected               a CSR that is malformed or asks for what it may not
    │   ├── PollError                 RFC 8935 §2.3 shape {"err", "description"}
    │   └── FormatError               a document that does not parse or verify
    │       └── CanonicalError, EventError, NoteError, CheckpointError, ProofError,
    │           BundleError
    ├── OAuthError                    400, RFC 6749 §5.2 / RFC 8693 §2.2.2 codes
    │   ├── InvalidGrant, InvalidTarget, InvalidScope, UnauthorizedClient,
    │   │   UnsupportedGrantType
    │   ├── SubjectSuspended          400 invalid_grant (a suspended subject, DESIGN §5)
    │   └── ClusterKeysTooOld         400 invalid_grant (a cluster's last good keys are
    │                                 older than --cluster-keys-max-age, DESIGN §10)
    ├── Unauthenticated               401 invalid_token
    │   └── InvalidToken              ``reason``: a short machine code
    ├── Forbidden                     403 insufficient_scope
    │   └── SourceMismatch
    ├── NotFound                      404 not_found
    ├── TooManyRequests               429 too_many_requests (a per-credential limit)
    ├── Conflict                      409 conflict (problems)
    │   ├── RegistryConflict, PolicyError
    │   └── SequenceConflict          409 sequence_conflict
    ├── PolicyTestFailed              422 policy_test_failed
    ├── Unavailable                   503 temporarily_unavailable
    │   ├── NotReady                  503 not_ready
    │   ├── ClusterKeysUnavailable
    │   ├── AuditUnavailable          503 audit_unavailable
    │   └── LogInconsistent           503 log_inconsistent
    ├── AdmissionFailed               an admission webhook could not decide (its own error):
    │                                 answered inside the AdmissionReview, as configured
    ├── ConfigError                   start-up configuration that cannot work
    │   └── MasterKeyError, DatabaseUrlError, TracingError, SpoolError, BackupError
    └── ControlPlaneError             a client's call to the control plane failed
        ├── Unreachable               no control-plane URL answered
        ├── CredentialRejected        the credential was refused (401/403)
        ├── AuditRejected             an audit batch was refused (another 4xx)
        ├── ResyncNeeded              the control plane does not know our resume point
        ├── IssuanceRefused           the control plane refused to issue an X.509-SVID
        └── UnusableSvid              an answered X.509-SVID breaks a rule of the standard

Classes that keep ``ValueError``, ``LookupError`` or ``RuntimeError`` as a second base
did so before this hierarchy existed; callers that catch those still work.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class TrustmeshError(Exception):
    """The base: ``status`` and ``error`` say how an HTTP surface answers it; an
    instance may refine ``error`` (and rarely ``status``). ``extra`` members are added
    to the JSON body; ``headers`` to the response."""

    status: int = 500
    error: str = "server_error"
    headers: Mapping[str, str] = {}

    def __init__(
        self,
        description: str,
        *,
        error: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(description)
        self.description = description
        if error is not None:
            self.error = error
        if status is not None:
            self.status = status
        if headers is not None:
            self.headers = headers
        self.extra = extra

    def to_json(self) -> dict[str, Any]:
        return {"error": self.error, "error_description": self.description, **self.extra}


def _summary(problems: Sequence[object]) -> str:
    """The first problem, and how many more there are."""
    more = len(problems) - 1
    text = str(problems[0])
    if more:
        text += f" (and {more} more problem{'s' if more > 1 else ''})"
    return text


# -- 400 ------------------------------------------------------------------------------------
class InvalidRequest(TrustmeshError, ValueError):
    """A request that is malformed or asks for something impossible; the caller can
    fix it. Also the RFC 6749 §5.2 ``invalid_request``."""

    status = 400
    error = "invalid_request"


class PayloadTooLarge(InvalidRequest):
    status = 413


class RequestTimeout(InvalidRequest):
    """A request whose headers (or body) did not arrive within the server's bound."""

    status = 408
    error = "request_timeout"


class HeadersTooLarge(InvalidRequest):
    """A request head (request line and header fields) over the server's size or count
    bound (RFC 6585 §5)."""

    status = 431
    error = "headers_too_large"


class ManifestError(InvalidRequest):
    """Manifests with problems: raised once, after the whole input has been checked,
    with every problem found (each names the file, the line and the field)."""

    error = "invalid_manifest"

    def __init__(self, problems: Sequence[object]) -> None:
        if not problems:
            raise ValueError("ManifestError needs at least one problem")
        self.problems = list(problems)
        super().__init__(_summary(self.problems), problems=[str(p) for p in self.problems])


class SpiffeIdError(InvalidRequest):
    """A string that is not a SPIFFE ID or trust domain (SPIFFE-ID §2)."""


class RequestError(InvalidRequest):
    """An authorization request that cannot be evaluated; the message names the field."""


class ReviewError(InvalidRequest):
    """A body that is not a well-formed Kubernetes review; the message names the field."""


class RevocationError(InvalidRequest):
    """A revocation request that cannot be carried out; the message says why."""


class CsrRejected(InvalidRequest):
    """A certificate signing request refused at ``POST /v1/x509-svid``: malformed, a
    signature that does not verify, a weak key, or a name other than the workload's
    SPIFFE ID (``identity/x509svid.py``); the message, which starts with ``csr:``,
    names the problem."""


class AuditError(InvalidRequest):
    """A request to the audit log that cannot be served (bad range, unknown size...)."""


class PollError(InvalidRequest):
    """An SSF poll that cannot be served, answered in the error shape of RFC 8935 §2.3
    (which RFC 8936 reuses; codes from the registry of RFC 8935 §7.1)."""

    def to_json(self) -> dict[str, Any]:
        return {"err": self.error, "description": self.description}


class FormatError(InvalidRequest):
    """A document that does not parse, or a proof or signature that does not verify."""


class CanonicalError(FormatError):
    """A value that has no RFC 8785 canonical form, or a malformed event time."""


class EventError(FormatError):
    """An audit event that does not follow the schema; the message names the member."""


class NoteError(FormatError):
    """A C2SP signed note or verifier key that is malformed or does not verify."""


class CheckpointError(FormatError):
    """A C2SP tlog-checkpoint that is malformed, or whose signature does not verify."""


class ProofError(FormatError):
    """An RFC 9162 inclusion or consistency proof that is malformed or does not verify."""


class BundleError(FormatError):
    """A SPIFFE bundle that does not parse or breaks a rule of the SPIFFE Trust Domain and
    Bundle format (``identity/spiffe_bundle.py``), or that exceeds our bounds."""


# -- OAuth 2.0 (RFC 6749 §5.2, RFC 8693 §2.2.2) ---------------------------------------------
class OAuthError(TrustmeshError):
    status = 400


class InvalidGrant(OAuthError):
    """The subject token failed verification."""

    error = "invalid_grant"


class InvalidTarget(OAuthError):
    """An audience we cannot issue for (RFC 8693 §2.2.2)."""

    error = "invalid_target"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class UnauthorizedClient(OAuthError):
    """The verified service account is not admitted by any Workload."""

    error = "unauthorized_client"


class NoWorkload(UnauthorizedClient):
    """A verified service account that no Workload selects and no WorkloadTemplate
    matches: what ``trustmesh get pending`` lists (DESIGN §11). Carries the verified
    (cluster, namespace, service account), never the token."""

    def __init__(self, cluster: str, namespace: str, service_account: str) -> None:
        super().__init__(
            f"no Workload selects service account {namespace}/{service_account} "
            f"in cluster {cluster}, and no WorkloadTemplate matches it"
        )
        self.cluster = cluster
        self.namespace = namespace
        self.service_account = service_account


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class SubjectSuspended(InvalidGrant):
    """The verified subject (its workload, SPIFFE ID or origin cluster) is suspended:
    no credential of any kind is issued for it until ``trustmesh resume``."""


class WorkloadRetired(SubjectSuspended):
    """The Workload was retired for going unused (``spec.retireAfterUnused``, DESIGN
    §11): no credential until an apply of its manifest restores it."""


# -- 401 / 403 / 404 / 409 / 422 ------------------------------------------------------------
class Unauthenticated(TrustmeshError):
    status = 401
    error = "invalid_token"


class InvalidToken(Unauthenticated):
    """A token that does not verify. ``reason`` is a short machine code (``expired``,
    ``unknown_kid``…), the description a sentence; neither contains the token."""

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason


class Forbidden(TrustmeshError):
    status = 403
    error = "insufficient_scope"


class SourceMismatch(Forbidden):
    """An audit source id that already belongs to another cluster."""


class NotFound(TrustmeshError, LookupError):
    status = 404
    error = "not_found"


class TooManyRequests(TrustmeshError):
    """A caller over a limit of its own (RFC 6585 §4); ``Retry-After`` says when to
    try again."""

    status = 429
    error = "too_many_requests"


class Conflict(TrustmeshError, ValueError):
    """Documents that are each valid but do not fit together; ``problems`` has one line
    per problem, each naming the object."""

    status = 409
    error = "conflict"

    def __init__(self, problems: Sequence[str] | str, **extra: Any) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(_summary(self.problems), problems=self.problems, **extra)


class RegistryConflict(Conflict):
    """Registry documents that contradict each other or the trust domain."""


class PolicyError(Conflict):
    """Policy documents that are each valid but do not compile together."""


class SequenceConflict(TrustmeshError):
    """A (source, seq) already in the audit log holds different bytes."""

    status = 409
    error = "sequence_conflict"


class PolicyTestFailed(TrustmeshError):
    """A candidate policy failed PolicyTest cases; the version in force stays.
    ``failed`` holds the failing case results (``describe()``, ``to_json()``)."""

    status = 422
    error = "policy_test_failed"

    def __init__(self, failed: Sequence[Any], total: int) -> None:
        self.failed = list(failed)
        self.total = total
        super().__init__(
            f"{len(self.failed)} of {total} policy test cases failed; first: "
            f"{self.failed[0].describe()}",
            problems=[r.describe() for r in self.failed],
            failed=[r.to_json() for r in self.failed],
        )


# -- 503 ------------------------------------------------------------------------------------
class Unavailable(TrustmeshError):
    """Cannot answer now; the same request may succeed later."""

    status = 503
    error = "temporarily_unavailable"


class NotReady(Unavailable):
    error = "not_ready"
    headers = {"Retry-After": "1"}


class ClusterKeysUnavailable(Unavailable):
    """A cluster's keys could not be fetched and none are cached."""


class ClusterKeysTooOld(ClusterKeysUnavailable):
    """No key source of the token's cluster answers and its last good key set is older
    than ``--cluster-keys-max-age``: the token cannot be verified with keys we may still
    trust (DESIGN §10). A 503, not a refusal of the grant: the token may be good, and a
    client tries the next replica (which may reach a source) or again later."""


class AuditUnavailable(Unavailable):
    """The audit record could not be written, so the answer is not given (fail closed)."""

    error = "audit_unavailable"
    headers = {"Retry-After": "1"}


class LogInconsistent(Unavailable, RuntimeError):
    """The stored audit log no longer extends its last signed checkpoint (it was altered)."""

    error = "log_inconsistent"


# -- start-up -------------------------------------------------------------------------------
class AdmissionFailed(TrustmeshError):
    """An admission webhook could not decide a well-formed review by its own fault (no
    configuration or bundle from the control plane yet, a pod it cannot read): never an
    HTTP error, but an AdmissionReview answer that allows the pod unchanged, or refuses
    it with ``--admission-failure-policy fail`` (``agent/admission.py``)."""

    error = "admission_failed"


class ConfigError(TrustmeshError, ValueError):
    """Configuration that cannot work; the message says what to change (the CLI prints
    it as its one line)."""

    error = "configuration_error"


class MasterKeyError(ConfigError, RuntimeError):
    """The master key file is missing, unreadable, or not the one that sealed the keys."""


class DatabaseUrlError(ConfigError):
    """A ``--db`` URL that names no supported database."""


class TracingError(ConfigError):
    """An OpenTelemetry exporter setting that cannot work."""


class SpoolError(ConfigError, RuntimeError):
    """The agent's audit spool cannot be opened or written (disk full, I/O error,
    damaged files)."""


class BackupError(ConfigError):
    """A backup that cannot be written, read or restored (damaged, not verifying, a
    target that is not empty, a restore that would fork the published log)."""


# -- clients of the control plane -----------------------------------------------------------
class ControlPlaneError(TrustmeshError):
    """A call from an agent, sidecar or SDK to the control plane failed."""

    status = 502
    error = "control_plane_error"


class Unreachable(ControlPlaneError):
    """No control-plane URL answered; the message lists what each one did."""


class CredentialRejected(ControlPlaneError):
    """The control plane refused the credential (401/403), or it names another cluster."""


class AuditRejected(ControlPlaneError):
    """The control plane refused an audit batch with a 4xx other than 401/403: the
    batch or the agent is wrong (a bug). The message carries the answer."""

    def __init__(self, server: str, status: int, answer: str) -> None:
        super().__init__(f"{server} answered HTTP {status} to an audit batch: {answer}")
        self.answer_status = status


class ResyncNeeded(ControlPlaneError):
    """The control plane does not know our resume point (a restored database): start
    again from the beginning."""


class IssuanceRefused(ControlPlaneError):
    """The control plane refused to issue an X.509-SVID with a 4xx other than 408 and
    429 (the service-account token does not verify, no Workload matches, the subject is
    suspended, the CSR is wrong): another replica would answer the same. The message
    carries the server's ``error`` and ``error_description``."""

    def __init__(self, server: str, status: int, error: str, description: str) -> None:
        detail = f": {description}" if description else ""
        super().__init__(f"{server} refused the X.509-SVID ({error}, HTTP {status}){detail}")
        self.server = server
        self.answer_status = status
        self.answer_error = error


class UnusableSvid(ControlPlaneError):
    """An X.509-SVID the control plane answered that the sidecar will not serve (not
    our key, not an X509-SVID leaf, a broken chain, expired); the message names the rule."""
