"""The identities WorkloadTemplates gave, as observed (DESIGN §11): a row per (template,
cluster, namespace, service account) written when the identity first receives a
credential, so ``get workloads``, ``policy diff`` and PolicyTests see them. Each
replica remembers what it has written and writes nothing more for it."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from trustmesh.storage import Database
from trustmesh.storage.schema import template_identities

MEMO = 100_000


@dataclass(frozen=True)
class ObservedIdentity:
    template: str
    cluster: str
    namespace: str
    service_account: str
    spiffe_id: str
    first_issued_at: float


class TemplateObservations:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._written: set[tuple[str, str, str, str]] = set()

    def is_new(self, template: str, cluster: str, namespace: str, sa: str) -> bool:
        """Whether this replica has not recorded the identity yet (cheap, no I/O)."""
        return (template, cluster, namespace, sa) not in self._written

    def record(
        self, template: str, cluster: str, namespace: str, sa: str, spiffe_id: str, now: float
    ) -> None:
        key = (template, cluster, namespace, sa)
        if key in self._written:
            return
        try:
            with self.db.engine.begin() as conn:
                found = conn.execute(
                    select(template_identities.c.template).where(
                        template_identities.c.template == template,
                        template_identities.c.cluster == cluster,
                        template_identities.c.namespace == namespace,
                        template_identities.c.service_account == sa,
                    )
                ).first()
                if found is None:
                    conn.execute(
                        template_identities.insert().values(
                            template=template,
                            cluster=cluster,
                            namespace=namespace,
                            service_account=sa,
                            spiffe_id=spiffe_id,
                            first_issued_at=now,
                        )
                    )
        except IntegrityError:
            pass  # another replica recorded it first
        if len(self._written) >= MEMO:
            self._written.clear()
        self._written.add(key)

    def list(self) -> list[ObservedIdentity]:
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(template_identities).order_by(
                    template_identities.c.template,
                    template_identities.c.cluster,
                    template_identities.c.namespace,
                    template_identities.c.service_account,
                )
            ).all()
        return [ObservedIdentity(**row._mapping) for row in rows]
