"""The overview page in a real browser, live: a cluster applied, then a real agent
started for it, then a policy change, each shown on the open page without a reload
(server-sent events, ``/console/events``); and a federation of 50 clusters drawn from
one request. Writes docs/console/overview.png (1280x800)."""

from __future__ import annotations

from pathlib import Path

import httpx
from console_support import Console, screenshot
from playwright.sync_api import Page, expect

from helpers import cluster_yaml, start_agent, unique

ROLE = """apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {name}}}
spec:
  rules: [{{services: [overview.test], paths: [/], methods: [GET]}}]
"""


def test_the_overview_follows_clusters_agents_and_policy_without_reload(
    console: Console, page: Page, tmp_path: Path
) -> None:
    server = console.server
    console.sign_in(page, "auditor")
    expect(page.get_by_role("heading", name="Clusters and agents")).to_be_visible()
    page.evaluate("() => { window.__notReloaded = true; }")

    cluster = unique("east-")
    server.apply(cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}"))
    cells = page.locator(f'tr[data-cluster="{cluster}"]')
    expect(cells).to_contain_text("no agent", timeout=15_000)

    agent = start_agent(cluster, [server.url], tmp_path / "agent", server.credential(cluster))
    try:
        expect(cells).to_contain_text("in sync", timeout=15_000)
        expect(cells.locator("li[data-agent]")).to_have_count(1)

        before = page.locator(".card").nth(3).locator(".value").inner_text()
        server.apply(ROLE.format(name=unique("overview-role-")))
        expect(page.locator(".card").nth(3).locator(".value")).not_to_have_text(
            before, timeout=15_000
        )
        revision = server.admin.get("/v1/overview").json()["policy"]["desiredRevision"]
        expect(cells).to_contain_text(f"r{revision} / r{revision}", timeout=15_000)
        expect(cells).to_contain_text("in sync")
        assert page.evaluate("() => window.__notReloaded") is True
        screenshot(page, "overview")
    finally:
        agent.stop()
    # a stopped agent stays listed; its cluster shows drift once a change passes it by
    server.apply(ROLE.format(name=unique("overview-role-")))
    expect(cells).to_contain_text("drift", timeout=15_000)
    assert page.evaluate("() => window.__notReloaded") is True


def test_fifty_clusters_are_drawn_from_one_request(console: Console, page: Page) -> None:
    names = [unique("fleet-") for _ in range(50)]
    console.server.apply("---\n".join(cluster_yaml(n, f"http://127.0.0.1:9/{n}") for n in names))
    calls: list[str] = []
    page.on("request", lambda r: calls.append(r.url) if "/v1/" in r.url else None)
    console.sign_in(page, "admin")
    for name in (names[0], names[-1]):
        expect(page.locator(f'tr[data-cluster="{name}"]')).to_contain_text("no agent")
    assert [c.split(console.server.url)[1] for c in calls] == ["/v1/overview"]


def test_the_overview_api_is_one_answer_for_any_role_and_refuses_clusters(
    console: Console,
) -> None:
    for role in ("admin", "approver", "auditor"):
        with console.client(role) as client:
            answer = client.get("/v1/overview")
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert {"clusters", "policy", "revocations", "signingKeys", "totals"} <= set(body)
    cluster = unique("refused-")
    console.server.apply(cluster_yaml(cluster, f"http://127.0.0.1:9/{cluster}"))
    credential = console.server.credential(cluster)
    answer = httpx.get(
        console.server.url + "/v1/overview",
        headers={"Authorization": f"Bearer {credential}"},
        timeout=10,
    )
    assert answer.status_code == 403
    assert "cluster credential" in answer.json()["error_description"]
