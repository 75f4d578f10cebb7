"""The audit explorer and "who calls whom" in a real browser (issue 16), over real
traffic: a control plane of their own (the tamper test alters its database), a simulated
cluster ``east`` whose workload exchanges its service-account token for a JWT-SVID, and a
real agent of cluster ``target`` deciding that workload's requests, both carrying one W3C
``traceparent``. The agent ships its decisions to the log like any agent.

* Filters narrow the page to real entries (compared with the API's own answer).
* An entry's trace shows the exchange (``token.issued``) and the decision of that trace.
* "Verify inclusion" checks the key, the signed checkpoint, the leaf and its inclusion
  proof in the page with WebCrypto; the test then alters that record in the control
  plane's SQLite database (the log's reads are not cached: ``AuditLog.entries`` reads the
  database on every call, so no restart is needed) and the page's verification FAILS,
  naming the step: the leaf's path no longer leads to the signed root.
* The graph draws the workload's cross-cluster calls, with their denial, and lists them
  in the table (before the tamper test, which turns one allowed decision into a denial).

Screenshots at 1280x800: docs/console/audit.png, audit-verify.png, graph.png."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from console_support import Console, screenshot, with_people
from playwright.sync_api import Page, expect

from helpers import (
    TRUST_DOMAIN,
    cluster_yaml,
    eventually,
    serve_cluster,
    start_agent,
    start_server,
    workload_yaml,
)

POLICY = """---
apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {name: orders-reader}
spec:
  rules: [{services: [orders.test], paths: [/api/*], methods: [GET]}]
---
apiVersion: trustmesh.io/v1alpha1
kind: RoleBinding
metadata: {name: web-reads-orders}
spec:
  role: orders-reader
  subjects: [{workload: web}]
"""
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"


@dataclass
class Traffic:
    console: Console
    trace: str  # the trace of the exchange and its allowed decision
    web: str  # the workload's SPIFFE ID

    def query(self, **params: Any) -> list[dict[str, Any]]:
        with self.console.client("auditor") as client:
            answer = client.get("/v1/audit/query", params={"limit": 1000, **params})
        assert answer.status_code == 200, answer.text
        found: list[dict[str, Any]] = answer.json()["entries"]
        return found


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    base = tmp_path_factory.mktemp("audit-console")
    server = start_server(base / "cp")
    east = serve_cluster("east")
    agent = None
    try:
        console = with_people(server)
        manifests = "---\n".join(
            [
                cluster_yaml("east", east.issuer),
                cluster_yaml("target", "http://127.0.0.1:9/target"),
                workload_yaml("web", "east", "shop", "web"),
                POLICY,
            ]
        )
        server.apply(manifests)
        credential = server.admin.post("/v1/clusters/target/credentials", json={})
        assert credential.status_code == 200, credential.text
        agent = start_agent("target", [server.url], base / "agent", credential.json()["token"])

        trace = uuid.uuid4().hex
        parent = {"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
        exchanged = httpx.post(
            server.url + "/oauth2/token",
            data={
                "grant_type": EXCHANGE,
                "subject_token": east.mint("shop", "web"),
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "audience": f"spiffe://{TRUST_DOMAIN}/cluster/target",
            },
            headers=parent,
            timeout=10,
        )
        assert exchanged.status_code == 200, exchanged.text
        token = exchanged.json()["access_token"]
        asked = [("/api/orders", True, parent), ("/api/items", True, {}), ("/internal", False, {})]
        for path, expected, headers in asked:
            request = {"host": "orders.test", "path": path, "method": "GET"}
            answer = httpx.post(
                agent.url + "/v1/authorize",
                json={"token": token, "request": request},
                headers=headers,
                timeout=10,
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["allowed"] is expected
        found = Traffic(console, trace, "")

        def shipped() -> list[dict[str, Any]] | None:
            decisions = found.query(type="authz.decision", cluster="target")
            return decisions if len(decisions) >= len(asked) else None

        decisions = eventually(shipped, "the agent shipped its decisions")
        found.web = decisions[0]["event"]["identity"]["spiffe_id"]
        yield found
    finally:
        if agent is not None:
            agent.stop()
        east.stop()
        assert server.stop() == 0, server.process.stderr()


def rows(page: Page) -> list[dict[str, str]]:
    """The explorer's rows as the page shows them."""
    table = page.locator("#audit-results tbody tr")
    return [
        {
            "index": str(row.get_attribute("data-index")),
            "type": row.locator(".audit-type").inner_text(),
            "cluster": row.locator(".audit-cluster").inner_text(),
            "subject": row.locator(".audit-subject").inner_text(),
            "decision": row.locator(".audit-decision").inner_text(),
        }
        for row in table.all()
    ]


def apply_filters(page: Page, **values: str) -> None:
    for name in ("type", "identity", "cluster"):
        page.locator(f"#audit-{name}").fill(values.get(name, ""))
    page.locator("#audit-decision").select_option(values.get("decision", ""))
    page.get_by_role("button", name="Apply filters").click()


def open_audit(page: Page, traffic: Traffic) -> None:
    traffic.console.sign_in(page, "auditor")
    page.goto(traffic.console.url + "#/audit")
    expect(page.get_by_role("heading", name="Audit", exact=True)).to_be_visible()
    expect(page.locator("#audit-results tbody tr").first).to_be_visible()


def test_filters_narrow_the_explorer_to_real_entries(traffic: Traffic, page: Page) -> None:
    open_audit(page, traffic)
    everything = rows(page)
    # the log may have grown since the page read it (agents ship, the runner records):
    # the page's rows are the newest 50 as of then, a run within the newest now
    newest = [str(e["index"]) for e in traffic.query(order="desc", limit=200)]
    shown = [r["index"] for r in everything]
    assert shown and shown[0] in newest
    start = newest.index(shown[0])
    assert newest[start : start + len(shown)] == shown
    assert {r["type"] for r in everything} >= {"authz.decision", "token.issued"}

    apply_filters(page, type="authz.decision", cluster="target")
    expected = traffic.query(type="authz.decision", cluster="target", order="desc")
    expect(page.locator("#audit-results tbody tr")).to_have_count(len(expected))
    shown = rows(page)
    assert [r["index"] for r in shown] == [str(e["index"]) for e in expected]
    assert {(r["type"], r["cluster"]) for r in shown} == {("authz.decision", "target")}
    assert len(shown) < len(everything)

    apply_filters(page, type="authz.decision", decision="deny", identity=traffic.web)
    expect(page.locator("#audit-results tbody tr")).to_have_count(1)
    (denied,) = rows(page)
    assert (denied["decision"], denied["subject"]) == ("deny", traffic.web)

    apply_filters(page, type="token.issued", identity=traffic.web)
    issued = traffic.query(type="token.issued", identity=traffic.web)
    expect(page.locator("#audit-results tbody tr")).to_have_count(len(issued))
    assert {r["type"] for r in rows(page)} == {"token.issued"}

    apply_filters(page, cluster="no-such-cluster")
    expect(page.locator("#audit-status")).to_have_text("No entries match.")

    apply_filters(page)
    expect(page.locator("#audit-results tbody tr")).to_have_count(len(everything))
    screenshot(page, "audit")


def test_graph_draws_the_cross_cluster_calls(traffic: Traffic, page: Page) -> None:
    traffic.console.sign_in(page, "auditor")
    page.goto(traffic.console.url + "#/graph")
    expect(page.get_by_role("heading", name="Who calls whom")).to_be_visible()
    svg = page.locator("#graph-svg")
    expect(svg).to_be_visible()
    expect(svg.locator('[data-cluster="east"]')).to_have_count(1)
    expect(svg.locator('[data-cluster="target"]')).to_have_count(1)
    expect(svg.locator(f'[data-node="east|{traffic.web}"]')).to_have_count(1)
    expect(svg.locator('[data-node="target|orders.test"]')).to_have_count(1)
    edge = svg.locator(".graph-edge.graph-cross.graph-denied")
    expect(edge).to_have_count(1)
    expect(edge.locator("title")).to_have_text(
        f"east: {traffic.web} → target: orders.test: 3 calls, 1 denied"
    )

    with traffic.console.client("auditor") as client:
        answer = client.get("/v1/audit/graph", params={"since": "1h"})
    assert answer.status_code == 200, answer.text
    graph = answer.json()
    assert graph["edges"] == [
        {
            "from": f"east|{traffic.web}",
            "to": "target|orders.test",
            "calls": 3,
            "denied": 1,
            "crossCluster": True,
        }
    ]
    row = page.locator("#graph-table tbody tr")
    expect(row).to_have_count(1)
    cells = [c.inner_text() for c in row.locator("td").all()]
    assert cells == ["east", traffic.web, "target", "orders.test", "3", "1", "yes"]
    screenshot(page, "graph")

    # bad input is a clear 400, not a graph
    with traffic.console.client("auditor") as client:
        for params, message in (
            ({"since": "yesterday"}, "since must be an RFC 3339 time"),
            ({"limit": "0"}, "limit must be 1 to"),
            ({"colour": "red"}, "unknown query parameter 'colour'"),
        ):
            refused = client.get("/v1/audit/graph", params=params)
            assert refused.status_code == 400 and message in refused.text, refused.text


def test_trace_verification_and_a_tampered_record(traffic: Traffic, page: Page) -> None:
    (issued,) = traffic.query(trace_id=traffic.trace, type="token.issued")
    open_audit(page, traffic)
    apply_filters(page, type="token.issued", identity=traffic.web)
    page.get_by_role("button", name=f"Open entry {issued['index']}").click()
    detail = page.locator("#audit-detail")
    expect(detail.get_by_role("heading", name=f"Entry {issued['index']}")).to_be_visible()

    # the trace: from the exchange to the decision it led to, in log order
    page.get_by_role("button", name="Show trace").click()
    trace = page.locator("#audit-trace")
    expect(trace.get_by_role("heading", name=f"Trace {traffic.trace}")).to_be_visible()
    in_trace = traffic.query(trace_id=traffic.trace)
    assert [e["event"]["type"] for e in in_trace] == ["token.issued", "authz.decision"]
    expect(trace.locator("tbody tr")).to_have_count(2)
    assert [r.locator(".audit-type").inner_text() for r in trace.locator("tbody tr").all()] == [
        "token.issued",
        "authz.decision",
    ]
    story = trace.locator(".audit-story li")
    expect(story.nth(0)).to_contain_text("issuance")
    expect(story.nth(1)).to_contain_text("decision")
    expect(story.nth(1)).to_contain_text("allow")

    # the decision of that trace, verified in the page (once a checkpoint covers it)
    decision = in_trace[1]
    with traffic.console.client("auditor") as client:
        eventually(
            lambda: int(client.get("/v1/audit/checkpoint").text.split("\n")[1]) > decision["index"],
            "a checkpoint covers the decision",
        )
    trace.get_by_role("button", name=f"Open entry {decision['index']}").click()
    expect(detail.get_by_role("heading", name=f"Entry {decision['index']}")).to_be_visible()
    page.get_by_role("button", name="Verify inclusion").click()
    result = page.locator("#audit-result")
    expect(result).to_contain_text("Verified", timeout=15_000)
    steps = page.locator("#audit-steps li")
    assert [s.get_attribute("data-step") for s in steps.all()] == [
        "key", "signature", "event", "leaf hash", "path", "root",
    ]  # fmt: skip
    assert all("ok" in str(s.get_attribute("class")) for s in steps.all())
    with traffic.console.client("auditor") as client:
        key = client.get("/v1/audit/key").text.strip()
    expect(steps.nth(0)).to_contain_text(key.split("+")[1])  # the key hash it checked
    detail.scroll_into_view_if_needed()
    screenshot(page, "audit-verify")

    # Alter that record where the control plane stores it: allowed becomes denied.
    database = traffic.console.server.data_dir / "trustmesh.db"
    tamper(database, decision["index"])
    altered = traffic.query(trace_id=traffic.trace)[1]
    assert altered["event"]["decision"]["allowed"] is False  # served as stored: no cache

    page.reload()
    expect(page.get_by_role("heading", name="Audit", exact=True)).to_be_visible()
    apply_filters(page, type="authz.decision", identity=traffic.web)
    page.get_by_role("button", name=f"Open entry {decision['index']}").click()
    expect(page.locator("#audit-event")).to_contain_text('"allowed": false')
    page.get_by_role("button", name="Verify inclusion").click()
    expect(result).to_contain_text('FAILED at step "root"', timeout=15_000)
    expect(result).to_have_class("audit-failed")
    failed = page.locator('#audit-steps li[data-step="root"]')
    expect(failed).to_have_class("audit-step-failed")
    expect(failed).to_contain_text("the signed root is")
    # the steps before it still hold: the key, the signature, the event is the leaf's
    for step in ("key", "signature", "event", "leaf hash", "path"):
        expect(page.locator(f'#audit-steps li[data-step="{step}"]')).to_have_class("audit-step-ok")


def tamper(database: Path, index: int) -> None:
    with sqlite3.connect(database, timeout=10) as conn:
        (leaf,) = conn.execute("SELECT leaf FROM audit_entries WHERE idx = ?", (index,)).fetchone()
        assert '"allowed":true' in leaf
        changed = leaf.replace('"allowed":true', '"allowed":false', 1)
        conn.execute("UPDATE audit_entries SET leaf = ? WHERE idx = ?", (changed, index))


def test_each_altered_input_fails_its_own_step(traffic: Traffic, page: Page) -> None:
    """The page's verifier over the log's real key, checkpoint, entry and proof, each
    altered in turn: the check fails at the step that reads it, and only there."""
    traffic.console.sign_in(page, "auditor")
    with traffic.console.client("auditor") as client:
        vkey = client.get("/v1/audit/key").text.strip()
        note = client.get("/v1/audit/checkpoint").text
        size = int(note.split("\n")[1])
        entry = client.get("/v1/audit/entries", params={"start": 0, "end": 1}).json()["entries"][0]
        proof = client.get("/v1/audit/proof/inclusion", params={"index": 0, "size": size}).json()
    name, key_hash, material = vkey.split("+", 2)
    root = note.split("\n")[2]
    other_root = ("A" if root[0] != "A" else "B") + root[1:]
    flipped = ("A" if proof["hashes"][0][0] != "A" else "B") + proof["hashes"][0][1:]
    cases = {
        "none": {},
        "key": {"vkey": f"{name}+{'0' * 8 if key_hash != '0' * 8 else '1' * 8}+{material}"},
        "signature": {"note": note.replace(f"\n{root}\n", f"\n{other_root}\n", 1)},
        "event": {"shown": {**entry["event"], "type": "policy.published"}},
        "path": {"proof": {**proof, "tree_size": size + 1}},
        "root": {"proof": {**proof, "hashes": [flipped, *proof["hashes"][1:]]}},
    }
    found = page.evaluate(
        """async ([base, cases]) => {
          const verify = await import("/console/js/verify.js");
          const out = {};
          for (const [name, change] of Object.entries(cases)) {
            const outcome = await verify.verifyEntry({ ...base, shown: base.entry.event, ...change });
            out[name] = outcome.failed;
          }
          return out;
        }""",
        [{"vkey": vkey, "note": note, "entry": entry, "proof": proof}, cases],
    )
    assert found == {
        "none": None,
        "key": "key",
        "signature": "signature",
        "event": "event",
        "path": "path",
        "root": "root",
    }
