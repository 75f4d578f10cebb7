"""``trustmesh bench console`` runs small (the figures come from a quiet machine): a real
control plane over a log filled by ``bench report``'s filler, Debian's chromium through
Playwright; the pages rendered what was asked, and every figure is there and positive.
Without Playwright or chromium, or with a filter that matches nothing, one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import check_bench_shape
from trustmesh.bench import console

TIMED = ("overview", "audit", "filter")


def test_console_bench_small() -> None:
    # as a user runs it: its own process (Playwright's sync API owns its thread's event
    # loop, and the console tests' browser may be running in this one)
    done = _cli(
        "--clusters", "3", "--workloads", "20", "--entries", "2000", "--trials", "2",
        "--api-trials", "2", "--filter-type", "authz.decision", "-o", "json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    check_bench_shape(result)
    rendered = result["rendered"]
    assert rendered["overview_rows"] == rendered["api_clusters"] == 3
    assert rendered["overview_workloads"] == rendered["api_workloads"] == 20
    assert rendered["api_agents_reporting"] == 3
    assert rendered["audit_rows"] == rendered["api_audit_rows"] == console.PAGE
    assert rendered["filter_rows"] == rendered["api_filter_rows"] == console.PAGE
    assert result["page_errors"] == []
    for name in TIMED:
        for figures in (
            result["page"][name],
            result["page"][f"{name}_frame"],
            result["page"][f"{name}_api_in_page"],
            result["server"][name],
        ):
            assert figures["n"] == 2 and len(figures["all_ms"]) == 2
            assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["max_ms"]
        assert isinstance(result["goals"][f"{name}_met"], bool)
    # the frame that paints a page comes after the DOM held it
    assert result["page"]["overview_frame"]["p50_ms"] >= result["page"]["overview"]["p50_ms"]
    assert len(result["results"]) == 9 and all(r["p50_us"] > 0 for r in result["results"])
    assert result["fill_seconds"] > 0 and result["setup_seconds"] > 0


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh.cli.main", "bench", "console", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_without_playwright_one_line(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "playwright.py").write_text(
        "raise ImportError(\"No module named 'playwright'\", name='playwright')\n"
    )
    paths = [str(shim), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    done = _cli(env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)})
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == (
        "error: trustmesh bench console drives a real browser with Playwright: "
        "pip install 'trustmesh[bench]'"
    )
    assert done.stdout == ""


def test_without_chromium_one_line(tmp_path: Path) -> None:
    done = _cli("--chromium", str(tmp_path / "no-chromium"))
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == f"error: {console.CHROMIUM_MISSING}"
    assert done.stdout == ""


def test_a_filter_matching_nothing_is_one_line() -> None:
    done = _cli("--clusters", "1", "--workloads", "1", "--entries", "100", "--trials", "1")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().startswith(
        "error: --filter-type 'access.approved' matches no entry of the log"
    )
    assert "Traceback" not in done.stderr and done.stdout == ""
