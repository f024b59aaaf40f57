"""The operators' console against a running cluster, driven by a plain HTTP client (no
JavaScript): log-in with tokens, jobs and results, nodes, suppressions, job control with
confirmation, CSRF, and tenants kept apart.

One cluster for the module: auth on (tenants ``acme`` and ``other``, one admin), a
relay that refuses @reject.example with 550 and takes 20 ms per message (one
connection per node), so a 600-recipient job is still running while it is paused,
resumed and cancelled. The console is coordinator0's; when coordinator1 leads, the
console's API calls follow the redirect.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from yarl import URL

from client_sdk import (
    Address,
    JobOptions,
    JobState,
    MailerClient,
    MessageContent,
    Recipient,
)
from coordinator.auth import hash_token
from mailers_dev.cluster import ClusterSpec, LocalCluster
from tests.helpers import assert_eventually, wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.integration

ACME = "mlr_console-acme-token"
OTHER = "mlr_console-other-token"
ADMIN = "mlr_console-admin-token"
REJECTED = 20
DONE_TOTAL = 100
SLOW_TOTAL = 600
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def write_auth(directory: Path) -> Path:
    """An auth file with tenants acme and other, and one admin."""
    path = directory / "auth.json"
    tenants = {"acme": {"tokens": [hash_token(ACME)]}, "other": {"tokens": [hash_token(OTHER)]}}
    path.write_text(json.dumps({"tenants": tenants, "admins": [hash_token(ADMIN)]}))
    return path


@dataclass(frozen=True)
class Jobs:
    done: str
    """Finished: DONE_TOTAL recipients, REJECTED of them refused with 550."""
    slow: str
    """Still running for a while (paused, resumed and cancelled by the tests)."""


async def _submit(cluster: LocalCluster) -> Jobs:
    async with MailerClient(cluster.coordinator_addresses, token=ADMIN) as admin:
        await wait_nodes_active(admin, cluster.spec.nodes)
    content = MessageContent(
        sender=Address("ops@example.com"), subject="Hello <b>there</b>", text_body="Hi"
    )
    done = [
        Recipient(f"r{i}@{'reject' if i < REJECTED else 'ok'}.example") for i in range(DONE_TOTAL)
    ]
    slow = [Recipient(f"s{i}@ok.example") for i in range(SLOW_TOTAL)]
    async with MailerClient(cluster.coordinator_addresses, token=ACME) as acme:
        first = await acme.submit(content, done, options=JobOptions(name="<i>welcome</i>"))
        await acme.wait(first.job_id)
        second = await acme.submit(content, slow, options=JobOptions(name="slow one"))
    return Jobs(first.job_id, second.job_id)


@pytest.fixture(scope="module")
def console_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    base = tmp_path_factory.mktemp("console")
    c = start_cluster(
        base,
        ClusterSpec(
            nodes=2,
            coordinator_env={"MAILER_AUTH_FILE": str(write_auth(base))},
            node_env={"MAILER_SMTP_CONNECTIONS": "1"},
            sink_args=("--delay-ms", "20", "--reject-pattern", r"@reject\.example$"),
        ),
    )
    yield c
    c.stop()


@pytest.fixture(scope="module")
def jobs(console_cluster: LocalCluster) -> Jobs:
    return asyncio.run(_submit(console_cluster))


class Browser:
    """A cookie-keeping HTTP client of the console, as a browser without JavaScript."""

    def __init__(self, http: aiohttp.ClientSession, base: str) -> None:
        self.http = http
        self.base = base.rstrip("/")
        self.csrf = ""

    async def get(self, path: str) -> tuple[int, str]:
        async with self.http.get(self.base + path) as response:
            text = await response.text()
        found = CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return response.status, text

    async def post(self, path: str, form: dict[str, str]) -> tuple[int, str]:
        async with self.http.post(self.base + path, data=form) as response:
            text = await response.text()
        found = CSRF.search(text)
        if found:
            self.csrf = found.group(1)
        return response.status, text

    async def login(self, token: str) -> tuple[int, str]:
        await self.get("/login")
        return await self.post("/login", {"csrf": self.csrf, "token": token})


@pytest.fixture
async def browser(console_cluster: LocalCluster) -> AsyncIterator[Browser]:
    jar = aiohttp.CookieJar(unsafe=True)  # the console listens on an IP address
    timeout = aiohttp.ClientTimeout(total=15)
    async with aiohttp.ClientSession(cookie_jar=jar, timeout=timeout) as http:
        yield Browser(http, console_cluster.console_url(0))


def _rows(page: str) -> list[str]:
    return re.findall(r"<tr><td>\d+</td>.*?</tr>", page)


async def test_a_tenant_logs_in_and_sees_its_jobs_with_progress(
    browser: Browser, jobs: Jobs
) -> None:
    # When acme logs in with its token
    await browser.get("/login")
    async with browser.http.post(
        browser.base + "/login", data={"csrf": browser.csrf, "token": ACME}, allow_redirects=False
    ) as response:
        cookie = response.headers.get("Set-Cookie", "")
        assert response.status == 303 and response.headers["Location"] == "/console/jobs"
    # The session cookie is a random id, HttpOnly and SameSite=Strict (Secure is for
    # HTTPS; this cluster runs plaintext): never the token
    assert cookie.startswith("mailers_console=") and ACME not in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/console" in cookie
    status, page = await browser.get("/jobs")
    # Then it lands on the jobs list, with both jobs, their counts and progress bars
    assert status == 200 and "<h1>Jobs</h1>" in page
    assert "Signed in as tenant acme" in page
    assert f'data-job="{jobs.done}"' in page and f'data-job="{jobs.slow}"' in page
    assert "&lt;i&gt;welcome&lt;/i&gt;" in page and "<i>" not in page
    row = page[page.index(f'data-job="{jobs.done}"') :].split("</tr>")[0]
    assert f'<progress max="{DONE_TOTAL}" value="{DONE_TOTAL}"' in row
    assert f'<td data-count="delivered">{DONE_TOTAL - REJECTED}</td>' in row
    assert f'<td data-count="failed">{REJECTED}</td>' in row
    # And the page's script reads the same numbers as JSON
    async with browser.http.get(browser.base + "/api/jobs") as response:
        data = await response.json()
    done = next(j for j in data["jobs"] if j["job_id"] == jobs.done)
    assert (done["failed"], done["done"], done["final"]) == (REJECTED, DONE_TOTAL, True)


async def test_results_filter_by_status_with_the_smtp_reply_and_page(
    browser: Browser, jobs: Jobs
) -> None:
    await browser.login(ACME)
    # When acme filters the finished job's results by failed (a plain GET form)
    status, page = await browser.get(f"/jobs/{jobs.done}?status=failed")
    # Then exactly the refused recipients show, each with the relay's 550 reply
    assert status == 200
    rows = _rows(page)
    assert len(rows) == REJECTED
    assert all("@reject.example" in r and "failed" in r and "550 5.1.1" in r for r in rows)
    assert "Hello &lt;b&gt;there&lt;/b&gt;" in page  # the subject, escaped
    # And the delivered ones come in pages of 50 with a next-page link
    _, first = await browser.get(f"/jobs/{jobs.done}?status=delivered")
    assert len(_rows(first)) == 50
    next_link = re.search(r'href="(/console/jobs/[^"]+page=[^"]+)">Next page', first)
    assert next_link is not None
    _, second = await browser.get(next_link.group(1).replace("&amp;", "&")[len("/console") :])
    assert len(_rows(second)) == DONE_TOTAL - REJECTED - 50
    assert not set(_rows(first)) & set(_rows(second))


async def test_another_tenant_cannot_see_the_job(browser: Browser, jobs: Jobs) -> None:
    await browser.login(OTHER)
    _, listing = await browser.get("/jobs")
    assert jobs.done not in listing and "No jobs yet." in listing
    status, page = await browser.get(f"/jobs/{jobs.done}")
    assert status in (403, 404) and "Hello" not in page
    status, _ = await browser.get(f"/jobs/{jobs.slow}/cancel")
    assert status in (403, 404)


async def test_tokens_the_api_refuses_log_nobody_in(browser: Browser) -> None:
    status, page = await browser.login("mlr_not-a-token")
    assert status == 401 and "not accepted" in page
    status, page = await browser.get("/jobs")
    assert "<h1>Log in</h1>" in page  # redirected to the log-in form


async def test_nodes_page_for_admins_only(browser: Browser, jobs: Jobs) -> None:
    await browser.login(ACME)
    status, page = await browser.get("/nodes")
    assert status == 403 and "admin" in page
    await browser.login(ADMIN)
    status, page = await browser.get("/nodes")
    assert status == 200 and "Signed in as an admin" in page
    for node in ("node0", "node1"):
        assert f'<th scope="row">{node}</th>' in page
    assert "127.0.0.1:" in page and "Leader: coordinator" in page


async def test_suppression_add_search_remove(browser: Browser) -> None:
    await browser.login(ACME)
    await browser.get("/suppressions")
    # When acme suppresses an address
    status, page = await browser.post(
        "/suppressions", {"csrf": browser.csrf, "email": "Blocked.Person@Example.com"}
    )
    assert status == 200 and "Address suppressed." in page
    # Then a search finds it (lower-cased), and another tenant does not see it
    _, found = await browser.get("/suppressions?q=blocked.per")
    assert '<th scope="row">blocked.person@example.com</th>' in found
    assert "manual" in found
    # When it is removed, the search finds nothing
    status, page = await browser.post(
        "/suppressions/remove", {"csrf": browser.csrf, "email": "blocked.person@example.com"}
    )
    assert status == 200 and "Address removed." in page
    _, after = await browser.get("/suppressions?q=blocked.per")
    assert "blocked.person@example.com" not in after and "No suppressed address" in after


async def _state(cluster: LocalCluster, job_id: str) -> JobState:
    async with MailerClient(cluster.coordinator_addresses, token=ACME) as acme:
        return (await acme.get(job_id)).state


async def test_a_post_without_the_csrf_token_is_refused(
    browser: Browser, jobs: Jobs, console_cluster: LocalCluster
) -> None:
    await browser.login(ACME)
    before = await _state(console_cluster, jobs.slow)
    for form in ({"confirm": "yes"}, {"confirm": "yes", "csrf": "forged"}):
        status, page = await browser.post(f"/jobs/{jobs.slow}/cancel", form)
        assert status == 403 and "CSRF" in page
    status, _ = await browser.post("/suppressions", {"email": "x@example.com"})
    assert status == 403
    status, _ = await browser.post("/logout", {})
    assert status == 403
    assert await _state(console_cluster, jobs.slow) is before


async def _act(browser: Browser, job_id: str, action: str) -> tuple[int, str]:
    """Open the confirmation page, then confirm."""
    await browser.get(f"/jobs/{job_id}/{action}")
    return await browser.post(f"/jobs/{job_id}/{action}", {"csrf": browser.csrf, "confirm": "yes"})


async def test_pause_resume_and_cancel_each_with_confirmation(
    browser: Browser, jobs: Jobs, console_cluster: LocalCluster
) -> None:
    await browser.login(ADMIN)
    # The confirmation step: a page, then a POST without the box ticked changes nothing
    status, page = await browser.get(f"/jobs/{jobs.slow}/pause")
    assert status == 200 and 'name="confirm"' in page and "required" in page
    status, page = await browser.post(f"/jobs/{jobs.slow}/pause", {"csrf": browser.csrf})
    assert status == 400 and "Tick the box" in page
    assert await _state(console_cluster, jobs.slow) is JobState.RUNNING
    # An admin pauses and resumes (the admin API's calls)
    for action, state in (("pause", JobState.PAUSED), ("resume", JobState.RUNNING)):
        status, page = await _act(browser, jobs.slow, action)
        assert status == 200 and f'<dd data-count="state">{state.value}</dd>' in page
        assert f"Job {action}d." in page
        assert await _state(console_cluster, jobs.slow) is state
    # A tenant may not pause (the API refuses it), but cancels its own job
    await browser.login(ACME)
    status, page = await _act(browser, jobs.slow, "pause")
    assert status == 403 and "admin" in page
    status, page = await _act(browser, jobs.slow, "cancel")
    assert status == 200 and '<dd data-count="state">cancelled</dd>' in page
    assert await _state(console_cluster, jobs.slow) is JobState.CANCELLED

    # A cancelled job offers no actions any more once settled
    async def settled() -> bool:
        _, page = await browser.get(f"/jobs/{jobs.slow}")
        return "<h2>Actions</h2>" not in page

    await assert_eventually(settled, timeout_s=15, message="cancel settled")


async def test_throughput_shows_the_last_hour(browser: Browser, jobs: Jobs) -> None:
    await browser.login(ACME)
    status, page = await browser.get("/throughput")
    assert status == 200 and "<svg" in page
    totals = re.search(r"Last hour: (\d+) delivered, (\d+) failed", page)
    assert totals is not None and int(totals.group(1)) >= DONE_TOTAL - REJECTED
    # Another tenant's chart holds none of acme's events
    await browser.login(OTHER)
    _, page = await browser.get("/throughput")
    assert "Last hour: 0 delivered, 0 failed." in page


async def test_log_out_ends_the_session(browser: Browser) -> None:
    await browser.login(ACME)
    status, page = await browser.post("/logout", {"csrf": browser.csrf})
    assert status == 200 and "<h1>Log in</h1>" in page
    _, page = await browser.get("/jobs")
    assert "<h1>Log in</h1>" in page
    cookie = browser.http.cookie_jar.filter_cookies(URL(browser.base))
    assert "mailers_console" not in cookie
