"""The demo's client of the control plane's admin API: apply manifests, read the
policy revision in force, issue cluster credentials, rotate the signing key, revoke or
suspend a workload; each with the admin credential, each failure an :class:`ApiError`."""

from __future__ import annotations

from typing import Any

import httpx

from trustmesh.sim.demo._http import json_body
from trustmesh.sim.demo.errors import ApiError, DemoError


class Admin:
    """The few admin calls the demo needs, with the admin credential."""

    def __init__(self, http: httpx.Client, url: str, token: str) -> None:
        self.http, self.url = http, url
        self.first_token = token  # the one it started with (the bootstrap admin.token)
        self.act_as(token)

    def act_as(self, token: str) -> None:
        """Call with another credential from now on (a person's, once people exist)."""
        self.token = token
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(
        self,
        path: str,
        body: dict[str, Any] | None = None,
        method: str = "POST",
        ok: tuple[int, ...] = (200,),
    ) -> Any:
        try:
            response = self.http.request(method, self.url + path, json=body, headers=self.headers)
        except httpx.HTTPError as exc:
            raise DemoError(f"{method} {path} failed: {exc}") from None
        document = json_body(response)
        if response.status_code not in ok:
            raise ApiError(f"{method} {path}", response.status_code, document, response.text)
        return document

    def apply(self, files: dict[str, str], message: str) -> dict[str, Any]:
        """-> the apply result (``registryRevision``, ``policyRevision``, ``tests``...)."""
        body = {
            "files": [{"path": path, "content": content} for path, content in files.items()],
            "author": "trustmesh demo",
            "message": message,
        }
        result: dict[str, Any] = self.call("/v1/apply", body)
        return result

    def policy_revision(self) -> int:
        """The policy revision in force at the control plane."""
        return int(self.call("/v1/policy/versions/current", method="GET")["revision"])

    def cluster_credential(self, cluster: str, agent: str | None = None) -> str:
        """A credential for an agent of ``cluster``; ``agent`` names the instance (one
        credential each, DESIGN §11)."""
        body = {"agent": agent} if agent is not None else None
        return str(self.call(f"/v1/clusters/{cluster}/credentials", body)["token"])

    def rotate_keys(self) -> tuple[str, str]:
        """-> (the retired kid, the new active kid)."""
        result = self.call("/v1/keys/rotate")
        active = str(result["active"]["kid"])
        retired = [k for k in result["keys"] if k["state"] == "retired"]
        latest = max(retired, key=lambda k: k.get("retired_at") or 0, default={"kid": "?"})
        return str(latest["kid"]), active

    def revoke_workload(self, workload: str, reason: str) -> dict[str, Any]:
        """-> the revocation entry (``revision``, ``revoked_at``...); 201 when new, 200
        when the same revocation was already in force."""
        body = {"kind": "workload", "value": workload, "reason": reason}
        result = self.call("/v1/revocations", body, ok=(200, 201))
        entry: dict[str, Any] = result["revocation"]
        return entry

    def suspend_workload(self, workload: str, reason: str) -> dict[str, Any]:
        """DESIGN §5: no new credential of any kind for ``workload``, and what was issued
        revoked. -> ``{"created", "suspension", "revocation", ...}``."""
        body = {"kind": "workload", "value": workload, "reason": reason}
        result: dict[str, Any] = self.call("/v1/suspensions", body, ok=(200, 201))
        return result

    def add_person(self, name: str, role: str) -> str:
        """``trustmesh user add NAME --role ROLE``: -> the person's credential."""
        return str(self.call("/v1/people", {"name": name, "role": role})["token"])

    def request_access(
        self, role: str, subject: str, clusters: list[str], seconds: int, reason: str
    ) -> dict[str, Any]:
        """``trustmesh access request``: -> the request (``id``, ``state``...)."""
        kind, _, value = subject.partition("=")
        body = {
            "role": role,
            "subject": {kind: value},
            "clusters": clusters,
            "duration": seconds,
            "reason": reason,
        }
        result: dict[str, Any] = self.call("/v1/access", body, ok=(200, 201))
        return result

    def decide_access(self, ident: str, verdict: str, reason: str) -> dict[str, Any]:
        """``trustmesh access approve|deny ID``: -> the decided request."""
        result: dict[str, Any] = self.call(f"/v1/access/{ident}/{verdict}", {"reason": reason})
        return result


def tests_passed(result: dict[str, Any]) -> str:
    tests = result.get("tests") or {}
    return f"{tests.get('passed', '?')}/{tests.get('total', '?')}"
