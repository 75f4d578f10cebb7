"""The access requests and anomalies pages in a real browser (issue 16): an auditor
requests access through the page's form and is refused by the SERVER (403, the message
shown in the page) when the page's own module posts an approval for them; an approver
approves one request (its countdown to expiry runs in the page) and denies another with a
reason. A real anomaly — forged service-account tokens refused at the exchange, a
``refusal_burst`` finding of the control plane's own runner — appears in the open page
without a reload (the ``anomalies`` server-sent event), its evidence linked to the audit
explorer, and an approver acknowledges and resolves it: the page names them."""

from __future__ import annotations

import re
from typing import Any

import jwt
from console_support import Console, open_page, problems, screenshot
from cryptography.hazmat.primitives.asymmetric import ec
from playwright.sync_api import Browser, Locator, Page, expect

from helpers import cluster_yaml, register_federation, unique, workload_yaml
from trustmesh.sim import SimulatedCluster

LIVE = 30_000  # ms: how long the page may take to show what the server did

ANOMALY_POLICY = """apiVersion: trustmesh.io/v1alpha1
kind: AnomalyPolicy
metadata: {name: console-test}
spec:
  detectors:
    refusal_burst: {warmup: 0, threshold: 3, window: 600, baselineWindow: 3600}
"""


def role_yaml(name: str) -> str:
    return f"""apiVersion: trustmesh.io/v1alpha1
kind: GlobalRole
metadata: {{name: {name}}}
spec:
  rules: [{{services: [orders.test], paths: [/api/*], methods: [GET]}}]
"""


def settled(page: Page, expected_status: int | None = None) -> None:
    """No script error or CSP violation in the page; the browser's own line for a
    refusal the test caused on purpose (``status of 403``) is not one."""
    wrong = [
        m
        for m in problems(page)
        if expected_status is None or f"status of {expected_status}" not in m
    ]
    page.context.close()
    assert not wrong, "the page reported problems:\n" + "\n".join(wrong)


def open_signed_in(browser: Browser, console: Console, role: str, link: str) -> Page:
    """A page of its own, signed in as ``role``, on the page the nav link ``link`` opens."""
    page = open_page(browser)
    console.sign_in(page, role)
    page.get_by_role("link", name=link).click()
    expect(page.get_by_role("heading", level=1, name=link)).to_be_visible()
    return page


def request_through_the_form(page: Page, role: str, workload: str, cluster: str) -> str:
    form = page.get_by_role("form", name="Request access")
    form.get_by_label("Role").fill(role)
    form.get_by_label("Subject kind").select_option("workload")
    form.get_by_label("Subject", exact=True).fill(workload)
    form.get_by_label("Clusters").fill(cluster)
    form.get_by_label("Duration").fill("1h")
    form.get_by_label("Reason").fill("INC-42: read the orders <b>now</b>")
    notice = page.locator('[data-status="access"]')
    before = notice.inner_text()
    form.get_by_role("button", name="Request").click()
    expect(notice).not_to_have_text(before)  # this request's answer, not the last one's
    expect(notice).to_contain_text("is pending")
    found = re.search(r"access request ([a-z0-9]{10}) is pending", notice.inner_text())
    assert found, notice.inner_text()
    return found.group(1)


def row_of(page: Page, request_id: str) -> Locator:
    return page.locator("tbody tr", has=page.locator("code", has_text=request_id))


def on_server(console: Console, request_id: str) -> dict[str, Any]:
    with console.client("auditor") as client:
        answer = client.get(f"/v1/access/{request_id}")
    assert answer.status_code == 200, answer.text
    found: dict[str, Any] = answer.json()
    return found


def test_request_refused_approve_approve_with_countdown_and_deny(
    console: Console, browser: Browser
) -> None:
    role, cluster, workload = unique("reader-"), unique("east-"), unique("web-")
    console.server.apply(
        "---\n".join(
            [
                cluster_yaml(cluster, f"https://{cluster}.example"),
                workload_yaml(workload, cluster, "shop", "web"),
                role_yaml(role),
            ]
        )
    )

    # an auditor requests access through the form (any person may)
    auditor = open_signed_in(browser, console, "auditor", "Access requests")
    granted = request_through_the_form(auditor, role, workload, cluster)
    refused = request_through_the_form(auditor, role, workload, cluster)
    waiting = request_through_the_form(auditor, role, workload, cluster)  # stays pending
    row = row_of(auditor, granted)
    expect(row.locator('td[data-label="State"]')).to_have_text("pending")
    expect(row).to_contain_text("INC-42: read the orders <b>now</b>")  # text, not markup
    # the page offers an auditor no decision...
    expect(auditor.get_by_role("button", name="Approve")).to_have_count(0)
    expect(auditor.get_by_role("button", name="Deny")).to_have_count(0)
    # ...and the server refuses one sent anyway, by the page's own module and session
    outcome = auditor.evaluate(
        """async (id) => {
             const page = await import("/console/js/pages/access.js");
             return page.decide(id, "approve", "let me");
           }""",
        granted,
    )
    assert outcome["ok"] is False and outcome["status"] == 403, outcome
    assert "approver role" in outcome["message"], outcome
    notice = auditor.locator('[data-status="access"]')
    expect(notice).to_contain_text("approve refused:")
    expect(notice).to_contain_text(outcome["message"])
    expect(notice).to_contain_text("(403)")
    assert on_server(console, granted)["state"] == "pending"
    settled(auditor, expected_status=403)

    # an approver approves one: the countdown to its expiry runs in the page
    approver = open_signed_in(browser, console, "approver", "Access requests")
    row = row_of(approver, granted)
    row.get_by_label(f"Reason for the decision on {granted}").fill("on call for INC-42")
    row.get_by_role("button", name="Approve").click()
    expect(row.locator('td[data-label="State"]')).to_have_text("approved")
    notice = approver.locator('[data-status="access"]')
    expect(notice).to_contain_text(f"access request {granted} approved by user:console-approver")
    countdown = approver.locator(f'[data-countdown="{granted}"]')
    expect(countdown).to_have_text(re.compile(r"^(1 h 0 min|59 min \d{1,2} s)$"))
    shown = countdown.inner_text()
    expect(countdown).not_to_have_text(shown)  # it ticks, in the page, without a reload
    expect(row.locator('td[data-label="Decided by"]')).to_contain_text(
        "user:console-approver (on call for INC-42)"
    )
    approved = on_server(console, granted)
    assert approved["state"] == "approved"
    assert approved["decidedBy"] == "user:console-approver"
    assert approved["decisionReason"] == "on call for INC-42"
    assert approved["binding"] == f"access-{granted}"

    # and denies the other: a denial needs a reason, the page says so before the server
    row = row_of(approver, refused)
    row.get_by_role("button", name="Deny").click()
    expect(notice).to_have_text("a denial needs a reason")
    assert on_server(console, refused)["state"] == "pending"
    row.get_by_label(f"Reason for the decision on {refused}").fill("one grant is enough")
    row.get_by_role("button", name="Deny").click()
    expect(row.locator('td[data-label="State"]')).to_have_text("denied")
    denied = on_server(console, refused)
    assert (denied["state"], denied["decidedBy"], denied["decisionReason"]) == (
        "denied", "user:console-approver", "one grant is enough",
    )  # fmt: skip

    # the state filter asks the server for one state
    approver.get_by_label("Show requests in state").select_option("denied")
    expect(row_of(approver, refused)).to_have_count(1)
    expect(row_of(approver, granted)).to_have_count(0)
    approver.get_by_label("Show requests in state").select_option("")
    expect(row_of(approver, granted)).to_have_count(1)

    expect(row_of(approver, waiting).get_by_role("button", name="Approve")).to_be_visible()
    screenshot(approver, "access")
    settled(approver)


def forge_refusals(console: Console, sim_cluster: SimulatedCluster) -> str:
    """Four service-account tokens with a real token's claims and the attacker's key,
    refused at the exchange; the origin's issuer (the finding's subject)."""
    fed = register_federation(console.server, sim_cluster)
    genuine = fed.sa_token()
    claims = jwt.decode(genuine, options={"verify_signature": False})
    kid = jwt.get_unverified_header(genuine).get("kid")
    forger = ec.generate_private_key(ec.SECP256R1())
    for _ in range(4):
        forged = jwt.encode(claims, forger, algorithm="ES256", headers={"kid": kid})
        assert console.server.exchange(forged, fed.audience).status_code in (400, 401)
    return fed.origin.issuer


def test_a_real_anomaly_appears_live_and_is_acknowledged_and_resolved(
    console: Console, browser: Browser, sim_cluster: SimulatedCluster
) -> None:
    console.server.apply(ANOMALY_POLICY)
    page = open_signed_in(browser, console, "approver", "Anomalies")
    page.get_by_label("Detector").select_option("refusal_burst")
    page.evaluate("() => { window.sameDocument = true; }")  # gone if the page reloads

    issuer = forge_refusals(console, sim_cluster)
    card = page.locator("article.anomaly", has_text=f"issuer={issuer}")
    expect(card).to_be_visible(timeout=LIVE)
    assert page.evaluate("() => window.sameDocument") is True  # no reload: the live event

    with console.client("auditor") as client:
        items = client.get("/v1/anomalies", params={"detector": "refusal_burst"}).json()["items"]
    (finding,) = [i for i in items if i["subject"] == {"issuer": issuer}]
    anomaly = finding["id"]
    assert len(finding["evidence"]) >= 3
    links = card.locator("a[data-evidence]")
    expect(links).to_have_count(len(finding["evidence"]))
    assert [links.nth(i).get_attribute("href") for i in range(links.count())] == [
        f"#/audit?index={index}" for index in finding["evidence"]
    ]
    expect(card.locator(f'[data-state="{anomaly}"]')).to_have_text("open")

    # an auditor reads it too, and is offered no action (the server's 403 for an
    # auditor's acknowledge is tests/server/test_analytics.py's)
    reader = open_signed_in(browser, console, "auditor", "Anomalies")
    seen = reader.locator("article.anomaly", has_text=f"issuer={issuer}")
    expect(seen.locator("a[data-evidence]")).to_have_count(len(finding["evidence"]))
    expect(reader.get_by_text("Auditors read findings")).to_be_visible()
    expect(seen.get_by_role("button")).to_have_count(0)
    settled(reader)

    card.get_by_label(f"Note on anomaly {anomaly}").fill("looking: forged tokens")
    card.get_by_role("button", name="Acknowledge").click()
    expect(card.locator(f'[data-state="{anomaly}"]')).to_have_text("acknowledged")
    expect(card.locator(f'[data-acknowledged-by="{anomaly}"]')).to_contain_text(
        "acknowledged by user:console-approver"
    )
    expect(card.get_by_role("button", name="Acknowledge")).to_have_count(0)
    screenshot(page, "anomalies")

    card.get_by_label(f"Note on anomaly {anomaly}").fill("origin key rotated; INC-43")
    card.get_by_role("button", name="Resolve").click()
    expect(card.locator(f'[data-state="{anomaly}"]')).to_have_text("resolved")
    expect(card.locator(f'[data-resolved-by="{anomaly}"]')).to_contain_text(
        "resolved by user:console-approver"
    )
    expect(card).to_contain_text("note: origin key rotated; INC-43")
    expect(card.get_by_role("button", name="Resolve")).to_have_count(0)
    with console.client("auditor") as client:
        done = client.get(f"/v1/anomalies/{anomaly}").json()
    assert (done["state"], done["acknowledgedBy"], done["resolvedBy"], done["note"]) == (
        "resolved", "user:console-approver", "user:console-approver",
        "origin key rotated; INC-43",
    )  # fmt: skip
    assert page.evaluate("() => window.sameDocument") is True
    settled(page)
