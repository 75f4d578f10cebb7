"""The control plane's side of its agents: the credentials that let one agent instance act
for one cluster, the configuration each one fetches, and which policy revision each one
last reported applying (``agent_status``, one row per (cluster, agent), written on every
bundle poll; the agent is the one its credential names) and which revocation revision
it holds (the ``held`` of its revocation polls, recorded in the row its bundle polls
made)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, update

from trustmesh.common.clock import Clock
from trustmesh.common.errors import Conflict, Forbidden, NotFound
from trustmesh.registry import RegistryStore
from trustmesh.revocation.suspension import SuspensionStore
from trustmesh.server.credentials import (
    CLUSTER,
    CredentialRecord,
    CredentialStore,
    Principal,
    issued_detail,
)
from trustmesh.server.recorder import AuditRecorder
from trustmesh.server.snapshots import Snapshots
from trustmesh.spiffeid import cluster_audience
from trustmesh.storage import Database
from trustmesh.storage.schema import agent_status

AGENT_STALE_AFTER = 90.0  # an agent that has not polled for this long is not counted


class Agents:
    def __init__(
        self,
        db: Database,
        snapshots: Snapshots,
        credentials: CredentialStore,
        registry_store: RegistryStore,
        suspension_store: SuspensionStore,
        recorder: AuditRecorder,
        clock: Clock,
    ) -> None:
        self.db = db
        self.snapshots = snapshots
        self.credentials = credentials
        self.registry_store = registry_store
        self.suspension_store = suspension_store
        self.recorder = recorder
        self.clock = clock

    def issue_credential(
        self,
        cluster: str,
        actor: str,
        agent: str | None = None,
        expires_in: int | None = None,
    ) -> tuple[CredentialRecord, str]:
        """A new credential for one agent instance of ``cluster`` (``agent``: its id;
        default, the credential's id), valid for ``expires_in`` seconds or until revoked.
        ``admin.credential_issued`` records its id and hash, never the secret. Refused
        (409) while the cluster is suspended."""
        if cluster not in self.registry_store.load().clusters:
            raise NotFound(f"cluster {cluster} is not registered")
        expires_at = None if expires_in is None else self.clock() + expires_in

        def record(conn: Connection, credential: CredentialRecord, secret: str) -> None:
            if self.suspension_store.get_in(conn, "cluster", cluster) is not None:
                raise Conflict(
                    f"cluster {cluster} is suspended: no credential is issued for it until "
                    "trustmesh resume --cluster"
                )
            self.recorder.stage(
                conn,
                "admin.credential_issued",
                actor,
                issued_detail(credential, secret),
                cluster=cluster,
            )

        issued = self.credentials.create(
            CLUSTER,
            created_by=actor,
            cluster=cluster,
            agent=agent,
            expires_at=expires_at,
            on_commit=record,
        )
        self.recorder.drain()
        return issued

    def config(self, principal: Principal, cluster: str | None) -> dict[str, Any]:
        """``GET /v1/agent/config``: what an agent of ``cluster`` needs to verify tokens
        (a cluster credential names its own cluster; the admin names one)."""
        name = principal.cluster if cluster is None else cluster
        if name is None:
            raise NotFound(
                "name the cluster (?cluster=NAME) when calling with the admin credential"
            )
        if not principal.may_act_for(name):
            raise Forbidden(
                f"this credential is for cluster {principal.cluster}, not {name}"
                if principal.cluster is not None
                else f"this endpoint needs the admin role; {principal.name} has the "
                f"{principal.role} role"
            )
        if name not in self.snapshots.registry.clusters:
            raise NotFound(f"cluster {name} is not registered")
        trust_domain = self.snapshots.trust_domain
        config = {
            "cluster": name,
            "trust_domain": trust_domain,
            "issuer": self.snapshots.issuer,
            "audience": cluster_audience(trust_domain, name),
            # the Cluster's `audience`: what its SA tokens must carry (the admission
            # webhook projects tokens for it)
            "service_account_audience": self.snapshots.registry.clusters[name].audience,
        }
        if principal.agent is not None:
            config["agent"] = principal.agent
        return config

    def record(self, cluster: str, agent_id: str, applied: tuple[int, int]) -> None:
        """An agent of ``cluster`` reported the (policy, registry) revision it applies."""
        now = self.clock()
        with self.db.engine.begin() as conn:
            updated = conn.execute(
                update(agent_status)
                .where(agent_status.c.cluster == cluster, agent_status.c.agent_id == agent_id)
                .values(policy_revision=applied[0], registry_revision=applied[1], last_seen=now)
            )
            if updated.rowcount == 0:
                conn.execute(
                    agent_status.insert().values(
                        cluster=cluster,
                        agent_id=agent_id,
                        policy_revision=applied[0],
                        registry_revision=applied[1],
                        last_seen=now,
                    )
                )

    def record_revocations(self, cluster: str, agent_id: str, held: int) -> bool:
        """An agent of ``cluster`` holds the revocation list up to revision ``held``.
        Recorded in the row its bundle polls keep; False when it has none yet (a new
        agent's first revocation poll can come before its first bundle report: its next
        poll records it)."""
        with self.db.engine.begin() as conn:
            updated = conn.execute(
                update(agent_status)
                .where(agent_status.c.cluster == cluster, agent_status.c.agent_id == agent_id)
                .values(revocation_revision=held)
            )
            return bool(updated.rowcount)

    def reports(self) -> dict[str, list[dict[str, Any]]]:
        """Every agent's last report, by cluster."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(agent_status).order_by(agent_status.c.cluster, agent_status.c.agent_id)
            )
            out: dict[str, list[dict[str, Any]]] = {}
            for row in rows:
                out.setdefault(row.cluster, []).append(
                    {
                        "agentId": row.agent_id,
                        "appliedRevision": row.policy_revision,
                        "appliedRegistryRevision": row.registry_revision,
                        "lastSeen": row.last_seen,
                        "revocationRevision": row.revocation_revision,
                    }
                )
            return out

    def policy_status(
        self, cluster: str, reports: dict[str, list[dict[str, Any]]]
    ) -> dict[str, Any]:
        """``status.policy`` of a Cluster: desired and applied revisions, drift."""
        desired = self.snapshots.policy_revision
        now = self.clock()
        agents = reports.get(cluster, [])
        fresh = [a for a in agents if now - a["lastSeen"] < AGENT_STALE_AFTER]
        applied = sorted({a["appliedRevision"] for a in fresh})
        return {
            "desiredRevision": desired,
            "appliedRevisions": applied,
            "agents": agents,
            "drift": bool(fresh) and applied != [desired],
            "agentsReporting": len(fresh),
        }
