"""The usage tracker's store on SQLite and PostgreSQL (``server/usage.py``): the caps of
the pending list (per cluster and in total), its retention, rows a registry admits
leaving (by a Workload or a matching WorkloadTemplate), suggested Workload names that
are valid labels and stay apart when cut, and last-use times that never move backwards
whatever order the batches come in."""

from __future__ import annotations

from pathlib import Path

from trustmesh.manifests import parse_text
from trustmesh.registry.index import build_registry
from trustmesh.server.usage import UsageTracker, suggested_name
from trustmesh.storage import open_database

TD = "corp.example"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_caps_retention_and_admission(db_url: str | None, tmp_path: Path) -> None:
    db = open_database(db_url, tmp_path)
    clock = Clock(1000.0)
    workload = """apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata:
  name: admitted
spec:
  selector: {cluster: c1, namespace: ns, serviceAccount: a}
"""
    cluster = """apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata:
  name: c1
spec:
  issuer: https://c1.example
"""
    empty = build_registry(TD, 0, [])
    registry = [empty]
    tracker = UsageTracker(db, clock, lambda: registry[0], TD, per_cluster=2, total=3)
    try:
        for cluster_name, account in [("c1", "a"), ("c1", "b"), ("c1", "c"), ("c2", "x"),
                                      ("c3", "y")]:  # fmt: skip
            tracker.refused(cluster_name, "ns", account, clock.now)
        tracker.write(tracker.take())
        listed = {(p.cluster, p.service_account) for p in tracker.pending()}
        assert listed == {("c1", "a"), ("c1", "b"), ("c2", "x")}  # 2 per cluster, 3 in all
        assert tracker.dropped == 2
        tracker.refused("c1", "ns", "a", 1001.0)  # listed rows keep counting at the cap
        tracker.write(tracker.take())
        counts = {p.service_account: p.count for p in tracker.pending()}
        assert counts["a"] == 2

        documents = parse_text(cluster + "---\n" + workload, "w.yaml")
        registry[0] = build_registry(TD, 1, documents)
        assert ("c1", "a") not in {(p.cluster, p.service_account) for p in tracker.pending()}

        clock.now += tracker.retention + 100  # nothing refused since: rows leave
        tracker.write(tracker.take())
        assert tracker.pending() == []
    finally:
        db.dispose()


def test_last_use_never_moves_backwards(db_url: str | None, tmp_path: Path) -> None:
    db = open_database(db_url, tmp_path)
    tracker = UsageTracker(db, Clock(5000.0), lambda: build_registry(TD, 0, []), TD)
    spiffe_id = f"spiffe://{TD}/w"
    event = {
        "type": "authz.decision",
        "actor": spiffe_id,
        "identity": {"spiffe_id": spiffe_id},
        "cluster": "b",
        "time": "1970-01-01T00:50:00.000Z",  # 3000 s
    }
    try:
        tracker.credential(spiffe_id, "w", "x509-svid", 4000.0)
        tracker.decisions([event, {**event, "time": "1970-01-01T00:16:40.000Z", "cluster": "a"}])
        tracker.decisions([{**event, "actor": "spiffe://other.example/w"}])  # not ours
        tracker.decisions([{**event, "time": "2999-01-01T00:00:00.000Z", "cluster": "c"}])
        tracker.write(tracker.take())
        tracker.credential(spiffe_id, "w", "jwt-svid", 3500.0)  # older: changes nothing
        tracker.write(tracker.take())
        usage = tracker.usage([spiffe_id, "spiffe://other.example/w"])
        assert list(usage) == [spiffe_id]
        found = usage[spiffe_id]
        assert (found.last_credential_at, found.last_credential_kind) == (4000.0, "x509-svid")
        assert (found.last_decision_at, found.last_decision_cluster) == (5000.0, "c")  # now
    finally:
        db.dispose()


def test_suggested_names_are_labels_that_stay_apart() -> None:
    assert suggested_name("eu-1", "checkout", "cart.v2") == "eu-1-checkout-cart-v2"
    long_a = suggested_name("c" * 40, "n" * 30, "a" * 50)
    long_b = suggested_name("c" * 40, "n" * 30, "a" * 49 + "b")
    assert len(long_a) <= 63 and len(long_b) <= 63 and long_a != long_b
    assert not long_a.startswith("-") and not long_a.endswith("-")


def test_a_matching_workload_template_admits_pending_rows(
    db_url: str | None, tmp_path: Path
) -> None:
    """A WorkloadTemplate admits as a Workload does (the exchange's own resolution): the
    rows it matches leave — in the caller's transaction, as an apply clears them — and
    the rows it does not match stay, a name Kubernetes would not spell included."""
    db = open_database(db_url, tmp_path)
    clock = Clock(1000.0)
    documents = parse_text(
        """apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata:
  name: c1
spec:
  issuer: https://c1.example
---
apiVersion: trustmesh.io/v1alpha1
kind: WorkloadTemplate
metadata:
  name: teams
spec:
  clusters: {names: [c1]}
  namespaces: ["team-*"]
  serviceAccounts: ["*"]
""",
        "t.yaml",
    )
    empty = build_registry(TD, 0, [])
    tracker = UsageTracker(db, clock, lambda: empty, TD)
    try:
        for cluster_name, namespace in [("c1", "team-a"), ("c1", "payments"),
                                        ("c1", "team-A"), ("c2", "team-a")]:  # fmt: skip
            tracker.refused(cluster_name, namespace, "api", clock.now)
        tracker.write(tracker.take())
        assert len(tracker.pending()) == 4  # nothing admits them yet
        with db.engine.begin() as conn:
            tracker.clear_admitted_in(conn, build_registry(TD, 1, documents))
        listed = {(p.cluster, p.namespace) for p in tracker.pending()}
        assert listed == {("c1", "payments"), ("c1", "team-A"), ("c2", "team-a")}
    finally:
        db.dispose()
