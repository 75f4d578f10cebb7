"""``trustmesh drill`` (DESIGN §10) on SQLite and on a real PostgreSQL: the drill starts
its own federation (control plane, simulated clusters, an agent: real processes),
crashes the control plane, destroys and restores its database, and its JSON report is
checked here independently: the consistency proof is re-verified against the signed
checkpoints it names, and the loss it reports matches the traffic it made."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from helpers import (
    database_for,
    issuing,
    new_postgres_database,
    register_federation,
    start_server,
    trustmesh_cmd,
)
from trustmesh.audit.checkpoint import verify_checkpoint
from trustmesh.audit.proof import verify_consistency
from trustmesh.sim import SimulatedCluster
from trustmesh.sim.drill import TRAFFIC_AFTER_BACKUP


def drill(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd("drill", *args), capture_output=True, text=True, timeout=300, check=False
    )


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
def test_the_drill_passes_and_says_what_it_proved(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    args = ["--data-dir", str(tmp_path / "drill"), "--log-entries", "1500", "-o", "json"]
    if engine == "postgresql":
        args += ["--db", new_postgres_database(request.getfixturevalue("postgres_base_url"))]
    result = drill(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["engine"] == engine
    assert all(g["ok"] for g in report["guarantees"].values()), report["guarantees"]
    assert report["recovery_seconds"] > 0

    # what was lost: every exchange and the change made after the backup, exactly
    lost = report["lost"]
    assert lost["by_type"]["token.issued"] == TRAFFIC_AFTER_BACKUP
    assert lost["by_type"]["admin.apply"] == 1
    assert sum(lost["by_type"].values()) == lost["entries"]
    assert lost["first_index"] == lost["backup_entries"]
    # The log filled, then the pre-drill token; the agent's decisions on that token (its
    # check and the prober's) are shipped on the agent's own schedule, before the backup
    # on a busy machine or after it: they are in the backup or counted as lost, never both.
    assert lost["backup_entries"] >= 1500 + 1
    assert set(lost["by_type"]) <= {"token.issued", "admin.apply", "authz.decision"}, lost
    backed_up = lost["backup_entries"]
    assert report["restore"]["audit_size"] == backed_up + 1  # and the new origin's first entry
    assert lost["last_index"] == lost["backup_entries"] + lost["entries"] - 1
    assert lost["changes"]["registry_revision"] is not None
    assert lost["new_log_origin"] == report["restore"]["new_origin"] is not None

    # the agent answered throughout, the outage included
    agent = report["agent"]
    assert agent["probes_during_outage"] > 0
    assert agent["unanswered"] == 0 and agent["not_allowed"] == 0

    # the proof, checked again from the signed notes and the keys
    proof = report["consistency"]
    before_note, after_note = proof["notes"]
    old_key, new_key = proof["keys"]
    assert old_key != new_key
    first = verify_checkpoint(before_note, old_key)
    second = verify_checkpoint(after_note, new_key)
    assert second.origin == lost["new_log_origin"] and first.size <= lost["backup_entries"]
    verify_consistency(
        first.size,
        second.size,
        first.root_hash,
        second.root_hash,
        [base64.b64decode(h) for h in proof["proof"]],
    )
    # --data-dir keeps the drill's files: its backup among them
    assert (tmp_path / "drill" / "drill.tmbk").exists()


def test_the_drill_refuses_a_database_that_is_not_scratch(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db = new_postgres_database(request.getfixturevalue("postgres_base_url"))
    first = drill("--db", db, "--data-dir", str(tmp_path / "one"), "-o", "json")
    assert first.returncode == 0, first.stdout + first.stderr
    again = drill("--db", db, "--data-dir", str(tmp_path / "two"))
    assert again.returncode == 1
    assert again.stderr.strip().startswith("error: ") and "not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("live_engine", "scratch_engine"), [("postgresql", "sqlite"), ("sqlite", "postgresql")]
)
def test_beside_a_live_control_plane_the_drill_never_touches_it(
    live_engine: str,
    scratch_engine: str,
    tmp_path: Path,
    sim_cluster: SimulatedCluster,
    request: pytest.FixtureRequest,
) -> None:
    live = start_server(tmp_path / "live", database_for(live_engine, request))
    try:
        fed = register_federation(live, sim_cluster)
        for _ in range(3):
            fed.svid()
        key_before = live.admin.get("/v1/audit/key").text
        with issuing(fed):  # the live control plane keeps working through the drill
            args = ["--server", live.url, "--live-data-dir", str(live.data_dir),
                    "--token-file", str(live.data_dir / "admin.token"),
                    "--data-dir", str(tmp_path / "drill"), "-o", "json"]  # fmt: skip
            if live.db:
                args += ["--live-db", live.db]
            scratch_db = database_for(scratch_engine, request)
            if scratch_db:
                args += ["--db", scratch_db]
            result = drill(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        report = json.loads(result.stdout)
        assert report["ok"] is True and report["mode"] == "beside-live"
        assert report["engine"] == scratch_engine
        guarantees = report["guarantees"]
        assert guarantees["restore_verified"]["ok"] and guarantees["tokens_still_verify"]["ok"]
        assert guarantees["log_extends_published"]["ok"]
        assert guarantees["agents_kept_deciding"]["ok"] is None  # not exercised, and says so
        # the scratch copy signs under an origin and key of its own; the live log is intact
        old_key, new_key = report["consistency"]["keys"]
        assert old_key == key_before.strip() != new_key
        assert live.admin.get("/v1/audit/key").text == key_before
        fed.svid()
        verify = ["audit", "verify", "--data-dir", str(live.data_dir), "-o", "json"]
        if live.db:
            verify += ["--db", live.db]
        checked = subprocess.run(
            trustmesh_cmd(*verify), capture_output=True, text=True, check=False
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert json.loads(checked.stdout)["origin"] == key_before.split("+")[0]
    finally:
        assert live.stop() == 0
