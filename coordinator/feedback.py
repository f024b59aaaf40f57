"""The leader applies what came back: bounces, complaints and unsubscribes.

Rows of the ``inbound`` table (written by any coordinator, see
:mod:`coordinator.inbound` and the unsubscribe endpoint) are read in order; each is
parsed (:func:`coordinator.bounces.parse_report`), matched to its recipient and applied
in one fenced transaction that also marks it processed with its outcome:

- ``bounced``: a ``bounced`` event per failed recipient (hard: 5.x.x, soft: 4.x.x), the
  recipient marked, and a hard bounce added to the tenant's suppression list;
- ``complained``: a ``complained`` event and a suppression (reason ``complaint``);
- ``unsubscribed``: an ``unsubscribed`` event and a suppression, once per address;
- ``forged`` (a token that does not verify: nothing changes), ``unparsed`` (kept for
  inspection), ``unmatched`` (no such recipient, or one whose address differs).

Matching: the VERP token of the envelope recipient names the job and recipient and is
authenticated. A report that comes without one (a complaint sent to a feedback
address, a bounce to the From address) is matched by the original Message-ID, which
names job and recipient too, and then only when the reported address is that
recipient's: a Message-ID is not a secret. The one exception is a complaint whose
provider redacted the complainer's address: the Message-ID alone then decides (it
carries the job id's random part, so it is not guessed).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable

from coordinator.bounces import Finding, Report, ReportKind, parse_report
from coordinator.db.store import (
    Feedback,
    InboundRow,
    LostLeadership,
    Reported,
    Store,
    StoreUnavailable,
)
from coordinator.model import EventType
from coordinator.suppression import Reason
from mailers_runtime.verp import Purpose, RecipientRef, TokenKey, bounce_ref

log = logging.getLogger(__name__)

POLL_S = 1.0
PAGE = 100
_MESSAGE_ID = re.compile(r"<([0-9a-z][0-9a-z-]*)\.(g?)(\d+)@", re.IGNORECASE)
_REPLY_CODE = re.compile(r"\b([245]\d\d)\b")

Decision = tuple[str, str, list[Feedback]]
"""(outcome, detail, what to record)."""


class FeedbackProcessor:
    def __init__(self, store: Store, key: TokenKey, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._key = key
        self._clock = clock

    async def run(self) -> None:
        """Apply rows until cancelled; a lost fence ends the reign (it propagates)."""
        while True:
            try:
                applied = await self.process_once()
            except StoreUnavailable as exc:
                log.warning("feedback: %s; trying again shortly", exc)
                applied = 0
            if applied < PAGE:
                await asyncio.sleep(POLL_S)

    async def process_once(self) -> int:
        """Apply the next page of rows; returns how many were read."""
        rows = await self._store.pending_inbound(PAGE)
        for row in rows:
            outcome, detail, feedback = await self._decide(row)
            try:
                await self._store.apply_inbound(
                    row.row_id, outcome, detail[:500], feedback, self._clock()
                )
            except LostLeadership:
                raise
            log.info("inbound #%d: %s %s", row.row_id, outcome, detail[:200])
        return len(rows)

    async def _decide(self, row: InboundRow) -> Decision:
        local = row.rcpt_to.rpartition("@")[0].lower()
        if row.kind == "unsubscribe":
            return await self._unsubscribe(row.rcpt_to)
        if local.startswith("unsubscribe+"):
            return await self._unsubscribe(local.partition("+")[2])
        report = parse_report(row.message or b"")
        if report is None:
            return "unparsed", "not a bounce or complaint this server can read", []
        # The inbound endpoint took mail for the bounce domains only: the token decides.
        ref = bounce_ref(self._key, row.rcpt_to)
        if ref is None and "+" in local:
            return "forged", f"token of {row.rcpt_to} does not verify", []
        if ref is None:
            ref = _ref_of_message_id(report.message_id)
            if ref is None:
                return "unmatched", "no token and no Message-ID of ours", []
        feedback = []
        for finding in report.findings:
            reported = await self._store.reported_recipient(ref.job_id, ref.index, finding.email)
            if reported is not None and reported.email.lower() == finding.email:
                feedback.append(_feedback(report, finding, reported))
        if report.kind is ReportKind.COMPLAINT and not report.findings:
            # Providers often redact the complainer: the Message-ID (naming job and
            # recipient, with the job id's random part) is then all there is.
            reported = await self._store.reported_recipient(ref.job_id, ref.index)
            if reported is not None:
                feedback.append(_feedback(report, Finding(reported.email, True, "", ""), reported))
        if not feedback:
            return "unmatched", f"no recipient of job {ref.job_id} matches the report", []
        outcome = "complained" if report.kind is ReportKind.COMPLAINT else "bounced"
        return outcome, ", ".join(f.recipient.email for f in feedback), feedback

    async def _unsubscribe(self, token: str) -> Decision:
        ref = self._key.verify(Purpose.UNSUBSCRIBE, token)
        if ref is None:
            return "forged", "unsubscribe token does not verify", []
        reported = await self._store.reported_recipient(ref.job_id, ref.index)
        if reported is None:
            return "unmatched", f"recipient {ref.index} of job {ref.job_id} is gone", []
        unsubscribed = Feedback(
            reported, EventType.UNSUBSCRIBED, "unsubscribe", Reason.UNSUBSCRIBE,
            text="one-click unsubscribe",
        )  # fmt: skip
        return "unsubscribed", reported.email, [unsubscribed]


def _feedback(report: Report, finding: Finding, reported: Reported) -> Feedback:
    code = _REPLY_CODE.search(finding.diagnostic)
    text = finding.diagnostic or finding.status
    if report.kind is ReportKind.COMPLAINT:
        kind = report.feedback_type or "abuse"
        return Feedback(
            reported, EventType.COMPLAINED, "complaint", Reason.COMPLAINT, text=f"complaint: {kind}"
        )
    return Feedback(
        reported,
        EventType.BOUNCED,
        "hard_bounce" if finding.hard else "soft_bounce",
        Reason.HARD_BOUNCE if finding.hard else None,
        code=int(code.group(1)) if code else 0,
        enhanced_code=finding.status,
        text=text,
    )


def _ref_of_message_id(message_id: str) -> RecipientRef | None:
    """The job and recipient a Message-ID of ours names (``<job.index@…>``, or
    ``<job.gFIRST@…>`` for a shared message: then the report's address decides)."""
    match = _MESSAGE_ID.search(message_id)
    if match is None:
        return None
    return RecipientRef(match.group(1).lower(), int(match.group(3)))
