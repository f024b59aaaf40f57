"""The console's pure parts: every rendered value escaped, filters and paging parsed and
bounded, the throughput window bucketed."""

from __future__ import annotations

import html.parser
import re
from datetime import UTC, datetime

import pytest

from client_sdk.types import (
    Address,
    ClusterStatus,
    CoordinatorInfo,
    Job,
    JobOptions,
    JobProgress,
    JobState,
    MessageContent,
    NodeInfo,
    RecipientResult,
    RecipientStatus,
    RelayStatus,
    SmtpReply,
    Suppression,
    SuppressionReason,
)
from coordinator.console import query, views
from coordinator.console.throughput import per_minute, window_start_s
from coordinator.model import EventType

HOSTILE = '<script>alert("x")</script>'
VIEWER = views.Viewer(label='tenant <b>"acme"</b>', csrf='c"sr<f', admin=True)


class _Scripts(html.parser.HTMLParser):
    """Counts the elements and attributes a browser would treat as markup."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts = 0
        self.bold = 0
        self.handlers: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.scripts += tag == "script"
        self.bold += tag == "b"
        self.handlers += [name for name, _ in attrs if name.startswith("on")]


def _parsed(page: str) -> _Scripts:
    parser = _Scripts()
    parser.feed(page)
    return parser


def _job(state: JobState = JobState.RUNNING) -> Job:
    progress = JobProgress(
        job_id=f"j1{HOSTILE}",
        state=state,
        total=10,
        delivered=4,
        failed=2,
        queued=4,
        created_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    content = MessageContent(sender=Address("ops@example.com"), subject=HOSTILE, text_body="x")
    return Job(
        job_id=progress.job_id,
        idempotency_key="k",
        progress=progress,
        options=JobOptions(name=HOSTILE, tags=(HOSTILE,)),
        content=content,
    )


def _result() -> RecipientResult:
    return RecipientResult(
        index=3,
        email=f"a{HOSTILE}@reject.example",
        status=RecipientStatus.FAILED,
        reply=SmtpReply(550, "5.1.1", f"5.1.1 no such user {HOSTILE}"),
        attempts=1,
        feedback="hard_bounce",
    )


def test_the_jobs_page_escapes_every_value() -> None:
    # Given a job whose id, name and subject carry markup
    page = views.jobs_page(VIEWER, [_job()], next_page='n"&<', this_page="")
    # Then the page holds the one console script tag and nothing the values smuggled in
    found = _parsed(page)
    assert found.scripts == 1 and found.bold == 0 and not found.handlers
    assert "&lt;script&gt;" in page
    assert 'data-progress-url="/console/api/jobs"' in page
    # And the counts and a progress bar with its text equivalent are there
    assert '<td data-count="delivered">4</td>' in page
    assert '<progress max="10" value="6"' in page
    assert '<span data-count="percent">60%</span>' in page


def test_the_job_page_escapes_results_and_shows_reply_and_feedback() -> None:
    wanted = query.ResultsQuery(status=RecipientStatus.FAILED, page="")
    page = views.job_page(VIEWER, _job(), [_result()], 'p"1', wanted, "Job paused.")
    found = _parsed(page)
    assert found.scripts == 1 and found.bold == 0 and not found.handlers
    assert "550 5.1.1 no such user &lt;script&gt;" in page
    assert "hard bounce" in page
    assert '<option value="failed" selected>' in page
    # The next page link keeps the filter and escapes the API's token
    assert "status=failed&amp;page=p%221" in page
    # The job's id is percent-encoded in links
    assert "/console/jobs/j1%3Cscript%3E" in page
    # A running job offers pause and cancel, not resume
    assert "/pause" in page and "/cancel" in page and "/resume" not in page


def test_final_jobs_offer_no_actions_and_paused_ones_offer_resume() -> None:
    done = views.job_page(VIEWER, _job(JobState.COMPLETED), [], "", query.ResultsQuery())
    assert "Actions" not in done and "No recipients match." in done
    paused = views.job_page(VIEWER, _job(JobState.PAUSED), [], "", query.ResultsQuery())
    assert "/resume" in paused and "/pause" not in paused


def test_tenants_are_offered_cancel_only() -> None:
    # Pause and resume are the admin API's
    tenant = views.Viewer(label="tenant acme", csrf="c", admin=False)
    page = views.job_page(tenant, _job(), [], "", query.ResultsQuery())
    assert "/cancel" in page and "/pause" not in page and "/resume" not in page


def test_forms_carry_the_csrf_token_escaped() -> None:
    page = views.confirm_page(VIEWER, _job(), query.Action.CANCEL)
    assert '<input type="hidden" name="csrf" value="c&quot;sr&lt;f">' in page
    assert 'method="post"' in page and "required" in page
    assert page.count('name="csrf"') == 2  # the confirmation and the log-out form


def test_other_pages_escape_hostile_values() -> None:
    node = NodeInfo(node_id=HOSTILE, address=HOSTILE, relays=(RelayStatus(address=HOSTILE),))
    status = ClusterStatus(leader=CoordinatorInfo(HOSTILE, HOSTILE))
    suppression = Suppression(email=HOSTILE, reason=SuppressionReason.HARD_BOUNCE)
    view = views.SuppressionView([suppression], HOSTILE, HOSTILE, truncated=True)
    pages = [
        views.nodes_page(VIEWER, [node], status),
        views.suppressions_page(VIEWER, view),
        views.login_page(HOSTILE, HOSTILE),
        views.message_page(VIEWER, HOSTILE, HOSTILE),
    ]
    for page in pages:
        found = _parsed(page)
        assert found.scripts == 1 and found.bold == 0 and not found.handlers, page


def test_every_input_has_a_label() -> None:
    view = views.SuppressionView([], "", "", truncated=False)
    pages = [
        views.login_page("s"),
        views.suppressions_page(VIEWER, view),
        views.job_page(VIEWER, _job(), [], "", query.ResultsQuery()),
        views.confirm_page(VIEWER, _job(), query.Action.PAUSE),
    ]
    for page in pages:
        ids = re.findall(r'<(?:input|select)(?![^>]*type="hidden")[^>]*\bid="([^"]+)"', page)
        fields = re.findall(r'<(?:input|select)(?![^>]*type="hidden")[^>]*>', page)
        assert len(ids) == len(fields)
        for id_ in ids:
            assert f'<label for="{id_}">' in page
        assert '<main id="main"' in page and 'href="#main"' in page


def test_progress_data_is_what_the_script_reads() -> None:
    data = views.progress_data(_job().progress)
    assert data["done"] == 6 and data["percent"] == "60%" and data["final"] is False
    assert data["state"] == "running" and data["queued"] == 4


@pytest.mark.parametrize(
    ("params", "status", "page"),
    [
        ({}, None, ""),
        ({"status": "failed"}, RecipientStatus.FAILED, ""),
        ({"status": "", "page": "abc"}, None, "abc"),
    ],
)
def test_results_queries(params: dict[str, str], status: RecipientStatus | None, page: str) -> None:
    parsed = query.ResultsQuery.parse(params)
    assert (parsed.status, parsed.page) == (status, page)


@pytest.mark.parametrize(
    "params",
    [{"status": "bogus"}, {"status": "unspecified"}, {"page": "x" * 600}, {"page": "a\nb"}],
)
def test_bad_results_queries_are_refused(params: dict[str, str]) -> None:
    with pytest.raises(query.BadQuery):
        query.ResultsQuery.parse(params)


def test_result_links_keep_the_filter() -> None:
    wanted = query.ResultsQuery(RecipientStatus.DEFERRED)
    assert wanted.link("j/1") == "/console/jobs/j%2F1?status=deferred"
    assert wanted.link("j", "t&x") == "/console/jobs/j?status=deferred&page=t%26x"
    assert query.ResultsQuery().link("j") == "/console/jobs/j"


def test_actions_fields_and_tenants() -> None:
    assert query.action("cancel") is query.Action.CANCEL
    with pytest.raises(query.BadQuery):
        query.action("delete")
    assert query.search_text({"q": "  Foo@Example "}) == "foo@example"
    with pytest.raises(query.BadQuery):
        query.email_field({"email": " "})
    # A tenant token's own list whatever the form says; an admin names one
    assert query.tenant_field({"tenant": "other"}, admin=False) == ""
    assert query.tenant_field({"tenant": "other"}, admin=True) == "other"


def test_throughput_buckets_the_last_hour() -> None:
    # Given counts for minutes inside and outside the window ending at minute 1000
    now_s = 1000 * 60 + 30
    rows = [
        (1000, EventType.DELIVERED, 5),
        (1000, EventType.FAILED, 1),
        (941, EventType.DELIVERED, 2),  # the window's first minute
        (940, EventType.DELIVERED, 99),  # an hour ago: outside
        (1001, EventType.DELIVERED, 99),  # the future (a clock step): ignored
        (990, 7, 50),  # bounced: not counted here
    ]
    t = per_minute(rows, now_s)
    assert len(t.delivered) == 60 and t.first_minute == 941
    assert t.delivered[-1] == 5 and t.failed[-1] == 1 and t.delivered[0] == 2
    assert sum(t.delivered) == 7 and t.peak == 6 and t.complete_from_s is None
    assert window_start_s(now_s) == 941 * 60
    assert t.minute_label(59) == "16:40"
    # A read cut by its limit marks the minutes before its oldest row as partial
    cut = per_minute(rows, now_s, oldest_read_s=990 * 60.0)
    assert cut.complete_from_s == 990 * 60.0
    assert per_minute(rows, now_s, oldest_read_s=900 * 60.0).complete_from_s is None


def test_the_chart_has_a_text_alternative() -> None:
    t = per_minute([(1000, EventType.DELIVERED, 5)], 1000 * 60)
    page = views.throughput_page(VIEWER, t)
    assert '<svg role="img" aria-labelledby="chart-title"' in page
    assert '<th scope="row">16:40</th><td>5</td><td>0</td>' in page
    empty = views.throughput_page(VIEWER, per_minute([], 1000 * 60))
    assert "Nothing was delivered" in empty
