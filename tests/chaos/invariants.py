"""The invariants every chaos test checks, against the SDK and the sink's log.

- 0 lost: every recipient of every accepted job ends DELIVERED or FAILED (or CANCELLED
  when the test cancelled), each FAILED with the SMTP reply or reason that decided it.
- Every DELIVERED recipient reached the sink (its Message-ID is in the sink's log).
- Duplicates only from SMTP's own ambiguity: a Message-ID accepted n times by the sink
  must have at least n - 1 of those accepts recorded as ambiguous (the sender may not
  have read the 250, so sending again was right); any other extra copy is
  ``unexplained`` and fails :meth:`Report.assert_exactly_once`.
"""

from __future__ import annotations

import collections
import dataclasses

from client_sdk import JobState, MailerClient, RecipientStatus
from mailers_dev.cluster import LocalCluster


@dataclasses.dataclass
class Report:
    job_id: str
    total: int
    delivered: int
    failed: int
    duplicates: int
    """Extra copies beyond the first, summed over Message-IDs."""
    unexplained: int = 0
    """Extra copies not preceded by an ambiguous accept of the same Message-ID."""
    failures: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    """Failure reasons (reply or reason) and how many recipients each."""

    def line(self, label: str) -> str:
        return (
            f"{label}: total={self.total} delivered={self.delivered} failed={self.failed} "
            f"lost=0 duplicates={self.duplicates} (after an ambiguous accept: "
            f"{self.duplicates - self.unexplained}, unexplained: {self.unexplained})"
        )

    def assert_exactly_once(self) -> None:
        """Every extra copy came after an accept the sender could not have seen."""
        assert self.unexplained == 0, self.line("duplicates not explained by SMTP")


async def check_job(
    client: MailerClient, cluster: LocalCluster, job_id: str, allow_cancelled: bool = False
) -> Report:
    """Assert the invariants for one finished job; returns its figures."""
    job = await client.get(job_id)
    assert job.state in (JobState.COMPLETED, JobState.CANCELLED), job.state
    sink = collections.Counter(
        str(line["message_id"])
        for line in cluster.delivered()
        if str(line["message_id"]).startswith(f"<{job_id}.")
    )
    delivered = failed = 0
    failures: collections.Counter[str] = collections.Counter()
    seen = 0
    async for r in client.results(job_id):
        seen += 1
        if r.status is RecipientStatus.DELIVERED:
            delivered += 1
            assert r.reply is not None and 200 <= r.reply.code < 300, r
            domain = job.content.sender.email.rpartition("@")[2] if job.content else ""
            assert sink[f"<{job_id}.{r.index}@{domain}>"] >= 1, f"delivered but not in sink: {r}"
        elif r.status is RecipientStatus.FAILED:
            failed += 1
            why = (str(r.reply) if r.reply and r.reply.code else "") or r.reason
            assert why, f"failed without a reply or reason: {r}"
            failures[why[:80]] += 1
        elif r.status is RecipientStatus.CANCELLED and allow_cancelled:
            pass
        else:
            raise AssertionError(f"recipient not final: {r}")
    assert seen == job.progress.total, (seen, job.progress.total)
    assert delivered == job.progress.delivered and failed == job.progress.failed
    duplicates = sum(n - 1 for n in sink.values())
    ambiguous = collections.Counter(str(line["message_id"]) for line in cluster.ambiguous())
    unexplained = sum(max(0, n - 1 - ambiguous[m]) for m, n in sink.items() if n > 1)
    return Report(job_id, seen, delivered, failed, duplicates, unexplained, failures)
