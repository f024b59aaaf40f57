"""The console's pages: plain values in, HTML text out. Pure.

Every value that came from the cluster or the browser goes through :func:`e`
(``html.escape`` with quotes) before it is placed in a page, attributes included;
URLs are built from percent-encoded parts (:mod:`coordinator.console.query`). Pages
work without JavaScript; ``console.js`` only refreshes the numbers of elements marked
``data-job``/``data-count`` from :func:`progress_data` every two seconds.

Accessibility: a skip link, header/nav/main landmarks, a label for every input, tables
with ``<th scope>``, text next to every progress bar and a table next to the chart,
and no information carried by colour alone.
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from client_sdk.types import (
    BreakerState,
    ClusterStatus,
    Job,
    JobProgress,
    JobState,
    NodeInfo,
    RecipientResult,
    RelayStatus,
    Suppression,
)
from coordinator.console.query import FILTERABLE, Action, ResultsQuery, job_url
from coordinator.console.throughput import Throughput

STATIC = "/console/static"
COUNTS = ("delivered", "failed", "deferred", "queued", "cancelled", "suppressed")


def e(value: object) -> str:
    """``value`` as HTML text, safe in element content and quoted attributes."""
    return html.escape(str(value), quote=True)


def when(at: datetime | None) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S UTC") if at is not None else "\u2014"


@dataclasses.dataclass(frozen=True)
class Viewer:
    """Who is logged in, as the page header shows them."""

    label: str
    csrf: str
    admin: bool


def csrf_field(viewer: Viewer) -> str:
    return f'<input type="hidden" name="csrf" value="{e(viewer.csrf)}">'


def _nav(viewer: Viewer | None) -> str:
    if viewer is None:
        return ""
    links = [("Jobs", "/console/jobs"), ("Throughput", "/console/throughput")]
    links += [("Nodes", "/console/nodes"), ("Suppressions", "/console/suppressions")]
    items = "".join(f'<li><a href="{href}">{name}</a></li>' for name, href in links)
    return (
        f'<nav aria-label="Main"><ul>{items}</ul></nav>'
        f'<form class="logout" method="post" action="/console/logout">{csrf_field(viewer)}'
        f"<span>Signed in as {e(viewer.label)}</span> "
        '<button type="submit">Log out</button></form>'
    )


def layout(title: str, body: str, viewer: Viewer | None, *, progress_url: str = "") -> str:
    """A whole page. ``progress_url``: where console.js polls the page's progress."""
    poll = f' data-progress-url="{e(progress_url)}"' if progress_url else ""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{e(title)} \u2013 Mailers console</title>"
        f'<link rel="stylesheet" href="{STATIC}/console.css">'
        f'<script src="{STATIC}/console.js" defer></script></head>'
        f"<body{poll}>"
        '<a class="skip" href="#main">Skip to content</a>'
        f'<header><p class="brand">Mailers console</p>{_nav(viewer)}</header>'
        f'<main id="main" tabindex="-1"><h1>{e(title)}</h1>{body}</main></body></html>'
    )


def notice(text: str) -> str:
    return f'<p class="notice" role="status">{e(text)}</p>' if text else ""


def login_page(login_csrf: str, error: str = "", *, auth_off: bool = False) -> str:
    problem = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    off = (
        "<p>Authentication is off on this cluster (local development): any text logs "
        "in, and every caller may do everything.</p>"
        if auth_off
        else ""
    )
    body = (
        f"{problem}{off}<p>Paste a tenant token or an admin token (it starts with "
        "<code>mlr_</code>). The console acts with it through the cluster's API.</p>"
        '<form method="post" action="/console/login">'
        f'<input type="hidden" name="csrf" value="{e(login_csrf)}">'
        '<p><label for="token">API token</label><br>'
        '<input id="token" name="token" type="password" autocomplete="off" required '
        'autofocus size="50"></p><p><button type="submit">Log in</button></p></form>'
    )
    return layout("Log in", body, None)


def message_page(viewer: Viewer | None, title: str, text: str) -> str:
    back = '<p><a href="/console/jobs">Back to jobs</a></p>' if viewer else ""
    return layout(title, f"<p>{e(text)}</p>{back}", viewer)


# ---- jobs -------------------------------------------------------------------------------


def progress_data(p: JobProgress) -> dict[str, Any]:
    """The numbers console.js puts into a page (JSON)."""
    return {
        "job_id": p.job_id,
        "state": p.state.value,
        "total": p.total,
        "done": p.done,
        "percent": _percent(p),
        **{name: getattr(p, name) for name in COUNTS},
        "final": p.is_final,
    }


def _percent(p: JobProgress) -> str:
    return f"{(100 * p.done // p.total) if p.total else 100}%"


def progress_bar(p: JobProgress) -> str:
    """A <progress> bar and its text equivalent, both updated by console.js."""
    return (
        f'<progress max="{max(p.total, 1)}" value="{p.done if p.total else 1}" '
        f'aria-label="Progress of job {e(p.job_id)}"></progress> '
        f'<span><span data-count="done">{p.done}</span> of '
        f'<span data-count="total">{p.total}</span> done '
        f'(<span data-count="percent">{_percent(p)}</span>)</span>'
    )


def _job_row(job: Job) -> str:
    p = job.progress
    cells = "".join(f'<td data-count="{name}">{getattr(p, name)}</td>' for name in COUNTS)
    name = job.options.name or job.job_id
    return (
        f'<tr data-job="{e(job.job_id)}"><th scope="row">'
        f'<a href="{e(job_url(job.job_id))}">{e(name)}</a></th>'
        f'<td data-count="state">{e(p.state.value)}</td>'
        f"<td>{progress_bar(p)}</td>{cells}<td>{e(when(p.created_at))}</td></tr>"
    )


def jobs_page(viewer: Viewer, jobs: Sequence[Job], next_page: str, this_page: str) -> str:
    heads = ["Job", "State", "Progress", *(c.capitalize() for c in COUNTS), "Created"]
    head = "".join(f'<th scope="col">{h}</th>' for h in heads)
    rows = "".join(_job_row(job) for job in jobs)
    table = (
        f"<table><caption>Jobs, newest first</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        if jobs
        else "<p>No jobs yet.</p>"
    )
    pager = _pager("/console/jobs", this_page, next_page)
    return layout("Jobs", table + pager, viewer, progress_url=_jobs_progress(this_page))


def _jobs_progress(page: str) -> str:
    return "/console/api/jobs" + (f"?{urlencode({'page': page})}" if page else "")


def _pager(first: str, this_page: str, next_page: str) -> str:
    sep = "&" if "?" in first else "?"
    links = []
    if this_page:
        links.append(f'<a href="{e(first)}">First page</a>')
    if next_page:
        links.append(f'<a href="{e(first + sep + urlencode({"page": next_page}))}">Next page</a>')
    return f'<nav aria-label="Pages" class="pager">{" ".join(links)}</nav>' if links else ""


def _summary(job: Job) -> str:
    p = job.progress
    content = job.content
    rows = [
        ("Job id", job.job_id),
        ("Name", job.options.name or "\u2014"),
        ("Subject", content.subject if content else "\u2014"),
        ("From", content.sender.email if content else "\u2014"),
        ("Tags", ", ".join(job.options.tags) or "\u2014"),
        ("Created", when(p.created_at)),
        ("Finished", when(p.finished_at)),
    ]
    items = "".join(f"<dt>{name}</dt><dd>{e(value)}</dd>" for name, value in rows)
    items += f'<dt>State</dt><dd data-count="state">{e(p.state.value)}</dd>'
    return f"<dl>{items}</dl>"


def _counts(p: JobProgress) -> str:
    head = "".join(f'<th scope="col">{c.capitalize()}</th>' for c in COUNTS)
    cells = "".join(f'<td data-count="{c}">{getattr(p, c)}</td>' for c in COUNTS)
    return (
        f'<div data-job="{e(p.job_id)}"><p>{progress_bar(p)}</p>'
        f"<table><caption>Recipients by status</caption><thead><tr>{head}</tr></thead>"
        f"<tbody><tr>{cells}</tr></tbody></table></div>"
    )


def _actions(job: Job, admin: bool) -> str:
    """Links to the confirmation pages; pause and resume are the admin API's, so only
    admins are offered them (the API refuses a tenant anyway)."""
    if job.progress.is_final:
        return ""
    offered = [Action.RESUME if job.progress.state is JobState.PAUSED else Action.PAUSE]
    links = [
        f'<a class="button" href="{e(job_url(job.job_id, a.value))}">{a.title} job\u2026</a>'
        for a in [*(offered if admin else []), Action.CANCEL]
    ]
    return f'<h2>Actions</h2><p class="actions">{" ".join(links)}</p>'


def _filter_form(job_id: str, query: ResultsQuery) -> str:
    options = ['<option value="">All</option>'] + [
        f'<option value="{s.value}"{" selected" if s is query.status else ""}>'
        f"{s.value.capitalize()}</option>"
        for s in FILTERABLE
    ]
    return (
        f'<form method="get" action="{e(job_url(job_id))}" class="filter">'
        '<label for="status">Status</label> '
        f'<select id="status" name="status">{"".join(options)}</select> '
        '<button type="submit">Show</button></form>'
    )


def _result_row(r: RecipientResult) -> str:
    reply = (str(r.reply) if r.reply is not None else r.reason) or "\u2014"
    feedback = r.feedback.replace("_", " ") if r.feedback else "\u2014"
    return (
        f'<tr><td>{r.index}</td><th scope="row">{e(r.email)}</th>'
        f"<td>{e(r.status.value)}</td><td>{e(reply)}</td>"
        f"<td>{r.attempts}</td><td>{e(feedback)}</td><td>{e(when(r.updated_at))}</td></tr>"
    )


def _results(job_id: str, results: Sequence[RecipientResult], query: ResultsQuery) -> str:
    if not results:
        return "<p>No recipients match.</p>"
    heads = ("#", "Recipient", "Status", "SMTP reply", "Attempts", "Feedback", "Updated")
    head = "".join(f'<th scope="col">{h}</th>' for h in heads)
    which = query.status.value if query.status else "all"
    return (
        f"<table><caption>Recipients ({e(which)})</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(_result_row(r) for r in results)}</tbody></table>"
    )


def job_page(
    viewer: Viewer,
    job: Job,
    results: Sequence[RecipientResult],
    next_page: str,
    query: ResultsQuery,
    done: str = "",
) -> str:
    links = []
    if query.page:
        links.append(f'<a href="{e(query.link(job.job_id))}">First page</a>')
    if next_page:
        links.append(f'<a href="{e(query.link(job.job_id, next_page))}">Next page</a>')
    pager = f'<nav aria-label="Pages" class="pager">{" ".join(links)}</nav>' if links else ""
    body = (
        notice(done)
        + _summary(job)
        + _counts(job.progress)
        + _actions(job, viewer.admin)
        + "<h2>Results</h2>"
        + _filter_form(job.job_id, query)
        + _results(job.job_id, results, query)
        + pager
    )
    title = f"Job {job.options.name or job.job_id}"
    return layout(title, body, viewer, progress_url=f"/console/api/jobs/{_quoted(job.job_id)}")


def _quoted(job_id: str) -> str:
    return job_url(job_id).removeprefix("/console/jobs/")


def confirm_page(viewer: Viewer, job: Job, action: Action, error: str = "") -> str:
    """The confirmation step: a POST form with a required checkbox (checked again on
    the server: ``required`` alone is a browser courtesy)."""
    problem = f'<p class="error" role="alert">{e(error)}</p>' if error else ""
    name = job.options.name or job.job_id
    body = (
        f"{problem}<p>{e(action.warning)}</p>"
        f'<form method="post" action="{e(job_url(job.job_id, action.value))}">'
        f"{csrf_field(viewer)}"
        '<p><input type="checkbox" id="confirm" name="confirm" value="yes" required> '
        f'<label for="confirm">Yes, {e(action.value)} job {e(name)}</label></p>'
        f'<p><button type="submit">{e(action.title)} job</button> '
        f'<a href="{e(job_url(job.job_id))}">Back to the job</a></p></form>'
    )
    return layout(f"{action.title} job {name}?", body, viewer)


# ---- nodes ------------------------------------------------------------------------------


def _breaker(state: BreakerState) -> str:
    return state.value.replace("_", "-")


def _relay_item(r: RelayStatus) -> str:
    """One relay and its breaker; the ``data-`` attributes name them for scripts and
    tests, the text says the same to a reader."""
    return (
        f'<li data-relay="{e(r.address)}" data-breaker="{e(_breaker(r.breaker_state))}">'
        f"{e(r.address)}: {e(_breaker(r.breaker_state))}, "
        f"{r.open_connections} connections</li>"
    )


def _node_row(n: NodeInfo) -> str:
    relays = "<ul>" + "".join(_relay_item(r) for r in n.relays) + "</ul>" if n.relays else "\u2014"
    load = n.load
    return (
        f'<tr data-node="{e(n.node_id)}"><th scope="row">{e(n.node_id)}</th>'
        f"<td>{e(n.address)}</td>"
        f"<td>{e(n.state.value)}</td><td>{n.lease_ttl_remaining_s} s</td>"
        f"<td>{load.in_flight} / {load.capacity}</td><td>{n.batches_in_flight}</td>"
        f"<td>{load.recent_latency_ms:.0f} ms</td><td>{load.recent_error_rate:.1%}</td>"
        f"<td>{e(_breaker(n.breaker_state))}</td><td>{relays}</td>"
        f"<td>{n.recipients_done}</td></tr>"
    )


def nodes_page(viewer: Viewer, nodes: Sequence[NodeInfo], status: ClusterStatus | None) -> str:
    leader = status.leader if status is not None else None
    lead = (
        f"<p>Leader: {e(leader.coordinator_id)} at {e(leader.address)} (epoch {leader.epoch}); "
        f"{len(status.standbys) if status else 0} standby; "
        f"{status.active_jobs if status else 0} active jobs.</p>"
        if leader is not None
        else "<p>No leader is elected right now.</p>"
    )
    heads = ("Node", "Address", "State", "Lease left", "In flight / capacity", "Batches",
             "Latency", "Error rate", "Breaker", "Relays (breaker)", "Recipients done")  # fmt: skip
    head = "".join(f'<th scope="col">{h}</th>' for h in heads)
    table = (
        f"<table><caption>Sender nodes</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(_node_row(n) for n in nodes)}</tbody></table>"
        if nodes
        else "<p>No sender node is registered.</p>"
    )
    return layout("Nodes", lead + table, viewer)


# ---- throughput -------------------------------------------------------------------------

_W, _H, _PAD = 720, 240, 40


def chart_svg(t: Throughput) -> str:
    """Stacked bars per minute (delivered, failed), in inline SVG; the table beside it
    is the text alternative, so the figure is labelled and its bars are not read out."""
    n = len(t.delivered)
    top = max(t.peak, 1)
    width = (_W - 2 * _PAD) / max(n, 1)
    bars = []
    for i, (d, f) in enumerate(zip(t.delivered, t.failed, strict=True)):
        x = _PAD + i * width
        hd = (_H - 2 * _PAD) * d / top
        hf = (_H - 2 * _PAD) * f / top
        base = _H - _PAD
        bars.append(
            f'<rect x="{x:.1f}" y="{base - hd:.1f}" width="{width * 0.8:.1f}" '
            f'height="{hd:.1f}" fill="#0b57d0"/>'
            f'<rect x="{x:.1f}" y="{base - hd - hf:.1f}" width="{width * 0.8:.1f}" '
            f'height="{hf:.1f}" fill="#b3261e"/>'
        )
    axis = (
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#1a1a1a"/>'
        f'<text x="{_PAD}" y="{_H - _PAD / 3:.0f}" font-size="12">{t.minute_label(0)}</text>'
        f'<text x="{_W - _PAD}" y="{_H - _PAD / 3:.0f}" font-size="12" text-anchor="end">'
        f"{t.minute_label(n - 1)}</text>"
        f'<text x="{_PAD}" y="{_PAD - 8}" font-size="12">{top} per minute</text>'
    )
    return (
        f'<svg role="img" aria-labelledby="chart-title" viewBox="0 0 {_W} {_H}" '
        f'width="100%" preserveAspectRatio="xMidYMid meet"><title id="chart-title">'
        f"Delivered (blue, lower) and failed (red, upper) recipients per minute, "
        f"last hour, UTC</title>{axis}{''.join(bars)}</svg>"
    )


def throughput_page(viewer: Viewer, t: Throughput) -> str:
    rows = "".join(
        f'<tr><th scope="row">{t.minute_label(i)}</th><td>{d}</td><td>{f}</td></tr>'
        for i, (d, f) in enumerate(zip(t.delivered, t.failed, strict=True))
        if d or f
    )
    cut = (
        notice(f"Busy hour: minutes before {when(_utc(t.complete_from_s))} are partial.")
        if t.complete_from_s is not None
        else ""
    )
    total = f"<p>Last hour: {sum(t.delivered)} delivered, {sum(t.failed)} failed.</p>"
    table = (
        "<table><caption>Recipients per minute (UTC), minutes with activity</caption>"
        '<thead><tr><th scope="col">Minute</th><th scope="col">Delivered</th>'
        f'<th scope="col">Failed</th></tr></thead><tbody>{rows}</tbody></table>'
        if rows
        else "<p>Nothing was delivered or failed in the last hour.</p>"
    )
    return layout("Throughput, last hour", cut + total + chart_svg(t) + table, viewer)


def _utc(seconds: float | None) -> datetime | None:
    return datetime.fromtimestamp(seconds, UTC) if seconds is not None else None


# ---- suppressions -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SuppressionView:
    """What the suppression page shows: the matches of a search, and whose list."""

    items: Sequence[Suppression]
    search: str
    tenant: str
    truncated: bool
    """The scan stopped at its limit: there may be more matches."""
    done: str = ""


def _tenant_input(viewer: Viewer, tenant: str, id_: str) -> str:
    if not viewer.admin:
        return ""
    return (
        f'<label for="{id_}">Tenant</label> '
        f'<input id="{id_}" name="tenant" value="{e(tenant)}" size="16"> '
    )


def _suppression_row(viewer: Viewer, s: Suppression, tenant: str) -> str:
    hidden = f'<input type="hidden" name="email" value="{e(s.email)}">'
    if viewer.admin:
        hidden += f'<input type="hidden" name="tenant" value="{e(tenant)}">'
    remove = (
        f'<form method="post" action="/console/suppressions/remove">{csrf_field(viewer)}'
        f'{hidden}<button type="submit" aria-label="Remove {e(s.email)}">Remove</button></form>'
    )
    reply = str(s.reply) if s.reply is not None else "\u2014"
    return (
        f'<tr><th scope="row">{e(s.email)}</th><td>{e(s.reason.value.replace("_", " "))}</td>'
        f"<td>{e(reply)}</td><td>{e(when(s.created_at))}</td><td>{remove}</td></tr>"
    )


def suppressions_page(viewer: Viewer, view: SuppressionView) -> str:
    search = (
        '<form method="get" action="/console/suppressions" class="filter">'
        f"{_tenant_input(viewer, view.tenant, 'search-tenant')}"
        '<label for="q">Address contains</label> '
        f'<input id="q" name="q" type="search" value="{e(view.search)}"> '
        '<button type="submit">Search</button></form>'
    )
    add = (
        '<h2>Add an address</h2><form method="post" action="/console/suppressions">'
        f"{csrf_field(viewer)}{_tenant_input(viewer, view.tenant, 'add-tenant')}"
        '<label for="email">Email address</label> '
        '<input id="email" name="email" type="email" required> '
        '<button type="submit">Suppress</button></form>'
    )
    heads = ("Address", "Reason", "SMTP reply", "Since", "Action")
    head = "".join(f'<th scope="col">{h}</th>' for h in heads)
    rows = "".join(_suppression_row(viewer, s, view.tenant) for s in view.items)
    table = (
        f"<table><caption>Suppressed addresses</caption><thead><tr>{head}</tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        if view.items
        else "<p>No suppressed address matches.</p>"
    )
    more = notice("Only the first matches are shown; narrow the search.") if view.truncated else ""
    body = notice(view.done) + search + table + more + add
    return layout("Suppression list", body, viewer)
