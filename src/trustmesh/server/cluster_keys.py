"""The last good key set of each cluster, in the database (DESIGN §10): the
:class:`~trustmesh.identity.kubernetes_sa.KeySetStore` of the control plane.

* **Kept after every good fetch.** :meth:`ClusterKeyStore.save` replaces the stored set
  only with a newer one (or one fetched for changed key sources), so replicas that
  fetch at once never put an older set back.
* **Read when no source answers.** A replica that has just started (nothing in memory)
  or whose keys are older than another replica's takes the stored set; it serves for
  at most ``--cluster-keys-max-age`` after its ``fetched_at``.
* **Its expiry is recorded once.** The first replica that finds the set too old with
  no source answering marks it (compare-and-set on ``expired_at``) and stages
  ``cluster.keys_expired`` in the same transaction; the others see it marked.

What the replica serves from a stored set is reported by ``/readyz`` (admin detail) and
the ``trustmesh_cluster_keys_*`` metrics (:class:`ClusterKeysCollector`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from trustmesh.audit import events as ev
from trustmesh.common.clock import Clock
from trustmesh.identity.kubernetes_sa import ClusterKeyCache, StoredKeySet
from trustmesh.server.recorder import AuditRecorder
from trustmesh.storage import Database
from trustmesh.storage.schema import cluster_keys

ACTOR = "system"


class ClusterKeyStore:
    def __init__(self, db: Database, recorder: AuditRecorder) -> None:
        self.db = db
        self.recorder = recorder

    def load(self, cluster: str) -> StoredKeySet | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(
                select(cluster_keys).where(cluster_keys.c.cluster == cluster)
            ).first()
        if row is None:
            return None
        jwks = json.loads(row.jwks)
        if not isinstance(jwks, dict):
            return None
        return StoredKeySet(row.source, jwks, row.fetched_at, row.fetched_from)

    def save(self, cluster: str, keys: StoredKeySet) -> None:
        values: dict[str, Any] = {
            "source": keys.source,
            "jwks": json.dumps(keys.jwks, sort_keys=True, separators=(",", ":")),
            "fetched_at": keys.fetched_at,
            "fetched_from": keys.fetched_from,
            "expired_at": None,
        }
        with self.db.engine.begin() as conn:
            replaced = conn.execute(
                update(cluster_keys)
                .where(
                    cluster_keys.c.cluster == cluster,
                    or_(
                        cluster_keys.c.fetched_at < keys.fetched_at,
                        cluster_keys.c.source != keys.source,
                    ),
                )
                .values(**values)
            ).rowcount
            if replaced:
                return
            present = conn.execute(
                select(cluster_keys.c.cluster).where(cluster_keys.c.cluster == cluster)
            ).first()
        if present is not None:
            return  # a newer set is kept already
        try:
            with self.db.engine.begin() as conn:
                conn.execute(insert(cluster_keys).values(cluster=cluster, **values))
        except IntegrityError:
            pass  # another replica stored one at the same moment; the next fetch compares

    def expired(self, cluster: str, keys: StoredKeySet, max_age: float, now: float) -> None:
        with self.db.engine.begin() as conn:
            marked = conn.execute(
                update(cluster_keys)
                .where(
                    cluster_keys.c.cluster == cluster,
                    cluster_keys.c.source == keys.source,
                    cluster_keys.c.fetched_at == keys.fetched_at,
                    cluster_keys.c.expired_at.is_(None),
                )
                .values(expired_at=now)
            ).rowcount
            if marked != 1:
                return  # reported by another replica, or a newer set is stored
            self.recorder.stage(
                conn,
                ev.CLUSTER_KEYS_EXPIRED,
                ACTOR,
                {
                    "fetched_at": ev.now_time(keys.fetched_at),
                    "fetched_from": keys.fetched_from,
                    "max_age": int(max_age),
                    "keys": len(keys.jwks.get("keys") or ()),
                },
                cluster,
            )
        self.recorder.drain()


def stored_keys_report(cache: ClusterKeyCache, now: float) -> dict[str, Any]:
    """``/readyz`` (admin detail): cluster -> since when it is served from its last good
    key set (no source answering), when that set was fetched, its age, and whether it
    is past ``--cluster-keys-max-age`` (``expired``: the cluster's tokens are refused)."""
    return {
        name: {
            "since": ev.now_time(use.since),
            "fetched_at": ev.now_time(use.fetched_at),
            "age_seconds": round(now - use.fetched_at, 3),
            "expired": now - use.fetched_at > cache.max_keys_age,
        }
        for name, use in sorted(cache.stored_in_use().items())
    }


class ClusterKeysCollector(Collector):
    """``trustmesh_cluster_keys_stored{cluster}`` (1: served from the last good key set,
    no source answering; 0: the last fetch succeeded) and
    ``trustmesh_cluster_keys_age_seconds{cluster}``, read at scrape time."""

    def __init__(self, cache: ClusterKeyCache, clock: Clock) -> None:
        self.cache = cache
        self.clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self.clock()
        ages = self.cache.key_ages(now)
        stored = self.cache.stored_in_use()
        in_use = GaugeMetricFamily(
            "trustmesh_cluster_keys_stored",
            "1 while a cluster's tokens are verified with its last good key set because no "
            "key source answers (bounded by --cluster-keys-max-age), else 0",
            labels=["cluster"],
        )
        age = GaugeMetricFamily(
            "trustmesh_cluster_keys_age_seconds",
            "Seconds since the key set a cluster's tokens are verified with was fetched",
            labels=["cluster"],
        )
        for name in sorted(ages):
            in_use.add_metric([name], 1.0 if name in stored else 0.0)
            age.add_metric([name], ages[name])
        yield in_use
        yield age
