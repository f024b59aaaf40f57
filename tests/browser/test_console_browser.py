"""The console in a real browser: Debian's chromium, driven by chromium-driver through
Selenium, against a TLS cluster (HTTPS console, Secure cookies).

- By keyboard only: log in (Tab, type, Enter), open a job, watch its progress change
  without a reload (the page's script), and cancel it through the confirmation step.
- With JavaScript off, the job page still shows the job's counts.
- An admin pauses a running job from its page: the sink gets no more of it until it is
  resumed from the page.
- A node whose relay is down is shown on the nodes page with that relay's breaker open.
- A tenant sees none of another tenant's jobs, listed or by URL; that tenant sees them.
- Every page is saved as a PNG in ``test-artifacts/console/`` at the repository's root
  (kept by CI as the run's artifacts; each test saves the pages it visits).

One cluster for the module: two tenants and an admin in its auth file, a sink that takes
20 ms per message and one connection per node (so a few thousand recipients take tens of
seconds), and node1 relaying to a sink of its own (stopped, then started again, by the
breaker test).

The dev CA's certificates are accepted with ``--ignore-certificate-errors``, in this
test's throwaway browser profile only. Skipped without chromium and chromedriver
locally; a failure in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import (
    NoSuchElementException,
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver

from client_sdk import Address, JobOptions, JobState, MailerError, MessageContent, Recipient
from coordinator.auth import hash_token
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import assert_eventually, assert_stays, unavailable, wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("browser")]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "mlr_browser-acme-token"
OTHER = "mlr_browser-globex-token"
"""Tenant globex's: the tenant acme must never see jobs of."""
ADMIN = "mlr_browser-admin-token"
CONTENT = MessageContent(sender=Address("ops@example.com"), subject="Browser", text_body="Hi")
WAIT_S = 30.0
"""Generous: the machine may be busy with other test processes."""
SINK_WAIT_S = 60.0
"""For mail to reach the sink (or a breaker to open) on a busy machine."""
PAUSE_TOTAL = 3000
"""At 20 ms per message and two connections, at least 30 s of sending: still running
when paused, and again after the resume."""
QUIET_S = 3.0
"""How long a paused job is watched at the sink (see the pause test)."""
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "console"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _require_chromium() -> None:
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        unavailable(
            "chromium is not installed (apt-get install chromium chromium-driver)",
            "chromium and chromium-driver are not installed on this CI machine",
        )


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    _require_chromium()
    base = tmp_path_factory.mktemp("console-browser")
    auth = base / "auth.json"
    tenants = {
        "acme": {"tokens": [hash_token(TOKEN)]},
        "globex": {"tokens": [hash_token(OTHER)]},
    }
    auth.write_text(json.dumps({"tenants": tenants, "admins": [hash_token(ADMIN)]}))
    c = start_cluster(
        base,
        ClusterSpec(
            tls=True,
            nodes=2,
            coordinator_env={"MAILER_AUTH_FILE": str(auth)},
            node_env={"MAILER_SMTP_CONNECTIONS": "1"},
            sink_args=("--delay-ms", "20"),
            own_sink_nodes=(1,),
        ),
    )
    try:
        asyncio.run(_nodes_ready(c))
        yield c
    finally:
        _stop(c)


def _stop(cluster: LocalCluster) -> None:
    """Stop the nodes, then the coordinators, each group at once (each process may take
    seconds to drain or resign, and none waits for another), then the rest."""
    for group in (list(cluster.nodes.values()), list(cluster.coordinators.values())):
        with ThreadPoolExecutor(max_workers=len(group) or 1) as pool:
            list(pool.map(lambda proc: proc.stop(), group))
    cluster.stop()


async def _nodes_ready(cluster: LocalCluster) -> None:
    async with cluster.client(token=ADMIN) as admin:
        await wait_nodes_active(admin, cluster.spec.nodes)


async def _submit(
    cluster: LocalCluster, count: int, wait: bool, token: str = TOKEN, name: str = ""
) -> str:
    recipients = [Recipient(f"b{i}@ok.example") for i in range(count)]
    async with cluster.client(token=token) as client:
        job = await client.submit(CONTENT, recipients, options=JobOptions(name=name))
        if wait:
            await client.wait(job.job_id)
    return job.job_id


async def _state(cluster: LocalCluster, job_id: str) -> JobState:
    async with cluster.client(token=TOKEN) as acme:
        return (await acme.get(job_id)).state


async def _cancel(cluster: LocalCluster, job_id: str) -> None:
    """Stop a test's job so it sends nothing during the next tests (it may be over)."""
    async with cluster.client(token=ADMIN) as admin:
        with contextlib.suppress(MailerError):
            await admin.cancel(job_id)


def _sent(cluster: LocalCluster, job_id: str) -> int:
    """Messages of the job the sinks hold (each Message-ID once)."""
    ids = {str(line["message_id"]) for line in cluster.delivered()}
    return sum(1 for i in ids if i.startswith(f"<{job_id}."))


def _chromium(profile: Path, javascript: bool) -> WebDriver:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--ignore-certificate-errors", f"--user-data-dir={profile}",
        "--window-size=1280,1024",
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


def _until(
    check: Callable[[], bool], message: str, timeout_s: float = WAIT_S, interval_s: float = 0.1
) -> None:
    """Poll ``check``; a page still loading (element missing or replaced) is "not yet"."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (NoSuchElementException, StaleElementReferenceException):
            pass
        except WebDriverException as exc:
            if not _replaced(exc):
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not within {timeout_s:g} s")
        time.sleep(interval_s)


def _replaced(exc: WebDriverException) -> bool:
    """Whether chromedriver reports an element of a page being replaced. It sometimes
    says so as an unknown error from the inspector rather than as a stale element
    (SeleniumHQ/selenium#15401): seen here reading the heading while a log-in went on
    to the next page."""
    return "Node with given id does not belong to the document" in (exc.msg or "")


def _h1(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "h1").text


def _until_page(driver: WebDriver, title: str) -> None:
    """Wait for the page whose heading is ``title``."""
    _until(lambda: _h1(driver) == title, f"the page {title!r}")


def _shot(driver: WebDriver, page: str) -> Path:
    """Save what the browser shows as ``<ARTIFACTS>/<page>.png`` (any older one first
    removed, so a file found there is this run's)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{page}.png"
    path.unlink(missing_ok=True)
    assert driver.save_screenshot(str(path)), f"no screenshot of {page}"
    return path


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's header; (0, 0) when the file is no PNG."""
    data = path.read_bytes() if path.is_file() else b""
    if not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        return (0, 0)
    width, height = struct.unpack(">II", data[16:24])
    return width, height


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


def _log_in(driver: WebDriver, cluster: LocalCluster, token: str = TOKEN) -> None:
    """Log in by keyboard: Tab to the token field, type, Enter; on the next page the
    first Tab reaches the skip link."""
    driver.get(cluster.console_url(0))
    assert _h1(driver) == "Log in"
    if not _focused(driver, "id", "token"):  # autofocus puts it there with JavaScript on
        _tab_to(driver, lambda d: _focused(d, "id", "token"))
    _press(driver, token, Keys.ENTER)
    _until_page(driver, "Jobs")
    _press(driver, Keys.TAB)
    assert _focused(driver, "class", "skip")


def _log_out(driver: WebDriver) -> None:
    driver.find_element(By.CSS_SELECTOR, "header form.logout button").click()
    _until_page(driver, "Log in")


def _job_url(cluster: LocalCluster, job_id: str, tail: str = "") -> str:
    return f"{cluster.console_url(0)}jobs/{job_id}" + (f"/{tail}" if tail else "")


def _shown_state(driver: WebDriver) -> str:
    """The state in the job page's summary (written by the server, not the script)."""
    return driver.find_element(By.CSS_SELECTOR, "main dd[data-count='state']").text


def _confirm_from_job_page(driver: WebDriver, action: str, done: str) -> None:
    """On a job's page: follow its link to ``action``'s confirmation page, tick the box,
    submit, and wait for the job's page to say ``Job <done>.``."""
    driver.find_element(By.CSS_SELECTOR, f"main a.button[href$='/{action}']").click()
    _until(lambda: _h1(driver).startswith(f"{action.capitalize()} job"), f"confirm {action}")
    _shot(driver, f"confirm-{action}")
    driver.find_element(By.ID, "confirm").click()
    driver.find_element(By.CSS_SELECTOR, "main form button[type='submit']").click()
    notice = f"Job {done}."
    _until(lambda: notice in driver.find_element(By.CSS_SELECTOR, "main .notice").text, notice)


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
    _until(lambda: "Job " in _h1(driver), "the job page")
    # Then its progress numbers change while the page stays the same document
    driver.execute_script("window.sameDocument = true;")
    first = _done(driver)
    _until(lambda: _done(driver) > first, "a live progress update")
    assert driver.execute_script("return window.sameDocument === true;")
    bar = driver.find_element(By.CSS_SELECTOR, "main progress")
    assert int(bar.get_attribute("value") or 0) >= first
    _shot(driver, "job-live-progress")
    # When they cancel through the confirmation step, by keyboard
    _tab_to(driver, lambda d: _focused(d, "href", "/cancel"))
    _press(driver, Keys.ENTER)
    _until(lambda: "Cancel job" in _h1(driver), "confirm")
    _shot(driver, "confirm-cancel")
    _tab_to(driver, lambda d: _focused(d, "id", "confirm"))
    _press(driver, Keys.SPACE)
    _tab_to(driver, lambda d: d.switch_to.active_element.tag_name == "button")
    _press(driver, Keys.ENTER)
    # Then the job is cancelled, and the page says so
    _until(lambda: "Job cancelled." in driver.page_source, "the cancelled notice")
    _shot(driver, "job-cancelled")
    assert asyncio.run(_state(tls_cluster, job_id)) is JobState.CANCELLED


def test_the_job_page_shows_counts_without_javascript(
    tls_cluster: LocalCluster, browser: Callable[[bool], WebDriver]
) -> None:
    job_id = asyncio.run(_submit(tls_cluster, 30, wait=True))
    driver = browser(False)
    _log_in(driver, tls_cluster)
    driver.get(_job_url(tls_cluster, job_id))
    counts = driver.find_element(By.CSS_SELECTOR, "main [data-count='delivered']")
    assert counts.text == "30"
    assert _done(driver) == 30
    assert driver.find_element(By.CSS_SELECTOR, "main [data-count='percent']").text == "100%"
    rows = driver.find_elements(By.CSS_SELECTOR, "main table tbody tr th[scope='row']")
    assert any(r.text.endswith("@ok.example") for r in rows)
    _shot(driver, "job-without-javascript")


def test_each_page_is_saved_as_a_screenshot(
    tls_cluster: LocalCluster, browser: Callable[[bool], WebDriver]
) -> None:
    job_id = asyncio.run(_submit(tls_cluster, 20, wait=True, name="screenshots"))
    driver = browser(True)
    shots: list[Path] = []
    # Given the log-in page
    driver.get(tls_cluster.console_url(0))
    _until_page(driver, "Log in")
    shots.append(_shot(driver, "login"))
    # When an admin logs in and walks through every page by its links
    _log_in(driver, tls_cluster, ADMIN)
    shots.append(_shot(driver, "jobs"))
    driver.find_element(By.CSS_SELECTOR, f"main tr[data-job='{job_id}'] th a").click()
    _until_page(driver, "Job screenshots")
    shots.append(_shot(driver, "job"))
    # (a finished job offers no actions; its confirmation page is still served)
    driver.get(_job_url(tls_cluster, job_id, "cancel"))
    _until_page(driver, "Cancel job screenshots?")
    shots.append(_shot(driver, "confirmation"))
    for link, title, page in (
        ("Nodes", "Nodes", "nodes"),
        ("Throughput", "Throughput, last hour", "throughput"),
        ("Suppressions", "Suppression list", "suppressions"),
    ):
        driver.find_element(By.LINK_TEXT, link).click()
        _until_page(driver, title)
        shots.append(_shot(driver, page))
    # Then each page is a non-empty PNG in the artifacts directory
    for shot in shots:
        assert shot.parent == ARTIFACTS and shot.stat().st_size > 0, shot
        assert min(_png_size(shot)) > 0, f"{shot} is no PNG with pixels"
    names = {s.stem for s in shots}
    assert names == {"login", "jobs", "job", "confirmation", "nodes", "throughput", "suppressions"}


def test_pausing_from_the_page_stops_sending_at_the_sink_until_resumed(
    tls_cluster: LocalCluster, browser: Callable[[bool], WebDriver]
) -> None:
    cluster = tls_cluster
    driver = browser(True)
    _log_in(driver, cluster, ADMIN)
    job_id = asyncio.run(_submit(cluster, PAUSE_TOTAL, wait=False, name="pause me"))
    try:
        # Given a job whose mail is reaching the sink, open in an admin's browser
        asyncio.run(
            assert_eventually(
                lambda: _sent(cluster, job_id) >= 20,
                timeout_s=SINK_WAIT_S,
                interval_s=0.2,
                message="the job's first mail at the sink",
            )
        )
        driver.refresh()  # the jobs page, which now lists the job
        driver.find_element(By.CSS_SELECTOR, f"main tr[data-job='{job_id}'] th a").click()
        _until_page(driver, "Job pause me")
        assert _shown_state(driver) == "running"
        _shot(driver, "job-running")
        # When the admin pauses it through the confirmation page
        _confirm_from_job_page(driver, "pause", "paused")
        # Then the page shows it paused
        assert _shown_state(driver) == "paused"
        _shot(driver, "job-paused")
        # And once the transactions already past their final dot have ended, the sink's
        # count of the job stops changing (two readings a second apart agree: at 20 ms
        # a message, a node still sending would add dozens in between)
        readings: list[int] = []

        def settled() -> bool:
            readings.append(_sent(cluster, job_id))
            return len(readings) >= 2 and readings[-1] == readings[-2]

        asyncio.run(
            assert_eventually(
                settled, timeout_s=WAIT_S, interval_s=1.0, message="the sink's count settled"
            )
        )
        at_pause = readings[-1]
        assert 0 < at_pause < PAUSE_TOTAL
        # ... and stays put. An absence cannot be awaited, so it is watched for QUIET_S:
        # 150 message times per connection at the sink's pace, while the pause took
        # effect on every node before the page said "paused".
        asyncio.run(
            assert_stays(
                lambda: _sent(cluster, job_id) == at_pause,
                for_s=QUIET_S,
                interval_s=0.2,
                message="no mail of the paused job at the sink",
            )
        )
        driver.refresh()
        _until(lambda: _shown_state(driver) == "paused", "the job page, still paused")
        # When the admin resumes it from the page
        _confirm_from_job_page(driver, "resume", "resumed")
        _shot(driver, "job-resumed")
        # Then the sink gets its mail again
        asyncio.run(
            assert_eventually(
                lambda: _sent(cluster, job_id) > at_pause,
                timeout_s=SINK_WAIT_S,
                interval_s=0.2,
                message="the resumed job's mail at the sink",
            )
        )
    finally:
        asyncio.run(_cancel(cluster, job_id))


def test_a_tenant_never_sees_another_tenants_jobs(
    tls_cluster: LocalCluster, browser: Callable[[bool], WebDriver]
) -> None:
    cluster = tls_cluster
    ours = asyncio.run(_submit(cluster, 5, wait=False, token=TOKEN, name="acme-private"))
    theirs = asyncio.run(_submit(cluster, 5, wait=False, token=OTHER, name="globex-private"))
    driver = browser(True)
    # Given tenant acme logged in
    _log_in(driver, cluster, TOKEN)
    _shot(driver, "jobs-of-tenant-acme")
    # Then its jobs page lists its job and nothing of globex's
    listed = driver.find_element(By.TAG_NAME, "main").get_attribute("innerHTML") or ""
    assert ours in listed and "acme-private" in listed
    assert theirs not in listed and "globex" not in listed
    # When acme opens globex's job, and its confirmation page, by URL
    for tail in ("", "cancel"):
        driver.get(_job_url(cluster, theirs, tail))
        # Then there is no such job, as far as acme can tell
        _until_page(driver, "Not found")
        shown = driver.find_element(By.TAG_NAME, "main").get_attribute("innerHTML") or ""
        assert "globex" not in shown and theirs not in shown
    _shot(driver, "job-of-another-tenant")
    # When globex logs in instead
    _log_out(driver)
    _log_in(driver, cluster, OTHER)
    _shot(driver, "jobs-of-tenant-globex")
    # Then it sees its own job, and nothing of acme's
    listed = driver.find_element(By.TAG_NAME, "main").get_attribute("innerHTML") or ""
    assert theirs in listed and "globex-private" in listed
    assert ours not in listed and "acme-private" not in listed
    driver.get(_job_url(cluster, theirs))
    _until_page(driver, "Job globex-private")
    driver.get(_job_url(cluster, ours))
    _until_page(driver, "Not found")


def test_a_node_whose_relay_is_down_shows_its_relay_breaker_open(
    tls_cluster: LocalCluster, browser: Callable[[bool], WebDriver]
) -> None:
    cluster = tls_cluster
    down = cluster.node_sinks[1]
    assert down.proc is not None and cluster.sink is not None
    driver = browser(True)
    _log_in(driver, cluster, ADMIN)
    # Given node1's relay is down: its sink is stopped, connections are refused
    down.proc.stop()
    job_id = ""
    try:
        # When a job sends (node1 gets batches until its faults open the breaker)
        job_id = asyncio.run(_submit(cluster, 600, wait=False, name="relay down"))

        # Then the nodes page, reloaded until it does, shows node1's relay breaker open
        def relay_shown_open() -> bool:
            driver.get(f"{cluster.console_url(0)}nodes")
            item = driver.find_element(
                By.CSS_SELECTOR, f"main tr[data-node='node1'] li[data-relay='{down.address}']"
            )
            return item.get_attribute("data-breaker") == "open"

        _until(relay_shown_open, "node1's relay breaker open", SINK_WAIT_S, interval_s=0.5)
        _shot(driver, "nodes-relay-breaker-open")
        row = driver.find_element(By.CSS_SELECTOR, "main tr[data-node='node1']")
        assert f"{down.address}: open," in row.text
        # And node0's relay (the shared sink, up) is shown closed
        other = driver.find_element(By.CSS_SELECTOR, "main tr[data-node='node0'] li[data-relay]")
        assert other.get_attribute("data-breaker") == "closed"
        assert f"{cluster.relay}: closed," in other.text
    finally:
        if job_id:
            asyncio.run(_cancel(cluster, job_id))
        # The relay comes back for whatever runs next: start_sink starts the shared
        # sink and every stopped node sink, so the shared one is stopped first.
        cluster.sink.stop()
        cluster.start_sink()
