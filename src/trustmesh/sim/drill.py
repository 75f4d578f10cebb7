"""``trustmesh drill`` (DESIGN §10): a disaster-recovery drill on a local federation.

It starts a control plane (SQLite in its own data dir, or the scratch PostgreSQL
database ``--db`` names, which it destroys), two simulated clusters, and an agent for
one of them; issues a token and has the agent allow it; takes the checkpoint published
before the drill; backs up (``server/backup.py``); generates traffic after the backup
(exchanges, a registry change); crashes the control plane (SIGKILL), reads exactly what
the backup misses straight from the crashed database, destroys the database, restores
it (with the last published checkpoint, accepting the loss as DESIGN §10 says: a new
log origin), restarts the control plane on the same address, and checks:

* **restore**: the backup's audit log verified and the restore finished;
* **tokens**: the token issued before the drill is still allowed at the agent, and a
  token the restored control plane issues is too (same signing keys);
* **agents**: the agent answered every probe (one every 100 ms from before the backup
  until after the restart) and allowed the token throughout, within its staleness bound;
* **log**: a consistency proof from the restored control plane that its log extends the
  checkpoint published before the drill, verified against that checkpoint's root.

Recovery time runs from the destruction of the database to the restored control plane's
ready line. What was lost (the recovery point) is reported exactly: the log entries
after the backup, by index and type, and the registry and policy revisions.
"""

from __future__ import annotations

import base64
import itertools
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from trustmesh.audit import events as ev
from trustmesh.audit import offline
from trustmesh.audit.checkpoint import Checkpoint, verify_checkpoint
from trustmesh.audit.proof import verify_consistency
from trustmesh.common.errors import ProofError, TrustmeshError
from trustmesh.server.backup import restore, write_backup
from trustmesh.sim.cluster import SimulatedCluster
from trustmesh.sim.demo.processes import (
    AGENT_READY,
    READY_TIMEOUT,
    SERVER_READY,
    Child,
    agent_argv,
    trustmesh_argv,
    write_credential,
)
from trustmesh.storage import schema
from trustmesh.storage.db import engine_url

TRUST_DOMAIN = "drill.example"
ORIGIN, TARGET = "drill-origin", "drill-target"
REQUEST = {"host": "orders.shop.svc", "path": "/api/orders/1", "method": "GET"}
PROBE_INTERVAL = 0.1
TRAFFIC_AFTER_BACKUP = 20
STALENESS_BOUND = 300.0


class DrillError(TrustmeshError):
    """The drill could not run (a part did not start, a call failed)."""

    error = "drill_failed"


def _manifests(origin_issuer: str, target_issuer: str) -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {{name: {ORIGIN}}}
spec: {{issuer: "{origin_issuer}"}}
---
apiVersion: trustmesh.io/v1alpha1
kind: Cluster
metadata: {{name: {TARGET}}}
spec: {{issuer: "{target_issuer}", labels: {{environment: prod}}}}
---
apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: payments}}
spec:
  selector: {{cluster: {ORIGIN}, namespace: shop, serviceAccount: payments}}
  claims: {{project: shop, environment: prod, tier: gold}}
---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: orders-reader}}
spec:
  rules:
    - services: [orders.shop.svc]
      paths: [/api/orders/**]
      methods: [GET]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: shop-reads-orders}}
spec:
  role: orders-reader
  subjects:
    - claims: {{project: shop}}
  clusters:
    selector:
      matchLabels: {{environment: prod}}
"""


def _late_workload() -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: added-after-backup}}
spec:
  selector: {{cluster: {ORIGIN}, namespace: shop, serviceAccount: late}}
  claims: {{project: shop, environment: prod, tier: gold}}
"""


@dataclass
class Probe:
    at: float
    status: int  # 0: no answer
    allowed: bool


@dataclass
class Prober:
    """Asks the agent about the pre-drill token every PROBE_INTERVAL, on a thread."""

    url: str
    token: str
    probes: list[Probe] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="drill-prober", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with httpx.Client(timeout=2.0) as http:
            while not self._stop.is_set():
                status, allowed = 0, False
                try:
                    answer = http.post(
                        self.url + "/v1/authorize", json={"token": self.token, "request": REQUEST}
                    )
                    status = answer.status_code
                    allowed = status == 200 and answer.json().get("allowed") is True
                except (httpx.HTTPError, ValueError):
                    pass
                self.probes.append(Probe(time.time(), status, allowed))
                self._stop.wait(PROBE_INTERVAL)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class Plane:
    """A control plane (our child process, or None: a live one), and an admin client."""

    child: Child | None
    url: str
    http: httpx.Client

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            answer = self.http.request(method, self.url + path, **kwargs)
        except httpx.HTTPError as exc:
            raise DrillError(f"{method} {path} failed: {exc}") from None
        if answer.status_code >= 300:
            raise DrillError(f"{method} {path} answered {answer.status_code}: {answer.text[:200]}")
        return answer


def _start_plane(
    data_dir: Path,
    db: str | None,
    listen: str,
    logs: Path,
    name: str,
    admin_token: str | None,
    trust_domain: str = TRUST_DOMAIN,
    master_key_file: Path | None = None,
) -> Plane:
    argv = trustmesh_argv(
        "server", "--data-dir", data_dir, "--listen", listen, "--trust-domain", trust_domain,
        "--audit-checkpoint-interval", "0.2",
    )  # fmt: skip
    if db:
        argv += ["--db", db]
    if master_key_file is not None:
        argv += ["--master-key-file", master_key_file]
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    child = Child(name, argv, logs)
    try:
        url = child.wait_ready(SERVER_READY, time.monotonic() + READY_TIMEOUT).group(1)
    except TrustmeshError as exc:
        child.proc.kill()
        child.proc.wait()
        raise DrillError(exc.description) from None
    token = admin_token or (data_dir / "admin.token").read_text().strip()
    http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30.0)
    return Plane(child, url, http)


def _exchange(plane: Plane, cluster: SimulatedCluster) -> str:
    answer = httpx.post(
        plane.url + "/oauth2/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token": cluster.mint("shop", "payments"),
            "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
            "audience": f"spiffe://{TRUST_DOMAIN}/cluster/{TARGET}",
        },
        timeout=30.0,
    )
    if answer.status_code != 200:
        raise DrillError(f"the token exchange answered {answer.status_code}: {answer.text[:200]}")
    return str(answer.json()["access_token"])


def _allowed(agent_url: str, token: str) -> bool:
    try:
        answer = httpx.post(
            agent_url + "/v1/authorize", json={"token": token, "request": REQUEST}, timeout=10.0
        )
    except httpx.HTTPError:
        return False
    return answer.status_code == 200 and answer.json().get("allowed") is True


def _checkpoint(plane: Plane, at_least: int = 0) -> str:
    """The latest signed checkpoint, once it covers ``at_least`` entries."""
    deadline = time.monotonic() + 30.0
    while True:
        note = plane.call("GET", "/v1/audit/checkpoint").text
        size = int(note.splitlines()[1])
        if size >= at_least or time.monotonic() > deadline:
            return note
        time.sleep(0.1)


def _destroy(db: str | None, data_dir: Path) -> None:
    """The disaster: the database is gone (SQLite: its files; PostgreSQL: every table)."""
    url = make_url(engine_url(db, data_dir))
    if url.get_backend_name() == "sqlite":
        base = Path(url.database or "")
        for suffix in ("", "-wal", "-shm", "-journal"):
            base.with_name(base.name + suffix).unlink(missing_ok=True)
        return
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            schema.metadata.drop_all(conn)
            conn.execute(text("DROP TABLE IF EXISTS schema_migrations"))
    finally:
        engine.dispose()


def _lost_entries(data_dir: Path, db: str | None, backup_size: int) -> list[dict[str, Any]]:
    """Every entry the crashed database holds beyond the backup (read before it is
    destroyed: the drill's way of knowing the loss exactly)."""
    engine = offline.open_engine(data_dir, db)
    try:
        stored = offline.read_log(engine, data_dir)
        lost = []
        for index, leaf, _, columns in stored.entries:
            if index >= backup_size:
                lost.append({"index": index, "type": (columns or {}).get("type"), "leaf": leaf})
        return lost
    finally:
        engine.dispose()


@dataclass
class DrillReport:
    mode: str  # "local" | "beside-live"
    engine: str
    ok: bool
    guarantees: dict[str, dict[str, Any]]
    recovery_seconds: float
    lost: dict[str, Any]
    agent: dict[str, Any]
    consistency: dict[str, Any]
    restore: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "mode": self.mode,
            "engine": self.engine,
            "recovery_seconds": round(self.recovery_seconds, 3),
            "guarantees": self.guarantees,
            "lost": self.lost,
            "agent": self.agent,
            "consistency": self.consistency,
            "restore": self.restore,
        }


def _agent_summary(probes: list[Probe], outage: tuple[float, float]) -> dict[str, Any]:
    unanswered = [p for p in probes if p.status == 0]
    refused = [p for p in probes if p.status != 0 and not p.allowed]
    during = [p for p in probes if outage[0] <= p.at <= outage[1]]
    gaps = [b.at - a.at for a, b in itertools.pairwise(probes)]
    return {
        "probes": len(probes),
        "probes_during_outage": len(during),
        "unanswered": len(unanswered),
        "not_allowed": len(refused),
        "longest_gap_seconds": round(max(gaps, default=0.0), 3),
        "outage_seconds": round(outage[1] - outage[0], 3),
        "staleness_bound_seconds": STALENESS_BOUND,
    }


@contextmanager
def _root(data_dir: Path | None) -> Iterator[Path]:
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        yield data_dir
        return
    root = Path(tempfile.mkdtemp(prefix="trustmesh-drill-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _check_scratch(db: str) -> None:
    url = make_url(engine_url(db, Path()))
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                text("SELECT count(*) FROM information_schema.tables WHERE table_schema='public'")
            ).scalar()
    finally:
        engine.dispose()
    if tables:
        raise DrillError(
            f"{url.render_as_string(hide_password=True)} is not empty: the drill destroys its "
            "database, give it a scratch one"
        )


FILL_BATCH = 1000  # the most events one POST /v1/audit/events takes


def _fill_log(plane: Plane, entries: int) -> None:
    """Bring the log to ``entries`` entries before the drill (to see the recovery time of
    a log of that size): decisions shipped as an agent of the target cluster would, in
    batches, through the control plane's own ingest endpoint."""
    credential = plane.call(
        "POST", f"/v1/clusters/{TARGET}/credentials", json={"agent": "drill-filler"}
    ).json()["token"]
    spool, seq = uuid.uuid4().hex, 0
    spiffe_id = f"spiffe://{TRUST_DOMAIN}/cluster/{ORIGIN}/ns/shop/sa/payments"
    size = int(_checkpoint(plane).splitlines()[1])
    with httpx.Client(timeout=60.0, headers={"Authorization": f"Bearer {credential}"}) as http:
        while size < entries:
            batch = []
            for _ in range(min(FILL_BATCH, entries - size)):
                seq += 1
                batch.append(ev.new_event(
                    ev.AUTHZ_DECISION,
                    source={"kind": "agent", "id": spool, "agent": "drill-filler", "seq": seq},
                    cluster=TARGET, actor=spiffe_id,
                    identity={"spiffe_id": spiffe_id, "origin_cluster": ORIGIN},
                    request={"surface": "native", **REQUEST},
                    decision={"allowed": True, "reason": "drill filler", "policy_revision": 1},
                ))  # fmt: skip
            answer = http.post(plane.url + "/v1/audit/events", json={"events": batch})
            if answer.status_code != 200:
                raise DrillError(f"filling the log: {answer.status_code} {answer.text[:200]}")
            size = int(answer.json()["tree_size"])


def run_drill(
    db: str | None = None, data_dir: Path | None = None, log_entries: int = 0
) -> DrillReport:
    """Run the drill (see the module doc) and return its report. ``log_entries``: fill
    the log to that many entries first."""
    if db:
        _check_scratch(db)
    with _root(data_dir) as root, ExitStack() as stack:
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        origin = stack.enter_context(
            SimulatedCluster(ORIGIN, data_dir=root / "clusters" / ORIGIN).serve()
        )
        target = stack.enter_context(
            SimulatedCluster(TARGET, data_dir=root / "clusters" / TARGET).serve()
        )
        cp_dir = root / "control-plane"
        plane = _start_plane(cp_dir, db, "127.0.0.1:0", logs, "control-plane", None)
        planes = [plane]

        def stop_planes() -> None:
            for p in planes:
                assert p.child is not None
                if p.child.proc.poll() is None:
                    p.child.proc.send_signal(signal.SIGTERM)
                p.child.wait_stopped()
                p.http.close()

        stack.callback(stop_planes)
        admin_token = (cp_dir / "admin.token").read_text().strip()
        plane.call(
            "POST",
            "/v1/apply",
            json={
                "files": [
                    {"path": "drill.yaml", "content": _manifests(origin.issuer, target.issuer)}
                ]
            },
        )
        credential = plane.call("POST", f"/v1/clusters/{TARGET}/credentials").json()["token"]
        token_file = write_credential(root / "agent.token", str(credential))
        agent_child = Child(
            "agent",
            [*agent_argv(TARGET, plane.url, root / "agent", token_file),
             "--staleness-bound", str(STALENESS_BOUND)],
            logs,
        )  # fmt: skip

        def stop_agent() -> None:
            agent_child.terminate()
            agent_child.wait_stopped()

        stack.callback(stop_agent)
        try:
            agent_url = agent_child.wait_ready(AGENT_READY, time.monotonic() + READY_TIMEOUT)
        except TrustmeshError as exc:
            raise DrillError(exc.description) from None
        agent = agent_url.group(2)

        if log_entries:
            _fill_log(plane, log_entries)
        # Before the drill: a token the agent allows, and the checkpoint published.
        before_token = _exchange(plane, origin)
        if not _allowed(agent, before_token):
            raise DrillError("the agent did not allow the drill's token before the drill")
        prober = Prober(agent, before_token)
        prober.start()
        stack.callback(prober.stop)
        published_before = _checkpoint(plane)
        old_key = plane.call("GET", "/v1/audit/key").text.strip()

        # The backup, then traffic it will miss.
        backup_path = root / "drill.tmbk"
        summary = write_backup(cp_dir, db, backup_path)
        for _ in range(TRAFFIC_AFTER_BACKUP):
            _exchange(plane, origin)
        change = plane.call(
            "POST",
            "/v1/apply",
            json={"files": [{"path": "late.yaml", "content": _late_workload()}]},
        ).json()
        published_last = _checkpoint(plane, summary.audit_size + TRAFFIC_AFTER_BACKUP + 1)
        (root / "published.txt").write_text(published_last)
        revisions_lost = {
            "registry_revision": change.get("registryRevision"),
            "policy_revision": change.get("policyRevision"),
        }

        # The disaster: the control plane dies, its database is destroyed.
        assert plane.child is not None
        plane.child.proc.send_signal(signal.SIGKILL)
        plane.child.proc.wait()
        outage_start = time.time()
        lost = _lost_entries(cp_dir, db, summary.audit_size)
        destroyed = time.monotonic()
        _destroy(db, cp_dir)

        # Recovery: restore (accepting what the backup misses), restart on the address.
        restored = restore(
            backup_path,
            cp_dir,
            db,
            None,
            published_checkpoint=published_last,
            accept_loss=True,
        )
        listen = plane.url.split("//", 1)[1]
        new = _start_plane(cp_dir, db, listen, logs, "control-plane-restored", admin_token)
        planes.append(new)
        recovery = time.monotonic() - destroyed

        # After: the tokens, the agent, the log.
        after_token = _exchange(new, origin)
        deadline = time.monotonic() + 30.0
        while not (_allowed(agent, after_token) and _allowed(agent, before_token)):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        before_ok, after_ok = _allowed(agent, before_token), _allowed(agent, after_token)
        outage_end = time.time()
        time.sleep(2 * PROBE_INTERVAL)
        prober.stop()
        consistency = _prove(new, published_before, old_key, restored.verifier_key)

    agent_facts = _agent_summary(prober.probes, (outage_start, outage_end))
    lost_types = Counter(str(e["type"]) for e in lost)
    lost_facts = {
        "backup_entries": summary.audit_size,
        "entries": len(lost),
        "first_index": lost[0]["index"] if lost else None,
        "last_index": lost[-1]["index"] if lost else None,
        "by_type": dict(sorted(lost_types.items())),
        "published_entries_lost": (restored.published.lost if restored.published else 0),
        "changes": revisions_lost,
        "new_log_origin": restored.new_origin,
    }
    kept_deciding = (
        agent_facts["unanswered"] == 0
        and agent_facts["not_allowed"] == 0
        and agent_facts["outage_seconds"] < STALENESS_BOUND
    )
    guarantees = {
        "restore_verified": {
            "ok": restored.checkpoints_verified > 0,
            "detail": f"{restored.audit_size} entries; {restored.checkpoints_verified} "
            "checkpoint(s) verified",
        },
        "tokens_still_verify": {
            "ok": before_ok and after_ok,
            "detail": f"pre-drill token {'allowed' if before_ok else 'NOT allowed'}, new token "
            f"{'allowed' if after_ok else 'NOT allowed'} at the agent",
        },
        "agents_kept_deciding": {
            "ok": kept_deciding,
            "detail": f"{agent_facts['probes']} probes, {agent_facts['unanswered']} unanswered, "
            f"{agent_facts['not_allowed']} not allowed; outage "
            f"{agent_facts['outage_seconds']} s of a {STALENESS_BOUND:.0f} s bound",
        },
        "log_extends_published": {
            "ok": consistency["ok"],
            "detail": consistency["detail"],
        },
    }
    return DrillReport(
        mode="local",
        engine="postgresql" if db else "sqlite",
        ok=all(g["ok"] for g in guarantees.values()),
        guarantees=guarantees,
        recovery_seconds=recovery,
        lost=lost_facts,
        agent=agent_facts,
        consistency=consistency,
        restore=restored.to_json(),
    )


def _prove(plane: Plane, published_before: str, old_key: str, new_key: str) -> dict[str, Any]:
    """A consistency proof from the restored control plane that its log (under its new
    origin) extends the checkpoint published before the drill, verified here."""
    result: dict[str, Any] = {"ok": False}
    try:
        first = verify_checkpoint(published_before, old_key)
        if first.size == 0:
            return {"ok": True, "detail": "the checkpoint published before the drill is of "
                    "the empty log, which every log extends", "notes": [published_before],
                    "keys": [old_key, new_key]}  # fmt: skip
        note = _checkpoint(plane)
        served_key = plane.call("GET", "/v1/audit/key").text.strip()
        if served_key != new_key:
            result["detail"] = "the restored server serves another log key than the restore made"
            return result
        second = verify_checkpoint(note, new_key)
        proof = plane.call(
            "GET",
            "/v1/audit/proof/consistency",
            params={"first": first.size, "second": second.size},
        ).json()
        hashes = [base64.b64decode(h) for h in proof["hashes"]]
        verify_consistency(first.size, second.size, first.root_hash, second.root_hash, hashes)
    except (ProofError, TrustmeshError, ValueError, KeyError) as exc:
        result["detail"] = f"no proof: {exc}"
        return result
    return {**_proved(first, second, hashes), "notes": [published_before, note],
            "keys": [old_key, new_key]}  # fmt: skip


def _proved(first: Checkpoint, second: Checkpoint, hashes: list[bytes]) -> dict[str, Any]:
    return {
        "ok": True,
        "detail": f"{second.origin} at {second.size} extends {first.origin} at {first.size} "
        f"({len(hashes)} hashes, verified)",
        "first": {"origin": first.origin, "size": first.size,
                  "root_hash": base64.b64encode(first.root_hash).decode()},
        "second": {"origin": second.origin, "size": second.size,
                   "root_hash": base64.b64encode(second.root_hash).decode()},
        "proof": [base64.b64encode(h).decode() for h in hashes],
    }  # fmt: skip


# -- beside a live control plane (--server) ------------------------------------------------
def _served_kids(http: httpx.Client, url: str) -> set[str]:
    try:
        discovery = http.get(url + "/.well-known/openid-configuration").json()
        keys = http.get(discovery["jwks_uri"]).json()["keys"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise DrillError(f"cannot read the JWKS of {url}: {exc}") from None
    return {str(k.get("kid")) for k in keys if isinstance(k, dict)}


def run_live_drill(
    server: str,
    admin_token: str,
    live_data_dir: Path | None,
    live_db: str | None,
    master_key_file: Path | None,
    db: str | None = None,
    data_dir: Path | None = None,
) -> DrillReport:
    """``--server``: back up a live control plane (one read transaction on its database,
    which is never written), restore into a scratch instance beside it (SQLite in the
    drill's data dir, or the scratch ``db``) under a log origin of its own, start it on
    a free loopback port, and check it against the live one. The live agents are left
    alone, so that guarantee is not exercised."""
    if db:
        _check_scratch(db)
    if live_data_dir is None and live_db is None:
        raise DrillError("--server needs the live database: --live-data-dir and/or --live-db")
    key_file = master_key_file or (live_data_dir / "master.key" if live_data_dir else None)
    if key_file is None:
        raise DrillError("pass --master-key-file: the live control plane's master key")
    headers = {"Authorization": f"Bearer {admin_token}"}
    live = Plane(None, server.rstrip("/"), httpx.Client(headers=headers, timeout=30.0))
    with _root(data_dir) as root, ExitStack() as stack:
        stack.callback(live.http.close)
        logs = root / "logs"
        logs.mkdir(exist_ok=True)
        published_before = _checkpoint(live)
        old_key = live.call("GET", "/v1/audit/key").text.strip()
        live_kids = _served_kids(live.http, live.url)
        backup_path = root / "drill.tmbk"
        summary = write_backup(live_data_dir, live_db, backup_path)
        published_last = _checkpoint(live)
        last = verify_checkpoint(published_last, old_key)
        started = time.monotonic()
        scratch_dir = root / "scratch"
        restored = restore(
            backup_path,
            scratch_dir,
            db,
            key_file,
            published_checkpoint=published_last,
            scratch=True,
        )
        scratch = _start_plane(
            scratch_dir,
            db,
            "127.0.0.1:0",
            logs,
            "scratch",
            admin_token,
            restored.trust_domain,
            key_file,
        )

        def stop_scratch() -> None:
            assert scratch.child is not None
            scratch.child.terminate()
            scratch.child.wait_stopped()
            scratch.http.close()

        stack.callback(stop_scratch)
        recovery = time.monotonic() - started
        missing_kids = live_kids - _served_kids(scratch.http, scratch.url)
        consistency = _prove(scratch, published_before, old_key, restored.verifier_key)
        lost_entries: list[dict[str, Any]] = []
        start = summary.audit_size
        while start < last.size:
            page = live.call(
                "GET", "/v1/audit/entries", params={"start": start, "end": last.size}
            ).json()["entries"]
            if not page:
                break
            lost_entries.extend({"index": e["index"], "type": e["event"].get("type")} for e in page)
            start = int(page[-1]["index"]) + 1
    lost_types = Counter(str(e["type"]) for e in lost_entries)
    guarantees: dict[str, dict[str, Any]] = {
        "restore_verified": {
            "ok": restored.checkpoints_verified > 0,
            "detail": f"{restored.audit_size} entries; {restored.checkpoints_verified} "
            "checkpoint(s) verified",
        },
        "tokens_still_verify": {
            "ok": not missing_kids,
            "detail": "every signing key the live control plane publishes is served by the "
            "restored instance"
            if not missing_kids
            else f"keys missing from the restored instance: {', '.join(sorted(missing_kids))}",
        },
        "agents_kept_deciding": {
            "ok": None,
            "detail": "not exercised: --server leaves the live agents alone",
        },
        "log_extends_published": {"ok": consistency["ok"], "detail": consistency["detail"]},
    }
    return DrillReport(
        mode="beside-live",
        engine="postgresql" if db else "sqlite",
        ok=all(g["ok"] is not False for g in guarantees.values()),
        guarantees=guarantees,
        recovery_seconds=recovery,
        lost={
            "backup_entries": summary.audit_size,
            "entries": len(lost_entries),
            "first_index": lost_entries[0]["index"] if lost_entries else None,
            "last_index": lost_entries[-1]["index"] if lost_entries else None,
            "by_type": dict(sorted(lost_types.items())),
            "published_entries_lost": restored.published.lost if restored.published else 0,
            "changes": {},
            "new_log_origin": restored.new_origin,
        },
        agent={},
        consistency=consistency,
        restore=restored.to_json(),
    )
