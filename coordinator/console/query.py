"""What the console's query strings and forms ask for, parsed and checked. Pure.

Everything a browser sends is untrusted: unknown statuses and actions are refused (not
passed on), lengths are capped, and page tokens (the API's own, opaque) travel back
unchanged but bounded.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from urllib.parse import quote, urlencode

from client_sdk.types import RecipientStatus

RESULTS_PAGE_SIZE = 50
"""Recipients per page of a job's results."""
JOBS_PAGE_SIZE = 25
MAX_TOKEN_CHARS = 512
"""Longer page tokens are not the API's: refused rather than forwarded."""
MAX_SEARCH_CHARS = 254
"""The longest email address (RFC 5321 path limit minus the brackets)."""

FILTERABLE = tuple(s for s in RecipientStatus if s is not RecipientStatus.UNSPECIFIED)


class BadQuery(ValueError):
    """A query parameter or form field the console does not accept."""


class Action(enum.Enum):
    """What an operator may do to a job, each confirmed first."""

    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"

    @property
    def title(self) -> str:
        return self.value.capitalize()

    @property
    def warning(self) -> str:
        return {
            Action.PAUSE: "No new SMTP transactions start for this job until it is resumed.",
            Action.RESUME: "Sending continues where it stopped.",
            Action.CANCEL: "Recipients not yet sent end as cancelled. This cannot be undone.",
        }[self]

    @property
    def done(self) -> str:
        return {Action.PAUSE: "paused", Action.RESUME: "resumed", Action.CANCEL: "cancelled"}[self]


def action(raw: str) -> Action:
    try:
        return Action(raw)
    except ValueError:
        raise BadQuery(f"unknown action {raw!r}") from None


def page_token(params: Mapping[str, str]) -> str:
    token = params.get("page", "")
    if len(token) > MAX_TOKEN_CHARS or not token.isprintable():
        raise BadQuery("bad page token")
    return token


@dataclasses.dataclass(frozen=True)
class ResultsQuery:
    """Which results of a job to show: a status (None: all) and a page."""

    status: RecipientStatus | None = None
    page: str = ""

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> ResultsQuery:
        raw = params.get("status", "")
        status = None
        if raw:
            try:
                status = RecipientStatus(raw)
            except ValueError:
                raise BadQuery(f"unknown status {raw!r}") from None
            if status is RecipientStatus.UNSPECIFIED:
                raise BadQuery("unknown status 'unspecified'")
        return cls(status, page_token(params))

    def link(self, job_id: str, page: str = "") -> str:
        """The URL of ``page`` of these results (the first page when empty)."""
        params = {"status": self.status.value if self.status else "", "page": page}
        query = urlencode({k: v for k, v in params.items() if v})
        return job_url(job_id) + (f"?{query}" if query else "")


def job_url(job_id: str, tail: str = "") -> str:
    """A job's page (or a page under it); the id is percent-encoded like any value."""
    return f"/console/jobs/{quote(job_id, safe='')}" + (f"/{tail}" if tail else "")


def search_text(params: Mapping[str, str]) -> str:
    """The suppression search (a part of an address, case-insensitive); "" for all."""
    text = params.get("q", "").strip().lower()
    if len(text) > MAX_SEARCH_CHARS or not text.isprintable():
        raise BadQuery("search text too long or not printable")
    return text


def tenant_field(params: Mapping[str, str], admin: bool) -> str:
    """Whose suppression list: admins may name a tenant ("" is the list of auth-off
    jobs); a tenant's own token always means its own list (the API decides anyway)."""
    if not admin:
        return ""
    tenant = params.get("tenant", "").strip()
    if len(tenant) > 63 or not tenant.isprintable():
        raise BadQuery("bad tenant")
    return tenant


def email_field(form: Mapping[str, str]) -> str:
    """An address to add or remove; the API validates it, this only bounds it."""
    email = form.get("email", "").strip()
    if not email or len(email) > MAX_SEARCH_CHARS or not email.isprintable():
        raise BadQuery("enter an email address")
    return email
