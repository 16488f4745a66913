"""The dashboard in a real browser: Playwright driving Debian's chromium (`apt-get install
chromium`; .ci/run installs it) against ``qless-pool web`` served as a process. A console error
or a Content-Security-Policy violation fails the test."""

from __future__ import annotations

import re
import shutil

import pytest
from pools import free_port
from webtools import WRITE_TOKEN, make_failed, serve, token_file
from workers import put

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt-get install chromium)"),
]

# Added before any page script runs: every CSP violation is kept for the test to read.
WATCH_CSP = """
window.__csp = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__csp.push(e.violatedDirective + " " + e.blockedURI));
"""


@pytest.fixture
def browser_page(redis_url, tmp_path):
    from playwright.sync_api import sync_playwright

    served = serve(redis_url, free_port(), tmp_path / "web.log", "--token-file",
                   str(token_file(tmp_path)))  # fmt: skip
    problems: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.add_init_script(WATCH_CSP)
                page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
                page.on("pageerror", lambda e: problems.append(str(e)))
                page.set_default_timeout(15_000)
                yield served, page
                csp = page.evaluate("window.__csp")
                assert csp == [], f"CSP violations: {csp}"
                assert problems == [], f"console errors: {problems}"
            finally:
                browser.close()
    finally:
        served.stop()


def test_log_in_retry_a_failed_job_and_a_whole_group(browser_page, client):
    from playwright.sync_api import expect

    served, page = browser_page
    base = served.base
    [one] = make_failed(client, "mail", "mail-Timeout", 1)
    make_failed(client, "mail", "mail-ValueError", 30)
    page.goto(base + "/failed")
    expect(page).to_have_url(re.compile(r"/login\?next="))
    page.fill("input[name=token]", WRITE_TOKEN)
    page.click("form.login button")
    expect(page).to_have_url(base + "/failed")
    expect(page.locator("header")).to_contain_text("alice (write)")

    page.click("text=mail-Timeout")
    page.click(f"text={one}")
    expect(page.locator("h1")).to_contain_text("failed")
    page.click("#retry")
    expect(page.locator(".flash")).to_contain_text("retried")
    page.goto(base + "/failed")
    expect(page.locator("#groups")).not_to_contain_text("mail-Timeout")
    assert client.jobs[one].state == "waiting"

    page.click("text=mail-ValueError")
    page.click("text=Retry all…")
    expect(page.locator("h1")).to_contain_text("Retry all 30 failed job(s) of mail-ValueError?")
    page.click("#confirm")
    expect(page.locator(".flash")).to_contain_text("retried 30 job(s) of mail-ValueError")
    expect(page.locator("#groups")).to_contain_text("No failed jobs.")
    assert client.queues["mail"].counts["waiting"] == 31
    log = served.log.read_text()  # every action, with the token's name
    assert f"alice: retry {one}: retried" in log and "alice: log in from 127.0.0.1" in log
    assert "alice: retry all of group mail-ValueError: 30 job(s), 0 refused" in log


def test_live_counts_change_after_a_put_without_a_reload(browser_page, client):
    from playwright.sync_api import expect

    served, page = browser_page
    base = served.base
    put(client, "mail", "Noop")
    page.goto(base + "/login")
    page.fill("input[name=token]", WRITE_TOKEN)
    page.click("form.login button")
    cell = page.locator('tr[data-queue="mail"] td[data-count="waiting"]')
    expect(cell).to_have_text("1")
    page.evaluate("window.__loaded = true")  # gone if the page were loaded again
    put(client, "mail", "Noop")
    put(client, "mail", "Noop", delay=600)
    expect(cell).to_have_text("2", timeout=10_000)
    expect(page.locator('tr[data-queue="mail"] td[data-count="scheduled"]')).to_have_text("1")
    expect(page.locator('[data-total="waiting"]')).to_have_text("2")
    expect(page.locator("#live")).to_contain_text("Counts as of")
    assert page.evaluate("window.__loaded") is True
