"""The web console's fixtures (issue 16); what they build is in ``console_support.py``
(import it from there: ``conftest`` names a module in many test folders).

* ``browser`` (session): Debian's Chromium, headless, driven by Playwright. A missing
  browser FAILS the tests, never skips them: the README's test command installs it.
* ``console`` (session): a real control plane with an admin, an approver and an
  auditor (``console_support.Console``).
* ``page``: a fresh browser context (1280 x 800) whose console messages and uncaught
  errors are checked at the end of the test (a CSP violation or script error fails it).
* ``sign_in(page, role)``: signs the page in through the form.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from console_support import Console, chromium_path, open_page, problems, with_people
from playwright.sync_api import Browser, Page, sync_playwright

from helpers import start_server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One chromium per test file: Playwright's sync API keeps an event loop running in
    this thread while it is started, so it must stop before another file of the same
    worker calls ``asyncio.run``."""
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=args)
        yield launched
        launched.close()


@pytest.fixture(scope="session")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    server = start_server(tmp_path_factory.mktemp("console") / "data")
    yield with_people(server)
    assert server.stop() == 0, server.process.stderr()


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
