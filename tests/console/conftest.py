"""The web console in a real browser (issue 16): Debian's ``chromium`` driven by
Playwright (its own browser downloads are not used). A missing browser FAILS the
tests, never skips them: the README's test command installs it.

Fixtures:

* ``browser`` (session): Chromium, headless.
* ``console`` (session): a real control plane (``helpers.start_server``) with three
  people added as ``trustmesh user add`` adds them (``POST /v1/people``): an admin, an
  approver and an auditor. ``console.tokens[role]`` is each one's credential,
  ``console.people[role]`` their name; ``console.server.admin`` is an API client with
  the admin person's credential (the bootstrap token stops working once an admin
  person exists). Tests that change people or global state add their own.
* ``page``: a fresh browser context (1280 x 800) and page; every message of the page's
  console and every uncaught error is collected in ``page.console_messages`` and
  checked at the end of the test (a CSP violation or a script error fails it).
* ``sign_in(page, role)``: signs the page in through the form and waits for the shell
  to name the person.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from helpers import Server, start_server

ROLES = ("admin", "approver", "auditor")
DOCS = Path(__file__).resolve().parent.parent.parent / "docs" / "console"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail(
            "Debian's chromium is not installed: apt-get install chromium (the README's "
            "test command does); the console's tests need a real browser"
        )
    return found


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=args)
        yield launched
        launched.close()


@dataclass
class Console:
    server: Server
    tokens: dict[str, str] = field(default_factory=dict)
    people: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return self.server.url + "/console/"

    def add_person(self, name: str, role: str) -> str:
        """A person added through the API ``trustmesh user add`` uses; their credential."""
        answer = self.server.admin.post("/v1/people", json={"name": name, "role": role})
        assert answer.status_code == 200, answer.text
        return str(answer.json()["token"])

    def client(self, role: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.server.url,
            headers={"Authorization": f"Bearer {self.tokens[role]}"},
            timeout=10,
        )

    def sign_in(self, page: Page, role: str, token: str | None = None) -> None:
        page.goto(self.url)
        page.get_by_label("Personal credential").fill(token or self.tokens[role])
        page.get_by_role("button", name="Sign in").click()
        if token is None:
            expect(page.locator("#who-person")).to_have_text(self.people[role])
            expect(page.locator("#who-role")).to_have_text(role)


def _with_people(server: Server) -> Console:
    console = Console(server)
    bootstrap = server.admin_token
    for role in ROLES:
        name = f"console-{role}"
        console.people[role] = name
        console.tokens[role] = console.add_person(name, role)
        if role == "admin":  # from now on the bootstrap token is refused
            server.admin.close()
            server._client = None
            server.admin_token = console.tokens["admin"]
    assert bootstrap != server.admin_token
    return console


@pytest.fixture(scope="session")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    server = start_server(tmp_path_factory.mktemp("console") / "data")
    yield _with_people(server)
    assert server.stop() == 0, server.process.stderr()


def open_page(browser: Browser, viewport: dict[str, int] = DESKTOP) -> Page:
    """A page in a context of its own, collecting its console messages and errors."""
    context = browser.new_context(viewport=viewport)  # type: ignore[arg-type]
    page = context.new_page()
    messages: list[str] = []
    page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
    page.console_messages = messages  # type: ignore[attr-defined]
    return page


def problems(page: Page) -> list[str]:
    """Script errors and CSP violations the page reported (a 401 of a signed-out
    page's first look at its session is expected, not a problem)."""
    messages: list[str] = page.console_messages  # type: ignore[attr-defined]
    return [
        m
        for m in messages
        if "Content Security Policy" in m
        or m.startswith("pageerror")
        or (m.startswith("error") and "status of 401" not in m)
    ]


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    opened = open_page(browser)
    yield opened
    wrong = problems(opened)
    opened.context.close()
    assert not wrong, "the page reported problems:\n" + "\n".join(wrong)


@pytest.fixture
def sign_in(console: Console) -> Callable[..., Any]:
    return console.sign_in
