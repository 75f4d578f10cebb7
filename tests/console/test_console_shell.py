"""The console's shell in a real browser: the sign-in form, the header naming the
person and their role, the navigation between the seven pages, and sign-out (after
which the session is gone on the server too)."""

from __future__ import annotations

from console_support import PHONE, Console, open_page, problems, screenshot
from playwright.sync_api import Page, expect

PAGES = {
    "overview": "Overview",
    "workloads": "Workloads",
    "policy": "Policy",
    "audit": "Audit",
    "access": "Access requests",
    "anomalies": "Anomalies",
    "graph": "Who calls whom",
}


def test_sign_in_shows_the_person_and_role_then_sign_out_ends_the_session(
    console: Console, page: Page
) -> None:
    page.goto(console.url)
    form = page.get_by_role("form", name="Sign in")
    expect(form).to_be_visible()
    expect(page.locator("#nav")).to_be_hidden()
    screenshot(page, "signin")

    console.sign_in(page, "auditor")
    expect(page.locator("#who-person")).to_have_text("console-auditor")
    expect(page.locator("#who-role")).to_have_text("auditor")
    assert page.url.endswith("#/overview")
    cookies = page.context.cookies()
    assert [(c["name"], c["httpOnly"], c["sameSite"]) for c in cookies] == [
        ("trustmesh_session", True, "Strict")
    ]
    assert page.evaluate("() => document.cookie") == ""  # HttpOnly: no script reads it
    assert page.evaluate("() => localStorage.length + sessionStorage.length") == 0
    assert console.tokens["auditor"] not in page.url

    # the session survives a reload (the cookie, not anything the page stored)
    page.reload()
    expect(page.locator("#who-person")).to_have_text("console-auditor")

    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("form", name="Sign in")).to_be_visible()
    expect(page.locator("#who")).to_be_hidden()
    # the server forgot it: the old cookie does not work any more
    answer = page.request.get(console.server.url + "/console/session")
    assert answer.status == 401
    assert answer.json()["error"] == "invalid_token"


def test_a_wrong_credential_is_refused_with_the_servers_message(
    console: Console, page: Page
) -> None:
    console.sign_in(page, "auditor", token="tmu_0000_not-a-credential")
    alert = page.locator("#sign-in-error")
    expect(alert).to_be_visible()
    expect(alert).to_contain_text("not valid")
    expect(page.locator("#nav")).to_be_hidden()


def test_every_page_is_reachable_from_the_navigation(console: Console, page: Page) -> None:
    console.sign_in(page, "approver")
    nav = page.get_by_role("navigation", name="Console pages")
    for name, title in PAGES.items():
        nav.get_by_role("link", name=title, exact=True).click()
        expect(page).to_have_url(f"{console.url}#/{name}")
        expect(page.get_by_role("heading", level=1)).to_have_text(title)
        expect(nav.get_by_role("link", name=title, exact=True)).to_have_attribute(
            "aria-current", "page"
        )


def test_the_shell_works_at_phone_width(console: Console, browser: object) -> None:
    page = open_page(browser, PHONE)  # type: ignore[arg-type]
    try:
        console.sign_in(page, "admin")
        nav = page.get_by_role("navigation", name="Console pages")
        expect(nav).to_be_visible()
        width = page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page is {width} px wide at a 390 px viewport"
        nav.get_by_role("link", name="Anomalies").click()
        expect(page.get_by_role("heading", level=1)).to_have_text("Anomalies")
        assert not problems(page)
    finally:
        page.context.close()
