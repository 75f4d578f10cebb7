"""``trustmesh demo``: real subprocesses, real HTTP, real signals, nothing left behind."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from trustmesh.sim.demo import CLUSTERS, WORKLOADS, DemoError, manifest, run_demo, swap_payload

DEMO = [sys.executable, "-m", "trustmesh.cli.main", "demo"]


def processes_mentioning(marker: str) -> list[str]:
    """Command lines of live processes (other than this one) that mention ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if marker in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def kill_leftovers(marker: str) -> None:
    for line in processes_mentioning(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(int(line.split(":", 1)[0]), signal.SIGKILL)


def check_traffic(output: str) -> None:
    for wl in WORKLOADS:
        spiffe_id = re.escape(wl.spiffe_id)
        others = [c.name for c in CLUSTERS if c.name != wl.cluster]
        for target in others:
            line = rf"{wl.name}@{wl.cluster} -> {target}: authenticated as {spiffe_id} "
            assert re.search(line, output), f"no authenticated call {wl.name} -> {target}"
    assert re.search(r"intruder: forged SA token .* refused at exchange: 400 invalid_grant", output)
    assert re.search(r"intruder: JWT-SVID .* refused by agent \S+: 401 invalid_token", output)


def test_demo_runs_rotates_and_leaves_nothing_behind() -> None:
    proc = subprocess.run(
        [*DEMO, "--duration", "8", "--plain"], capture_output=True, text=True, timeout=90
    )
    output = proc.stdout
    match = re.search(r"^data dir: (\S+) \(removed at the end\)$", output, re.M)
    assert match, output
    data_dir = match.group(1)
    try:
        assert proc.returncode == 0, output + proc.stderr
        check_traffic(output)
        assert "signing key rotated: kid" in output
        assert "first call verified with the new key" in output
        assert re.search(
            r"since then \d+ calls verified with the retired key, [1-9]\d* with", output
        )
        assert "OK: every legitimate call was authenticated" in output
        assert "PROBLEMS" not in output
        assert not Path(data_dir).exists(), "the temporary data dir must be removed"
        assert processes_mentioning(data_dir) == []
    finally:
        kill_leftovers(data_dir)


def read_lines(proc: subprocess.Popen[str], lines: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line)


def test_sigint_stops_everything_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    proc = subprocess.Popen(
        [*DEMO, "--duration", "120", "--plain", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=read_lines, args=(proc, lines), daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 45
        while not any("authenticated as" in line for line in seen):
            assert time.monotonic() < deadline, "no traffic within 45 s:\n" + "".join(seen)
            assert proc.poll() is None, "demo exited early:\n" + "".join(seen)
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
        assert sum("agent for" in line and "ready on" in line for line in seen) == 3
        assert processes_mentioning(str(data_dir)), "the agents and server should be running"
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        time.sleep(0.2)  # let the reader thread drain the pipe
        while not lines.empty():
            seen.append(lines.get())
        output = "".join(seen)
        stderr = proc.stderr.read() if proc.stderr else ""
        assert code == 0, output + stderr
        assert "interrupted: stopping agents, control plane and simulated clusters" in output
        assert "OK: every legitimate call was authenticated" in output
        assert processes_mentioning(str(data_dir)) == []
        assert (data_dir / "control-plane" / "admin.token").exists(), "a given data dir is kept"
        assert oct((data_dir / "agents" / "eu-west.token").stat().st_mode & 0o777) == "0o600"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_leftovers(str(data_dir))


def test_startup_failure_is_one_clear_error_and_stops_everything(tmp_path: Path) -> None:
    data_dir = tmp_path / "broken"
    data_dir.mkdir()
    (data_dir / "control-plane").write_text("not a directory")  # the server cannot start
    with pytest.raises(DemoError, match="control-plane exited with code") as info:
        run_demo(duration=1, data_dir=data_dir, plain=True)
    assert "\n" not in str(info.value)
    assert processes_mentioning(str(data_dir)) == []


def test_manifest_registers_issuers_only_and_two_workloads_per_cluster() -> None:
    issuers = {c.name: f"http://127.0.0.1:{9000 + i}" for i, c in enumerate(CLUSTERS)}
    documents = list(yaml.safe_load_all(manifest(issuers)))
    clusters = [d for d in documents if d["kind"] == "Cluster"]
    assert {d["metadata"]["name"] for d in clusters} == {"eu-west", "us-east", "ap-south"}
    for doc in clusters:
        assert set(doc["spec"]) == {"issuer", "labels"}  # keys by OIDC discovery
        assert doc["spec"]["issuer"] == issuers[doc["metadata"]["name"]]
        assert set(doc["spec"]["labels"]) == {"region", "environment"}
    workloads = [d for d in documents if d["kind"] == "Workload"]
    for cluster in issuers:
        assert sum(d["spec"]["selector"]["cluster"] == cluster for d in workloads) == 2
    assert all(set(d["spec"]["claims"]) == {"project", "environment", "tier"} for d in workloads)


def test_swap_payload_keeps_header_and_signature() -> None:
    def part(data: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    token = f"{part({'alg': 'ES256'})}.{part({'sub': 'spiffe://x/reports'})}.c2ln"
    forged = swap_payload(token, WORKLOADS[0])
    header, payload, signature = forged.split(".")
    assert header == token.split(".")[0] and signature == "c2ln"
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["sub"] == WORKLOADS[0].spiffe_id
