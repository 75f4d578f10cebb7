"""What the CLI prints is inert (issue 10, finding 7): strings an attacker chose -- the
``iss`` of a refused token, a request path and reason an agent reported, an agent's
name, a policy message, a revoked value -- reach a real control plane, and every
command that shows them prints them as text: no markup is interpreted (a ``[/x]`` does
not crash a table), no terminal escape, C1 control, DEL or bidi override is written
raw, no newline inside a value starts a line of its own. ``-o json`` escapes them."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from helpers import Server, cluster_yaml, start_server, trustmesh_cmd, unique
from trustmesh.audit import events as ev
from trustmesh.common.terminal import printable, printable_lines

# Clear the screen, set the window title, a Rich closing tag with no opening one, a CSI
# in its C1 form, DEL, a right-to-left override and an isolate, a zero-width space, and a
# newline followed by a line that pretends to be output.
HOSTILE = (
    "\x1b[2J\x1b]0;owned\x07[/x][bold red]FAKE[/]\x9b31m\x7f"
    "\u202eevil\u2066\u200b\nerror: forged line"
)


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        trustmesh_cmd(*args),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRUSTMESH_CONFIG": "/nonexistent", "COLUMNS": "1000", **env},
    )


def assert_inert(output: str) -> None:
    """Nothing in ``output`` acts on a terminal: every line holds printable characters
    only, and no value broke out of its line."""
    for line in output.split("\n"):
        bad = [ch for ch in line if not ch.isprintable()]
        assert not bad, f"raw {bad!r} in {line!r}"
        assert not line.startswith("error: forged"), output


def b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A control plane whose log, policy history and revocation list hold HOSTILE."""
    server: Server = start_server(tmp_path_factory.mktemp("hostile") / "data")
    target = unique("target-")
    server.apply(cluster_yaml(target, f"http://127.0.0.1:9/{target}"))

    # An unauthenticated caller: a refused exchange whose token names a hostile issuer.
    token = ".".join(
        [b64({"alg": "RS256", "kid": HOSTILE}), b64({"iss": "https://x" + HOSTILE}), "sig"]
    )
    refused = server.exchange(token, f"spiffe://corp.example/cluster/{target}")
    assert refused.status_code == 400, refused.text

    # A hostile agent of the cluster: decisions about a hostile request, by a hostile name.
    trace = secrets.token_hex(16)
    spool = uuid.uuid4().hex
    event = ev.new_event(
        ev.AUTHZ_DECISION,
        source={"kind": "agent", "id": spool, "agent": "agent" + HOSTILE, "seq": 1},
        cluster=target,
        actor="spiffe://corp.example/x" + HOSTILE,
        identity={"spiffe_id": "spiffe://corp.example/x" + HOSTILE},
        request={"surface": "envoy", "method": "GET", "host": "api.test", "path": "/" + HOSTILE},
        decision={"allowed": False, "reason": "no binding" + HOSTILE, "policy_revision": 1},
        trace_id=trace,
        span_id=secrets.token_hex(8),
    )
    shipped = httpx.post(
        server.url + "/v1/audit/events",
        json={"events": [event]},
        headers={"Authorization": f"Bearer {server.credential(target)}"},
        timeout=10,
    )
    assert shipped.status_code == 200, shipped.text

    # An admin's free text: a policy message and a revocation reason.
    role, binding = unique("role-"), unique("bind-")
    policy = f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {role}}}
spec:
  rules:
  - {{services: [{unique("svc-")}.test], paths: [/api/**], methods: [GET]}}
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {{name: {binding}}}
spec:
  role: {role}
  subjects: [{{spiffeId: "spiffe://corp.example/x"}}]
"""
    applied = server.admin.post(
        "/v1/apply",
        json={"files": [{"path": "p.yaml", "content": policy}], "message": HOSTILE},
    )
    assert applied.status_code == 200, applied.text
    revoked = server.admin.post(
        "/v1/revocations", json={"kind": "jti", "value": unique("jti-"), "reason": HOSTILE}
    )
    assert revoked.status_code == 201, revoked.text

    env = {"TRUSTMESH_SERVER": server.url, "TRUSTMESH_TOKEN": server.admin_token}
    yield {"env": env, "target": target, "trace": trace, "spool": spool}
    assert server.stop() == 0


@pytest.mark.parametrize(
    "args",
    [
        ["audit", "query", "--type", "token.exchange_failed"],
        ["audit", "query", "--type", "authz.decision"],
        ["audit", "trace", "{trace}"],
        ["policy", "history"],
        ["policy", "show", "current"],
        ["get", "revocations"],
    ],
    ids=lambda args: "-".join(args[:2]),
)
def test_hostile_strings_are_shown_not_obeyed(
    hostile_server: dict[str, Any], args: list[str]
) -> None:
    args = [a.format(**hostile_server) for a in args]
    result = run(*args, env=hostile_server["env"])
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert_inert(result.stdout)
    # What was there is still readable: the markup literally, the escapes visibly.
    assert "[/x][bold red]FAKE[/]" in result.stdout
    assert "\\x1b[2J" in result.stdout
    assert "\\u202e" in result.stdout


def test_audit_sources_show_the_credentials_agent_not_a_claimed_name(
    hostile_server: dict[str, Any],
) -> None:
    """The hostile agent name the event claimed never reaches the log: a source is
    bound to the credential that shipped it (issue 10, finding 1), agent included."""
    result = run("audit", "sources", env=hostile_server["env"])
    assert result.returncode == 0, result.stderr
    assert_inert(result.stdout)
    assert hostile_server["spool"] in result.stdout and "FAKE" not in result.stdout


def test_json_output_escapes_control_characters(hostile_server: dict[str, Any]) -> None:
    result = run("audit", "query", "-o", "json", env=hostile_server["env"])
    assert result.returncode == 0, result.stderr
    assert_inert(result.stdout)
    entries = json.loads(result.stdout)["entries"]
    paths = [e["event"].get("request", {}).get("path") for e in entries]
    assert "/" + HOSTILE in paths  # the exact value, for scripts


def test_error_lines_are_inert(hostile_server: dict[str, Any], tmp_path: Path) -> None:
    """The server's error description names what the caller sent (here a file name, as
    the manifest problem's place): one inert line."""
    bad = tmp_path / ("bad\x1b[2J[red]\u202e\n.yaml")
    bad.write_text(cluster_yaml(unique("x-"), "http://127.0.0.1:9/x") + "  audiance: x\n")
    failed = run("apply", "-f", str(bad), env=hostile_server["env"])
    assert failed.returncode == 1
    assert_inert(failed.stderr)
    last = failed.stderr.strip().split("\n")[-1]
    assert last.startswith("error: ") and "spec.audiance" in last
    assert "bad\\x1b[2J[red]\\u202e\\n.yaml:7" in last


def test_printable_escapes_what_is_not_printable() -> None:
    assert printable("plain text, ünïcödé, 日本") == "plain text, ünïcödé, 日本"
    assert printable("\x1b[2J") == "\\x1b[2J"
    assert printable("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert printable("\x9b\x7f\x00") == "\\x9b\\x7f\\x00"
    assert printable("\u202e\u2066\u200b\u2028\ufeff") == "\\u202e\\u2066\\u200b\\u2028\\ufeff"
    assert printable("\U000e0041") == "\\U000e0041"  # a tag character
    assert printable("\ud800") == "\\ud800"  # a lone surrogate cannot even be encoded
    assert printable(None) == "" and printable(42) == "42"
    assert printable_lines("a\x1b\nb\n") == "a\\x1b\nb\n"
