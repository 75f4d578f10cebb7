"""The console's Workloads and Policy pages in a real browser (Debian chromium via
Playwright, the core's fixtures) over a real control plane given the scenario of
``policy_scenario.py``: the workloads table pages and filters on the server, the
diff between the two applied revisions shows the escalation flagged (in words, not
only in colour), and "explain this decision" shows an allow with the binding that
decides it and a deny without one. Screenshots: docs/console/workloads.png and
docs/console/policy.png at 1280x800.

The control plane is this module's own (the people the core's ``console`` fixture
adds, added the same way): the pages count and page through every Workload, which a
server shared with other pages' tests would change under them."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from console_support import PHONE, Console, open_page, problems, screenshot, with_people
from playwright.sync_api import Browser, Page, expect
from policy_scenario import FILLER, Scenario, populate

from helpers import start_server


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Console, Scenario]]:
    server = start_server(tmp_path_factory.mktemp("console-policy") / "data")
    try:
        console = with_people(server)
        scenario = populate(server)
        try:
            yield console, scenario
        finally:
            scenario.stop()
    finally:
        assert server.stop() == 0, server.process.stderr()


def rows(page: Page, caption: str) -> object:
    return page.locator("table", has=page.locator("caption", has_text=caption)).locator("tbody tr")


def test_workloads_page_pages_and_filters_on_the_server(
    world: tuple[Console, Scenario], page: Page
) -> None:
    console, scenario = world
    console.sign_in(page, "auditor")
    page.get_by_role("link", name="Workloads", exact=True).click()
    expect(page.get_by_role("heading", level=1)).to_have_text("Workloads")
    total = FILLER + 3  # payments, ci, the template-derived identity and the filler
    expect(page.locator("#workloads-count")).to_have_text(f"{total} identities match")
    table = rows(page, "Workload identities")
    expect(table).to_have_count(50)
    expect(page.get_by_text("Page 1 of 3")).to_be_visible()
    expect(table.first).to_contain_text("ci")  # by name: ci, payments, teams/…, worker-000…
    expect(table.nth(2)).to_contain_text(scenario.derived)
    expect(page.get_by_role("heading", name="Pending service accounts")).to_be_visible()
    screenshot(page, "workloads")

    page.get_by_role("button", name="Next").click()
    expect(page.get_by_text("Page 2 of 3")).to_be_visible()
    expect(table.first).to_contain_text("worker-047")
    page.get_by_role("button", name="Next").click()
    expect(page.get_by_text("Page 3 of 3")).to_be_visible()
    expect(table).to_have_count(total - 100)
    expect(page.get_by_role("button", name="Next")).to_be_disabled()
    page.get_by_role("button", name="Previous").click()
    expect(table.first).to_contain_text("worker-047")

    # template-derived: the identity the simulated cluster's service account received
    page.get_by_label("Source").select_option("template")
    page.get_by_role("button", name="Apply filters").click()
    expect(page.locator("#workloads-count")).to_have_text("1 identity matches")
    expect(table).to_have_count(1)
    derived = table.first
    expect(derived).to_contain_text(scenario.derived)
    expect(derived.locator("td[data-label=Source]")).to_contain_text("template teams")
    # it received a credential: last seen, not "never"
    expect(derived.locator("td[data-label='Last credential']")).to_contain_text("ago")

    page.get_by_label("Source").select_option("")
    page.get_by_label("Name or SPIFFE ID contains").fill("PAYM")
    page.get_by_role("button", name="Apply filters").click()
    expect(table).to_have_count(1)
    expect(table.first).to_contain_text("payments")
    expect(table.first.locator("td[data-label=Source]")).to_have_text("explicit")

    page.get_by_label("Name or SPIFFE ID contains").fill("")
    page.get_by_label("Cluster").select_option(scenario.dev)
    page.get_by_role("button", name="Apply filters").click()
    expect(table).to_have_count(1)
    expect(table.first).to_contain_text("ci")

    # stale: nothing has been idle for 30 days; the server's refusal is shown as is
    page.get_by_label("Cluster").select_option("")
    page.get_by_label("Stale: idle for days").fill("30")
    page.get_by_role("button", name="Apply filters").click()
    expect(page.locator("#workloads-count")).to_have_text("0 identities match")
    expect(table.first).to_have_text("No identity matches these filters.")


def test_policy_diff_between_two_applied_revisions_flags_the_escalation(
    world: tuple[Console, Scenario], page: Page
) -> None:
    console, scenario = world
    console.sign_in(page, "auditor")
    page.goto(console.url + "#/policy")
    expect(page.get_by_role("heading", level=1)).to_have_text("Policy")
    history = rows(page, "Policy versions")
    expect(history).to_have_count(scenario.after)
    expect(history.first).to_contain_text("created RoleBinding ci-everything")  # the newest
    page.get_by_label("From revision").select_option(str(scenario.before))
    page.get_by_label("To revision").select_option(str(scenario.after))
    page.get_by_role("button", name="Show diff").click()
    summary = page.locator("#policy-diff-summary")
    expect(summary).to_have_text(
        f"Revision {scenario.before} → {scenario.after}: 1 grant(s) appeared, "
        "0 disappeared, 1 flagged as escalation."
    )
    grants = rows(page, "Effective grants")
    expect(grants).to_have_count(1)
    flagged = grants.first
    expect(flagged).to_have_class(re.compile(r"\bflagged\b"))
    # in words, not only in colour
    flags = flagged.locator("td[data-label='Escalation flags']")
    expect(flags).to_have_text("⚠ Escalation: wildcardsecretsbindescalateimpersonate")
    expect(flagged).to_have_attribute("aria-label", re.compile(r"^Escalation: wildcard, secrets"))
    expect(flagged.locator("td[data-label=Subject]")).to_have_text("ci")
    expect(flagged.locator("td[data-label=Cluster]")).to_have_text(scenario.dev)
    expect(flagged.locator("td[data-label=Change]")).to_have_text("+ appeared")

    # the row's own button compares a version with the one before it
    history.first.get_by_role("button").click()
    expect(summary).to_contain_text(f"Revision {scenario.after - 1} → {scenario.after}")
    # and back the other way nothing is flagged: the grant only disappears
    page.get_by_label("From revision").select_option(str(scenario.after))
    page.get_by_label("To revision").select_option(str(scenario.before))
    page.get_by_role("button", name="Show diff").click()
    expect(summary).to_contain_text("1 disappeared, 0 flagged")
    expect(grants.first.locator("td[data-label=Change]")).to_have_text(
        "\u2212 disappeared"
    )  # a minus sign


def explain(page: Page, cluster: str, workload: str, **request: str) -> None:
    page.get_by_label("Cluster").select_option(cluster)
    page.get_by_label("Identity is a").select_option("workload")
    page.get_by_label("Identity", exact=True).fill(workload)
    page.get_by_label("Request kind").select_option("resource")
    for label in ("Verb", "API group", "Resource", "Subresource", "Name", "Namespace"):
        page.get_by_label(label, exact=True).fill("")
    for label, value in request.items():
        page.get_by_label(label.capitalize(), exact=True).fill(value)
    page.get_by_role("button", name="Explain").click()


def test_explain_shows_allow_with_the_binding_and_deny_without(
    world: tuple[Console, Scenario], page: Page
) -> None:
    console, scenario = world
    console.sign_in(page, "approver")
    page.goto(console.url + "#/policy")
    expect(page.get_by_role("heading", name="Explain this decision")).to_be_visible()
    decision = page.locator("#policy-decision")
    deciders = rows(page, "Bindings that decide it")

    explain(page, scenario.prod, "payments", verb="get", resource="pods", namespace="shop")
    expect(decision.locator(".verdict")).to_have_text("✔ ALLOW")
    expect(decision).to_contain_text("allowed by RoleBinding shop-reads-pods (role pod-reader)")
    expect(deciders).to_have_count(1)
    expect(deciders.first.locator("td[data-label=RoleBinding]")).to_have_text("shop-reads-pods")
    expect(deciders.first.locator("td[data-label=Effect]")).to_have_text("allow")
    expect(deciders.first.locator("td[data-label='Rules that cover the request']")).to_contain_text(
        '"resources":["pods"]'
    )
    expect(page.locator("dl.facts")).to_contain_text("/ns/shop/sa/payments")

    # the diff above first, then the decision: the screenshot shows both parts of the page
    page.get_by_label("From revision").select_option(str(scenario.before))
    page.get_by_label("To revision").select_option(str(scenario.after))
    page.get_by_role("button", name="Show diff").click()
    expect(rows(page, "Effective grants")).to_have_count(1)
    page.evaluate("() => document.getElementById('policy-diff-summary').scrollIntoView()")
    screenshot(page, "policy")

    explain(page, scenario.prod, "payments", verb="delete", resource="pods", namespace="shop")
    expect(decision.locator(".verdict")).to_have_text("✖ DENY (no binding allows it)")
    expect(decision).to_contain_text("default deny")
    expect(deciders).to_have_count(1)
    expect(deciders.first).to_have_text(
        "None: no binding covers this request for this identity (default deny)."
    )

    explain(page, scenario.prod, "payments", verb="get", resource="secrets", namespace="shop")
    expect(decision.locator(".verdict")).to_have_text("✖ DENY (explicit deny)")
    expect(deciders.first.locator("td[data-label=RoleBinding]")).to_have_text(
        "no-secrets-for-payments"
    )
    expect(deciders.first.locator("td[data-label=Effect]")).to_have_text("deny")


def test_explain_shows_the_servers_refusal_of_bad_input(
    world: tuple[Console, Scenario], browser: Browser
) -> None:
    console, scenario = world
    page = open_page(browser)
    try:
        console.sign_in(page, "auditor")
        page.goto(console.url + "#/policy")
        explain(page, scenario.prod, "ghost", verb="get", resource="pods")
        expect(page.locator("#policy-explain-result [role=alert]")).to_have_text(
            "identity.workload 'ghost' is not a registered Workload nor an identity a "
            "WorkloadTemplate gives"
        )
        # the browser reports the refused request itself; nothing else went wrong
        assert [m for m in problems(page) if "status of 400" not in m] == []
    finally:
        page.context.close()


def test_the_pages_fit_a_phone(world: tuple[Console, Scenario], browser: Browser) -> None:
    console, _ = world
    page = open_page(browser, PHONE)
    try:
        console.sign_in(page, "auditor")
        for name in ("workloads", "policy"):
            page.goto(f"{console.url}#/{name}")
            expect(page.get_by_role("heading", level=1)).to_have_text(name.capitalize())
            expect(page.locator("main table").first).to_be_visible()
            width = page.evaluate("() => document.documentElement.scrollWidth")
            assert width <= PHONE["width"], f"{name} is {width} px wide at a 390 px viewport"
        assert not problems(page)
    finally:
        page.context.close()


LAYOUT = """() => [...document.querySelectorAll('form.explain label')].map((label) => {
  const l = label.getBoundingClientRect();
  const c = document.getElementById(label.htmlFor).getBoundingClientRect();
  return {name: label.textContent, label: [l.left, l.top, l.bottom], control: [c.left, c.top, c.right]};
})"""


def test_the_explain_form_is_a_grid_of_labels_and_inputs_and_stacks_on_a_phone(
    world: tuple[Console, Scenario], browser: Browser
) -> None:
    console, _ = world
    for viewport in (None, PHONE):
        page = open_page(browser, viewport) if viewport else open_page(browser)
        try:
            console.sign_in(page, "auditor")
            page.goto(console.url + "#/policy")
            expect(page.get_by_label("Verb")).to_be_visible()
            boxes = page.evaluate(LAYOUT)
            names = [b["name"] for b in boxes]
            assert {"Cluster", "Identity", "Request kind", "Verb", "Namespace"} <= set(names)
            if viewport is None:  # 1280 x 800: one label column, one input column
                assert len({round(b["control"][0]) for b in boxes}) == 1, boxes
                assert all(b["control"][0] > b["label"][0] + 50 for b in boxes), boxes
                assert all(abs(b["control"][1] - b["label"][1]) < 20 for b in boxes), boxes
            else:  # a phone: each label above its input, all at the left edge, no scrolling
                assert all(b["label"][2] <= b["control"][1] + 1 for b in boxes), boxes
                assert all(abs(b["control"][0] - b["label"][0]) < 20 for b in boxes), boxes
                assert all(b["control"][2] <= PHONE["width"] for b in boxes), boxes
            assert not problems(page)
        finally:
            page.context.close()
