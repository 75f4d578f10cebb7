"""How soon a new agent is ready (issue 10, finding 9): an agent started against a
running control plane announces readiness within a couple of seconds, also on a host
that booted a moment ago.

The cause of the delay: the revocation sync decided "time for a full read" by
comparing ``time.monotonic()`` with a start value of 0. On a host up for less than the
full-resync interval (600 s) the first round was therefore a long poll from revision
0, which a control plane with no revocations answers only after its whole wait (25 s),
and readiness waits for the first revocation sync. The agent here runs in a Linux time
namespace whose monotonic clock reads a few seconds, as on a freshly booted host."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import cluster_yaml, start_agent, start_server, unique

UPTIME = 5  # seconds the agent's host appears to be up


def freshly_booted() -> tuple[str, ...]:
    """A command prefix that runs its command with CLOCK_MONOTONIC near ``UPTIME``
    (``unshare --time``; without root, in a user namespace of its own)."""
    offset = UPTIME - int(time.monotonic())
    prefix: tuple[str, ...] = ("unshare", "--time", f"--monotonic={offset}")
    if os.geteuid() != 0:
        prefix = ("unshare", "--user", "--map-root-user", "--time", f"--monotonic={offset}")
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import time; print(time.monotonic())"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, f"cannot make a time namespace: {probe.stderr.strip()}"
    assert float(probe.stdout) < UPTIME + 60, probe.stdout
    return prefix


def test_an_agent_on_a_freshly_booted_host_is_ready_within_seconds(tmp_path: Path) -> None:
    server = start_server(tmp_path / "server")
    try:
        cluster = unique("fresh-")
        server.apply(cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}"))
        credential = server.credential(cluster)
        prefix = freshly_booted()
        began = time.monotonic()
        agent = start_agent(cluster, [server.url], tmp_path / "agent", credential, prefix=prefix)
        ready_after = time.monotonic() - began
        try:
            assert "synced with the control plane" in agent.ready_line, agent.ready_line
            assert ready_after < 5.0, f"ready after {ready_after:.1f} s"
        finally:
            assert agent.stop() == 0, agent.process.stderr()
    finally:
        assert server.stop() == 0, server.process.stderr()
