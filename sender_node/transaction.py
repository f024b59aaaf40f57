"""One SMTP transaction of a batch: render the message, wait for its turn, send it,
and turn the relay's outcomes into results.

:class:`SendEngine` is what every batch of the node shares: the SMTP pool (the
:class:`Mailer`), node-wide priority slots (``slots.py``), per-domain pacing
(``pacing.py``), compiled templates, load statistics and the per-transaction metrics.
:meth:`SendEngine.transact` runs one transaction for ``worker.BatchRun``.

The promises this module keeps for the worker (``worker.py`` states them for a batch):

- A transaction goes out only while the run's ``may_start`` says yes (asked again
  after every wait, and by the SMTP client right before the message body as
  ``may_send``), and only within the start budget (``NodeTimings.start_budget_s``).
- Its results are handed to ``record`` synchronously, right after the SMTP client
  returns and before anything else can run on the event loop, so before the connection
  can carry another transaction.
- While a transaction is inside the SMTP client its :class:`Guard` says so: the worker
  then does not cancel it (it may be past its final dot).

No protobuf here: results are ``model.Result`` values.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

from mailers_runtime.message import CompiledMessage, MessageSigner, RenderError, TemplateCache
from mailers_runtime.verp import ReturnPath
from sender_node.classify import Failure, LoadStats, Outcome, Phase, classify
from sender_node.config import NodeTimings
from sender_node.metrics import NodeMetrics
from sender_node.model import Recipient, Reply, Result, Status, Work
from sender_node.pacing import DomainPacer, PacingTimeout, Slot
from sender_node.slots import PrioritySlots
from sender_node.smtp_client import RelayInfo, SendAborted, SendOutcome
from sender_node.throttle import recipient_domain

_STATUS = {
    Outcome.DELIVERED: Status.DELIVERED,
    Outcome.PERMANENT: Status.FAILED,
    Outcome.TRANSIENT: Status.DEFERRED,
    Outcome.AMBIGUOUS: Status.DEFERRED,
}

_OUTCOME_LABEL = {outcome: outcome.name.lower() for outcome in Outcome}
"""The ``status`` label of ``messages`` (not an enum property lookup per message)."""

Record = Callable[[Sequence[Result]], None]
"""Journals the results of one transaction (synchronously)."""


_MAX_BOUNCE_DOMAIN_JOBS = 4096


class Mailer(Protocol):
    """What the node needs from ``smtp_client.RelayPool``."""

    async def send_group(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        data: bytes,
        may_send: Callable[[], bool] | None = None,
    ) -> list[SendOutcome]: ...

    def relays(self) -> list[RelayInfo]: ...


@dataclasses.dataclass
class Guard:
    """Whether a batch's worker is inside the SMTP client (then it must not be cancelled)."""

    sending: bool = False


class SendEngine:
    """Sends one group of recipients in one transaction and builds their results.

    Args:
        node_id: Goes into every result.
        mailer: The SMTP pool.
        concurrency: Node-wide transactions at once (slots by batch priority).
        timings: Start budget and largest message.
        metrics: Counters of transactions, replies, throttling.
        pacer: Per-recipient-domain concurrency and rate (default: ``DomainPacer``'s
            defaults, on ``clock``).
        pacing_wait_s: Longest wait for a domain's turn; then the group is deferred
            (without using up an attempt).
        signer: DKIM signer for compiled messages.
        template_cache_jobs: Jobs whose compiled content is kept.
        clock: Monotonic seconds.
        wall_clock: Unix seconds (results, the Date header).
    """

    def __init__(
        self,
        *,
        node_id: str,
        mailer: Mailer,
        concurrency: int,
        timings: NodeTimings,
        metrics: NodeMetrics,
        pacer: DomainPacer | None = None,
        pacing_wait_s: float = 30.0,
        signer: MessageSigner | None = None,
        return_path: ReturnPath | None = None,
        template_cache_jobs: int = 64,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.node_id = node_id
        self.mailer = mailer
        self.concurrency = max(1, concurrency)
        self.timings = timings
        self.metrics = metrics
        self.load = LoadStats()
        self._slots = PrioritySlots(self.concurrency)
        self._pacer = pacer if pacer is not None else DomainPacer(clock=clock)
        self._pacing_wait_s = pacing_wait_s
        self._cache = TemplateCache(template_cache_jobs, signer=signer)
        self._return_path = return_path
        self._bounce_domains: dict[str, str] = {}
        """Jobs whose tenant has a bounce domain of its own (the oldest forgotten past
        :data:`_MAX_BOUNCE_DOMAIN_JOBS`: their batches carry it again)."""
        self._clock = clock
        self._wall_clock = wall_clock

    def compile(self, work: Work) -> CompiledMessage:
        """The job's compiled message (cached by job).

        Raises:
            RenderError: the content cannot be rendered.
        """
        if work.bounce_domain:
            if len(self._bounce_domains) >= _MAX_BOUNCE_DOMAIN_JOBS:
                del self._bounce_domains[next(iter(self._bounce_domains))]
            self._bounce_domains[work.job_id] = work.bounce_domain
        return self._cache.get(work.job_id, work.content)

    async def transact(
        self,
        compiled: CompiledMessage,
        group: Sequence[Recipient],
        priority: int,
        may_start: Callable[[], bool],
        record: Record,
        guard: Guard,
        order: int = 0,
    ) -> bool:
        """One transaction for ``group``; its results go to ``record`` at once.
        ``priority`` and ``order`` (the batch's arrival on the node) rank it for a
        node-wide slot (see ``slots``).

        Returns:
            True when the group's results were recorded; False when ``may_start``
            turned false before the message body went out (nothing was sent).
        """
        started = self._clock()
        try:
            data = self._render(compiled, group)
        except RenderError as exc:
            record([self.failed(item, f"render error: {exc}") for item in group])
            return True
        if len(data) > self.timings.max_message_bytes:
            reason = f"message of {len(data)} bytes exceeds {self.timings.max_message_bytes}"
            record([self.failed(item, reason) for item in group])
            return True
        deadline = started + self.timings.start_budget_s

        def may_send() -> bool:
            return may_start() and self._clock() < deadline

        rcpts = [item.email for item in group]
        domain = recipient_domain(rcpts[0])
        try:
            send = _Send(compiled, group, rcpts, data, may_send, record, guard)
            sent = await self._paced(send, priority, order)
        except PacingTimeout:
            self.metrics.throttled.labels(domain).inc()
            wait = f"no turn for its domain within {self._pacing_wait_s:g}s"
            record([self.held_back(item, f"throttled: {wait}") for item in group])
            return True
        if sent or not may_start():
            return sent
        # Still allowed, yet not at its body within the start budget: held back here.
        budget = f"not started within {self.timings.start_budget_s:g}s"
        record([self.held_back(item, f"throttled: {budget}") for item in group])
        return True

    async def _paced(self, send: _Send, priority: int, order: int) -> bool:
        """The transaction in a node-wide slot and a slot of the recipients' domain.

        Raises:
            PacingTimeout: the domain gave no slot within ``pacing_wait_s``.
        """
        domain = recipient_domain(send.rcpts[0])
        # Usually the domain has a slot free: take it, without waiting, inside a node slot.
        async with self._slots.slot(priority, order):
            paced = self._pacer.try_take(domain)
            if paced is not None:
                try:
                    return await self._send(send, paced)
                finally:
                    self._pacer.give_back(paced)
        # The domain is busy or throttled: wait for its turn without holding a node slot
        # that transactions to other domains could use.
        deadline_s = self._clock() + self._pacing_wait_s
        async with self._pacer.slot(domain, deadline_s=deadline_s) as paced:
            async with self._slots.slot(priority, order):
                return await self._send(send, paced)

    def _envelope_from(self, send: _Send) -> str:
        """The From address, or a VERP address (on the tenant's bounce domain, else the
        node's) naming the transaction's first recipient (a shared message's bounce
        names its recipient in the report)."""
        path = self._return_path
        job_id = send.compiled.job_id
        domain = self._bounce_domains.get(job_id, "")
        if path is None or not (domain or path.domain):
            return send.compiled.envelope_from
        return path.envelope_from(job_id, send.group[0].index, domain)

    async def _send(self, send: _Send, paced: Slot) -> bool:
        # Waiting for slots can take long (or the process was frozen): ask again.
        if not send.may_send():
            return False
        started = self._clock()
        send.guard.sending = True
        try:
            try:
                outcomes = await self.mailer.send_group(
                    self._envelope_from(send), send.rcpts, send.data, send.may_send
                )
            except SendAborted:
                return False
            # No await from here to record(): the connection carries nothing else first.
            finished = self._clock()
            send.record(self._results(send, outcomes, started, finished, paced))
            return True
        finally:
            send.guard.sending = False

    def _results(
        self,
        send: _Send,
        outcomes: Sequence[SendOutcome],
        started: float,
        finished: float,
        paced: Slot,
    ) -> list[Result]:
        for outcome in outcomes:
            if outcome.phase is not Phase.CONNECT and outcome.code > 0:
                # A 421/451 from the transaction slows the domain down; one at connect
                # time is about the relay, not the destination.
                if paced.reply(outcome.code):
                    self.metrics.domain_slowdowns.labels(paced.domain).inc()
        self.metrics.observe_transaction(finished - started)
        relay_fault = False
        results = []
        # One message per transaction: a personalised one for its one recipient, or a
        # shared one named after the first recipient of its group (see _render).
        compiled, group = send.compiled, send.group
        message_id = compiled.message_id(group[0].index, shared=compiled.recipients_per_message > 1)
        # The recipients a shared message went to share one outcome object: judged once,
        # counted once under the group's one domain (the one paced), stamped with one time.
        judged: dict[int, _Judged] = {}
        now_ns = self._now_ns()
        for item, outcome in zip(group, outcomes, strict=True):
            judgement = judged.get(id(outcome))
            if judgement is None:
                judgement = judged[id(outcome)] = _Judged(outcome)
            results.append(judgement.result(item, self.node_id, message_id, now_ns))
            judgement.recipients += 1
            relay_fault = relay_fault or judgement.verdict.relay_fault
        for judgement in judged.values():
            judgement.count(self.metrics, paced.domain)
        self.load.record(finished, finished - started, relay_fault)
        return results

    def _render(self, compiled: CompiledMessage, group: Sequence[Recipient]) -> bytes:
        date = datetime.fromtimestamp(self._wall_clock(), UTC)
        if compiled.recipients_per_message > 1:
            return compiled.render_shared(first_index=group[0].index, date=date)
        recipient = group[0]
        path = self._return_path
        unsubscribe = ""
        # The node's one-click link is used only when the job has no unsubscribe URL of
        # its own (see CompiledMessage.render): otherwise its token (an HMAC) is not made.
        if path is not None and not compiled.content.unsubscribe_url:
            domain = self._bounce_domains.get(compiled.job_id, "")
            unsubscribe = path.list_unsubscribe(compiled.job_id, recipient.index, domain)
        return compiled.render(
            index=recipient.index,
            email=recipient.email,
            name=recipient.name,
            variables=recipient.variables,
            date=date,
            unsubscribe=unsubscribe,
        )

    # -- results ---------------------------------------------------------------------

    def failed(self, item: Recipient, reason: str) -> Result:
        """A permanent failure decided here (the recipient's attempt is used up)."""
        return self._result(item, Status.FAILED, reason, item.attempts + 1)

    def held_back(self, item: Recipient, reason: str) -> Result:
        """Deferred by the node itself: no attempt was made, so none is used up."""
        return self._result(item, Status.DEFERRED, reason, item.attempts)

    def _result(self, item: Recipient, status: Status, reason: str, attempts: int) -> Result:
        return Result(
            index=item.index,
            email=item.email,
            status=status,
            reason=reason,
            attempts=attempts,
            node_id=self.node_id,
            updated_at_ns=self._now_ns(),
        )

    def _now_ns(self) -> int:
        return int(self._wall_clock() * 1e9)


class _Judged:
    """What one SMTP outcome means for the recipients it is the outcome of."""

    __slots__ = ("outcome", "verdict", "status", "reply", "uses_attempt", "recipients")

    def __init__(self, outcome: SendOutcome) -> None:
        self.outcome = outcome
        self.recipients = 0  # how many it was the outcome of (the caller counts them)
        self.verdict = verdict = classify(
            outcome.code, outcome.text, outcome.phase, outcome.failure
        )
        self.status = _STATUS[verdict.outcome]
        self.reply = (
            Reply(outcome.code, verdict.enhanced_code, outcome.text) if outcome.code > 0 else None
        )
        # No relay was tried (every breaker open), or the relay failed before the message
        # could have reached it (refused connection, 421, auth): the relay's fault, not
        # the recipient's, so it does not use up the recipient's attempts while relays
        # are down. The job's maximum age bounds such an outage.
        self.uses_attempt = not (
            outcome.failure is Failure.UNAVAILABLE
            or (verdict.relay_fault and verdict.outcome is not Outcome.AMBIGUOUS)
        )

    def result(self, item: Recipient, node_id: str, message_id: str, now_ns: int) -> Result:
        """The result reported for ``item`` (``message_id``: of the message sent)."""
        verdict = self.verdict
        return Result(
            index=item.index,
            email=item.email,
            status=self.status,
            reason=verdict.reason,
            attempts=item.attempts + 1 if self.uses_attempt else item.attempts,
            node_id=node_id,
            updated_at_ns=now_ns,
            ambiguous=verdict.outcome is Outcome.AMBIGUOUS,
            reply=self.reply,
            relay=self.outcome.relay,
            message_id=message_id,
        )

    def count(self, metrics: NodeMetrics, domain: str) -> None:
        """Count the outcome in the metrics, once per recipient of ``domain`` it was."""
        outcome = self.outcome
        metrics.count_message(
            outcome.relay, domain, _OUTCOME_LABEL[self.verdict.outcome], self.recipients
        )
        if outcome.code > 0:
            metrics.count_reply(outcome.code, self.recipients)


class _Send:
    """One transaction's inputs, passed down the slot layers (a plain slotted class:
    one is made per message)."""

    __slots__ = ("compiled", "group", "rcpts", "data", "may_send", "record", "guard")

    def __init__(
        self,
        compiled: CompiledMessage,
        group: Sequence[Recipient],
        rcpts: list[str],
        data: bytes,
        may_send: Callable[[], bool],
        record: Record,
        guard: Guard,
    ) -> None:
        self.compiled = compiled
        self.group = group
        self.rcpts = rcpts
        self.data = data
        self.may_send = may_send
        self.record = record
        self.guard = guard
