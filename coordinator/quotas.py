"""Per-tenant quotas. Pure: the caller passes ``now``.

What a tenant used in the last hour, and its unfinished jobs, are counted in PostgreSQL
inside each submit's transaction (``coordinator.db.store``), so a failover forgets
nothing; this module holds the limits and the arithmetic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from mailers_runtime.errors import MailersError

WINDOW_S = 3600.0
ACTIVE_JOBS_RETRY_S = 30.0
"""Suggested wait when a tenant has too many unfinished jobs (nothing tells when one ends)."""


@dataclasses.dataclass(frozen=True)
class Quotas:
    """Limits of one tenant; 0 means unlimited."""

    max_recipients_per_job: int = 0
    """Recipients in one job."""
    messages_per_hour: int = 0
    """Recipients accepted in any sliding hour."""
    max_active_jobs: int = 0
    """Jobs not yet completed or cancelled."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 0:
                raise ValueError(f"{field.name} must not be negative")


class QuotaExceeded(MailersError):
    """A tenant is over a quota; ``retry_after_s`` is when trying again may work
    (None when waiting cannot help, e.g. a job larger than the per-job limit)."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def check_job_size(quotas: Quotas, recipients: int) -> None:
    """Raises QuotaExceeded when one job has more recipients than the tenant may send."""
    limit = quotas.max_recipients_per_job
    if limit and recipients > limit:
        raise QuotaExceeded(f"quota: more than {limit} recipients in one job", None)
    hourly = quotas.messages_per_hour
    if hourly and recipients > hourly:
        raise QuotaExceeded(f"quota: more than {hourly} recipients per hour in one job", None)


def window_retry_after(minutes: Sequence[tuple[float, int]], need: int, now: float) -> float:
    """How long until ``need`` recipients of a tenant's hourly window have left it.

    Args:
        minutes: (start of the minute, recipients accepted in it), oldest first, for the
            minutes still inside the window (a minute counts while it began less than
            :data:`WINDOW_S` ago).
        need: How many must leave for the new job to fit.
        now: The current time.
    """
    freed = 0
    for start, recipients in minutes:
        freed += recipients
        if freed >= need:
            return max(1.0, start + WINDOW_S - now)
    return WINDOW_S
