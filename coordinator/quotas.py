"""Per-tenant quotas and the hourly message window. Pure: the caller passes ``now``.

The leader keeps the window in memory. A new leader starts with an empty window, so
right after a failover a tenant may send up to one more hour's quota; the concurrent
job count, taken from the jobs themselves, is exact.
"""

from __future__ import annotations

import collections
import dataclasses

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


class QuotaExceeded(Exception):
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


def check_active_jobs(quotas: Quotas, active: int) -> None:
    """Raises QuotaExceeded when a tenant already has its maximum of unfinished jobs."""
    limit = quotas.max_active_jobs
    if limit and active >= limit:
        raise QuotaExceeded(f"quota: {limit} unfinished jobs already", ACTIVE_JOBS_RETRY_S)


class HourlyWindow:
    """Recipients accepted per tenant in the last hour (a sliding log of submits).

    One entry per accepted job, so memory is bounded by jobs per hour, not recipients.
    """

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._log: dict[str, collections.deque[tuple[float, int]]] = {}

    def used(self, tenant: str, now: float) -> int:
        """Recipients accepted for tenant in the window ending at now."""
        return sum(n for _, n in self._trim(tenant, now))

    def _trim(self, tenant: str, now: float) -> collections.deque[tuple[float, int]]:
        log = self._log.setdefault(tenant, collections.deque())
        while log and log[0][0] <= now - self._window_s:
            log.popleft()
        return log

    def reserve(self, tenant: str, quotas: Quotas, recipients: int, now: float) -> None:
        """Count ``recipients`` for tenant at now, or raise QuotaExceeded.

        Raises:
            QuotaExceeded: with the time until enough of the window has expired.
        """
        limit = quotas.messages_per_hour
        log = self._trim(tenant, now)
        if limit:
            if recipients > limit:
                raise QuotaExceeded(
                    f"quota: more than {limit} recipients per hour in one job", None
                )
            used = sum(n for _, n in log)
            if used + recipients > limit:
                # Wait until the oldest entries free enough room.
                need = used + recipients - limit
                freed = 0
                at = now
                for t, n in log:
                    freed += n
                    at = t
                    if freed >= need:
                        break
                retry_after_s = max(0.0, at + self._window_s - now)
                raise QuotaExceeded(
                    f"quota: {limit} recipients per hour; {used} used in the last hour",
                    retry_after_s,
                )
        log.append((now, recipients))

    def release(self, tenant: str, recipients: int, at: float) -> None:
        """Undo a reservation made at ``at`` (the job was not committed after all)."""
        log = self._log.get(tenant)
        if log is not None and (at, recipients) in log:
            log.remove((at, recipients))
