"""Per-agent revocation lag (issue 16, the overview's "revocation lag"): a real agent
reports the revocation revision it holds with each long poll (``held``); stopped while
a revocation is published, it shows behind -- by how many and since when -- in
``GET /v1/overview`` and on the open overview page, and restarted, it catches up and
the page follows without a reload. Over HTTP: ``held`` refused when it is no revision
of this control plane's, and an agent that never says (an older agent) is "unknown",
never up to date."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from console_support import Console
from playwright.sync_api import Page, expect

from helpers import Server, cluster_yaml, eventually, start_agent, unique


def _agents(server: Server, cluster: str) -> list[dict[str, Any]]:
    answer = server.admin.get("/v1/overview")
    assert answer.status_code == 200, answer.text
    (found,) = [c for c in answer.json()["clusters"] if c["name"] == cluster]
    agents: list[dict[str, Any]] = found["agents"]
    return agents


def _cluster(server: Server, cluster: str) -> dict[str, Any]:
    (found,) = [
        c for c in server.admin.get("/v1/overview").json()["clusters"] if c["name"] == cluster
    ]
    return dict(found)


def _revocation_revision(server: Server) -> int:
    return int(server.admin.get("/v1/overview").json()["revocations"]["revision"])


def _revoke(server: Server) -> dict[str, Any]:
    answer = server.admin.post(
        "/v1/revocations", json={"kind": "jti", "value": unique("lag-"), "reason": "test"}
    )
    assert answer.status_code == 201, answer.text
    entry: dict[str, Any] = answer.json()["revocation"]
    return entry


@pytest.mark.slow
def test_a_stopped_agent_falls_behind_on_revocations_and_catches_up_live(
    console: Console, page: Page, tmp_path: Path
) -> None:
    server = console.server
    cluster = unique("revlag-")
    server.apply(cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}"))
    credential = server.credential(cluster)
    data_dir = tmp_path / "agent"
    agent = start_agent(cluster, [server.url], data_dir, credential)
    try:
        # a new agent's first revocation poll may come before its first bundle report
        # (which makes its row): its next poll, at most a long poll later, records it
        (reported,) = eventually(
            lambda: [
                a
                for a in _agents(server, cluster)
                if a["revocationRevision"] == _revocation_revision(server)
            ],
            "the agent reporting the revocation revision in force",
        )
        assert (reported["revocationsBehind"], reported["revocationLagSeconds"]) == (0, 0.0)
        agent_id = reported["agentId"]

        console.sign_in(page, "auditor")
        row = page.locator(f'tr[data-cluster="{cluster}"]')
        held = row.locator(f'li[data-revocations-of="{agent_id}"]')
        expect(held).to_contain_text("up to date")
        page.evaluate("() => { window.__notReloaded = true; }")
    finally:
        assert agent.stop() == 0, agent.process.stderr()

    entry = _revoke(server)
    eventually(
        lambda: [a for a in _agents(server, cluster) if a["revocationsBehind"]],
        "the stopped agent shown behind",
    )
    overview = server.admin.get("/v1/overview").json()
    (found,) = [c for c in overview["clusters"] if c["name"] == cluster]
    (behind,) = found["agents"]
    assert behind["revocationRevision"] == entry["revision"] - 1
    assert behind["revocationsBehind"] == 1
    # since the one revocation it lacks was published, as of the answer
    assert (
        abs(behind["revocationLagSeconds"] - (overview["generatedAt"] - entry["published_at"]))
        < 0.01
    )
    assert (found["revocationsBehind"], found["revocationLagSeconds"]) == (
        1,
        behind["revocationLagSeconds"],
    )
    assert overview["totals"]["revocationsBehind"] >= 1
    expect(held).to_contain_text("1 behind")
    expect(held).to_contain_text(f"r{entry['revision'] - 1}")

    agent = start_agent(cluster, [server.url], data_dir, credential)
    try:
        caught_up = eventually(
            lambda: [
                a for a in _agents(server, cluster) if a["revocationRevision"] == entry["revision"]
            ],
            "the restarted agent reporting the revocation it had missed",
        )[0]
        assert caught_up["agentId"] == agent_id
        assert (caught_up["revocationsBehind"], caught_up["revocationLagSeconds"]) == (0, 0.0)
        expect(held).to_contain_text("up to date")
        expect(held).to_contain_text(f"r{entry['revision']}")
        assert _cluster(server, cluster)["revocationsBehind"] == 0
        assert page.evaluate("() => window.__notReloaded") is True
    finally:
        assert agent.stop() == 0, agent.process.stderr()


def test_held_is_checked_and_an_agent_that_never_says_is_unknown(
    console: Console, page: Page
) -> None:
    """An agent credential polling as an agent from before ``held`` (its bundle poll makes
    its row, its revocation polls say nothing) is "unknown"; ``held`` that is not a
    revision, or ahead of the control plane's, is refused (400 naming it)."""
    server = console.server
    cluster = unique("revheld-")
    server.apply(cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}"))
    agent = httpx.Client(
        base_url=server.url,
        headers={"Authorization": f"Bearer {server.credential(cluster)}"},
        timeout=10,
    )
    with agent:
        first = agent.get("/v1/agent/bundle", params={"wait": "0"})
        assert first.status_code == 200, first.text
        version = ".".join(str(v) for v in first.json()["version"])
        polled = agent.get("/v1/agent/bundle", params={"after": version, "wait": "0"})
        assert polled.status_code == 304, polled.text
        listed = agent.get("/v1/revocations", params={"since": "0"})
        assert listed.status_code == 200, listed.text
        current = int(listed.json()["revision"])

        (old,) = _agents(server, cluster)
        assert (old["revocationRevision"], old["revocationsBehind"]) == (None, None)
        assert old["revocationLagSeconds"] is None
        found = _cluster(server, cluster)
        assert found["revocationsBehind"] is None and found["revocationsUnknown"] == 1

        console.sign_in(page, "auditor")
        held = page.locator(
            f'tr[data-cluster="{cluster}"] li[data-revocations-of="{old["agentId"]}"]'
        )
        expect(held).to_contain_text("unknown")
        expect(held).not_to_contain_text("up to date")

        for bad in ("-1", "x", "1.5", "", " 1", str(current + 1), "9" * 30):
            refused = agent.get("/v1/revocations", params={"since": "0", "held": bad})
            assert refused.status_code == 400, (bad, refused.text)
            assert "held" in refused.json()["error_description"], refused.text
        (still,) = _agents(server, cluster)
        assert still["revocationRevision"] is None

        reported = agent.get("/v1/revocations", params={"since": "0", "held": str(current)})
        assert reported.status_code == 200, reported.text
        (now_known,) = _agents(server, cluster)
        assert (now_known["revocationRevision"], now_known["revocationsBehind"]) == (current, 0)
        expect(held).to_contain_text("up to date")

        # a poll without held (as a full read is) leaves the report as it was
        assert agent.get("/v1/revocations", params={"since": "0"}).status_code == 200
        assert _agents(server, cluster)[0]["revocationRevision"] == current

    # the admin's held is checked too, and recorded for no agent
    refused = server.admin.get("/v1/revocations", params={"held": str(current + 1)})
    assert refused.status_code == 400 and "held" in refused.json()["error_description"]
    assert server.admin.get("/v1/revocations", params={"held": "0"}).status_code == 200
    assert _agents(server, cluster)[0]["revocationRevision"] == current
