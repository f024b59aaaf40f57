"""The console in a real browser: Debian's chromium, driven by chromium-driver through
Selenium, against a TLS cluster (HTTPS console, Secure cookies).

- By keyboard only: log in (Tab, type, Enter), open a job, watch its progress change
  without a reload (the page's script), and cancel it through the confirmation step.
- With JavaScript off, the job page still shows the job's counts.

The dev CA's certificates are accepted with ``--ignore-certificate-errors``, in this
test's throwaway browser profile only. Skipped without chromium and chromedriver
locally; a failure in CI.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from client_sdk import Address, JobState, MessageContent, Recipient
from coordinator.auth import hash_token
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("browser")]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "mlr_browser-acme-token"
ADMIN = "mlr_browser-admin-token"
CONTENT = MessageContent(sender=Address("ops@example.com"), subject="Browser", text_body="Hi")
WAIT_S = 30.0
"""Generous: the machine may be busy with other test processes."""


def _require_chromium() -> None:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromium-driver are not installed on this CI machine")
        pytest.skip("chromium is not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    _require_chromium()
    base = tmp_path_factory.mktemp("console-browser")
    auth = base / "auth.json"
    tenants = {"acme": {"tokens": [hash_token(TOKEN)]}}
    auth.write_text(json.dumps({"tenants": tenants, "admins": [hash_token(ADMIN)]}))
    c = start_cluster(
        base,
        ClusterSpec(
            tls=True,
            nodes=2,
            coordinator_env={"MAILER_AUTH_FILE": str(auth)},
            node_env={"MAILER_SMTP_CONNECTIONS": "1"},
            sink_args=("--delay-ms", "20"),
        ),
    )
    try:
        asyncio.run(_nodes_ready(c))
        yield c
    finally:
        c.stop()


async def _nodes_ready(cluster: LocalCluster) -> None:
    async with cluster.client(token=ADMIN) as admin:
        await wait_nodes_active(admin, cluster.spec.nodes)


async def _submit(cluster: LocalCluster, count: int, wait: bool) -> str:
    recipients = [Recipient(f"b{i}@ok.example") for i in range(count)]
    async with cluster.client(token=TOKEN) as acme:
        job = await acme.submit(CONTENT, recipients)
        if wait:
            await acme.wait(job.job_id)
    return job.job_id


async def _state(cluster: LocalCluster, job_id: str) -> JobState:
    async with cluster.client(token=TOKEN) as acme:
        return (await acme.get(job_id)).state


def _chromium(profile: Path, javascript: bool) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--ignore-certificate-errors", f"--user-data-dir={profile}",
    ):  # fmt: skip
        options.add_argument(flag)
    if not javascript:
        options.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2}
        )
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    return driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Callable[[bool], WebDriver]]:
    """Starts chromium (with JavaScript or without) in a fresh profile; quits it after."""
    started: list[WebDriver] = []

    def start(javascript: bool = True) -> WebDriver:
        driver = _chromium(tmp_path / f"profile{len(started)}", javascript)
        started.append(driver)
        return driver

    yield start
    for driver in started:
        driver.quit()


def _until(check: Callable[[], bool], message: str) -> None:
    """Poll ``check``; a page still loading (element missing or replaced) is "not yet"."""
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            if check():
                return
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not within {WAIT_S:g} s")
        time.sleep(0.1)


def _press(driver: WebDriver, *keys: str) -> None:
    """Keys as a keyboard sends them: to whatever has the focus."""
    ActionChains(driver).send_keys(*keys).perform()


def _tab_to(driver: WebDriver, matches: Callable[[WebDriver], bool], most: int = 40) -> None:
    """Press Tab until the focused element matches (as a keyboard user would)."""
    for _ in range(most):
        _press(driver, Keys.TAB)
        if matches(driver):
            return
    raise AssertionError("never reached by Tab")


def _focused(driver: WebDriver, attribute: str, contains: str) -> bool:
    value = driver.switch_to.active_element.get_attribute(attribute) or ""
    return contains in value


def _log_in(driver: WebDriver, cluster: LocalCluster) -> None:
    """Log in by keyboard: Tab to the token field, type, Enter; on the next page the
    first Tab reaches the skip link."""
    driver.get(cluster.console_url(0))
    assert driver.find_element(By.TAG_NAME, "h1").text == "Log in"
    if not _focused(driver, "id", "token"):  # autofocus puts it there with JavaScript on
        _tab_to(driver, lambda d: _focused(d, "id", "token"))
    _press(driver, TOKEN, Keys.ENTER)
    _until(lambda: driver.find_element(By.TAG_NAME, "h1").text == "Jobs", "the jobs page")
    _press(driver, Keys.TAB)
    assert _focused(driver, "class", "skip")


def _done(driver: WebDriver) -> int:
    return int(driver.find_element(By.CSS_SELECTOR, "main [data-count='done']").text)


def test_keyboard_only_login_live_progress_and_cancel(
    tls_cluster: LocalCluster, browser: Callable[[bool], WebDriver]
) -> None:
    driver = browser(True)
    job_id = asyncio.run(_submit(tls_cluster, 1500, wait=False))
    # Given an operator who logged in with the keyboard alone
    _log_in(driver, tls_cluster)
    session = next(c for c in driver.get_cookies() if c["name"] == "mailers_console")
    assert session["secure"] and session["httpOnly"] and session["sameSite"] == "Strict"
    # When they Tab to the running job and press Enter
    _tab_to(driver, lambda d: _focused(d, "href", job_id))
    _press(driver, Keys.ENTER)
    _until(lambda: "Job " in driver.find_element(By.TAG_NAME, "h1").text, "the job page")
    # Then its progress numbers change while the page stays the same document
    driver.execute_script("window.sameDocument = true;")
    first = _done(driver)
    _until(lambda: _done(driver) > first, "a live progress update")
    assert driver.execute_script("return window.sameDocument === true;")
    bar = driver.find_element(By.CSS_SELECTOR, "main progress")
    assert int(bar.get_attribute("value") or 0) >= first
    # When they cancel through the confirmation step, by keyboard
    _tab_to(driver, lambda d: _focused(d, "href", "/cancel"))
    _press(driver, Keys.ENTER)
    _until(lambda: "Cancel job" in driver.find_element(By.TAG_NAME, "h1").text, "confirm")
    _tab_to(driver, lambda d: _focused(d, "id", "confirm"))
    _press(driver, Keys.SPACE)
    _tab_to(driver, lambda d: d.switch_to.active_element.tag_name == "button")
    _press(driver, Keys.ENTER)
    # Then the job is cancelled, and the page says so
    _until(lambda: "Job cancelled." in driver.page_source, "the cancelled notice")
    assert asyncio.run(_state(tls_cluster, job_id)) is JobState.CANCELLED


def test_the_job_page_shows_counts_without_javascript(
    tls_cluster: LocalCluster, browser: Callable[[bool], WebDriver]
) -> None:
    job_id = asyncio.run(_submit(tls_cluster, 30, wait=True))
    driver = browser(False)
    _log_in(driver, tls_cluster)
    driver.get(f"{tls_cluster.console_url(0)}jobs/{job_id}")
    counts = driver.find_element(By.CSS_SELECTOR, "main [data-count='delivered']")
    assert counts.text == "30"
    assert _done(driver) == 30
    assert driver.find_element(By.CSS_SELECTOR, "main [data-count='percent']").text == "100%"
    rows = driver.find_elements(By.CSS_SELECTOR, "main table tbody tr th[scope='row']")
    assert any(r.text.endswith("@ok.example") for r in rows)
