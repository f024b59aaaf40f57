"""What a node owes the leader: its results and its batch releases, in order.

Results (recipient outcomes) go into the journal the moment they are known
(:meth:`Outbox.record`); a result leaves the node only once the journal has it on disk.
Then it goes to the *current* stream, whichever leader holds it, in ``seq`` order; and
a leader's ``ResultsAck`` lets the journal forget it. A stream that opens gets, in its
hello, every result no leader has acknowledged (:meth:`Outbox.attach`): replays may
repeat what a leader already has, which leaders apply idempotently.

Wire messages: records of one batch attempt are sent as one ``BatchResults`` whose
``seq`` is that of its last record (a protobuf message's serialization concatenates:
repeated results append, the last ``seq`` wins). What one journal sync made durable
goes out grouped by batch attempt (:func:`merge_by_batch`; a node runs several batches
at once, so their records interleave), in the order of the messages' seqs; only the
last message of a sync covers every record up to its seq. So an ack of
``through_seq`` is applied up to the last *sync* sent on that stream at or below it,
never into the middle of one (the hello's replay and a hand-back join only
consecutive records: there each message covers every record up to its seq).

Releases (``BatchAck``): a batch whose transactions are over is *released* once all its
results are on disk and sent; until then it is *held* (:meth:`held`, the hello's
``held``). A release goes out as ``BatchAck`` on the current stream after the batch's
results; without a stream it is only remembered, and a later hello tells a leader by
leaving the batch out of ``held``. Released batches are also kept for the hand-back
(:meth:`handback`) until a leader is known to have heard of them: an ack on the stream
whose hello left them out, or an ack of a message sent after their ``BatchAck``.
Listing a release a leader already knows is harmless: leaders match releases by batch
*and* attempt.

No awaits here: the journal append is synchronous; the fsync is the journal's.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from sender_node.journal import Journal
from sender_node.journal_format import Record
from sender_node.model import BatchRef, Release, Result

DEFAULT_MAX_MERGE_RESULTS = 256
DEFAULT_MAX_RELEASED = 10_000
HANDBACK_BUDGET_BYTES = 900 * 1024
"""A hand-back stays below etcd's 1.5 MiB request limit with room to spare."""
_MESSAGE_OVERHEAD_BYTES = 64


@dataclasses.dataclass(frozen=True)
class ResultsMessage:
    """One ``BatchResults``: the payloads of records of one batch attempt."""

    seq: int
    """The seq of the last record: the message's seq."""
    ref: BatchRef
    payloads: tuple[bytes, ...]
    results: int


class Link(Protocol):
    """A stream the outbox can send on."""

    def send_results(self, message: ResultsMessage) -> None: ...

    def send_release(self, release: Release) -> None: ...


@dataclasses.dataclass(frozen=True)
class Greeting:
    """The outbox's part of a hello."""

    replay: list[ResultsMessage]
    held: list[BatchRef]


@dataclasses.dataclass(frozen=True)
class Handback:
    """The content of a hand-back through etcd."""

    results: list[ResultsMessage]
    released: list[BatchRef]
    left_out: int
    """Released batches not listed because their results did not fit."""
    held: list[BatchRef] = dataclasses.field(default_factory=list)
    """Batches not released yet (see :meth:`Outbox.held`)."""
    complete: bool = False
    """Every unacknowledged result and every released batch is in it."""


def merge(records: Iterable[Record], max_results: int) -> list[ResultsMessage]:
    """Group consecutive records of one batch attempt into messages of at most
    ``max_results`` results (a single larger record stays whole). Pure."""
    messages: list[ResultsMessage] = []
    run: list[Record] = []

    def flush() -> None:
        if run:
            count = sum(r.results for r in run)
            ref = BatchRef.from_key(run[0].key)
            messages.append(ResultsMessage(run[-1].seq, ref, tuple(r.payload for r in run), count))
            run.clear()

    count = 0
    for record in records:
        if run and (record.key != run[0].key or count + record.results > max_results):
            flush()
            count = 0
        run.append(record)
        count += record.results
    flush()
    return messages


def merge_by_batch(records: Iterable[Record], max_results: int) -> list[ResultsMessage]:
    """Group records by batch attempt, consecutive or not, into messages of at most
    ``max_results`` results (as :func:`merge`), ordered by their seqs. Pure."""
    runs: dict[str, list[Record]] = {}
    for record in records:
        runs.setdefault(record.key, []).append(record)
    messages = [message for run in runs.values() for message in merge(run, max_results)]
    messages.sort(key=_message_seq)
    return messages


def _message_seq(message: ResultsMessage) -> int:
    return message.seq


@dataclasses.dataclass(eq=False)
class _Target:
    link: Link
    sent_through: int
    boundaries: list[int]
    """Seqs up to which the messages sent on the link cover every record (each sync's
    last message, each replayed message), ascending, not yet acknowledged."""


@dataclasses.dataclass(eq=False)
class _Released:
    release: Release
    confirm: tuple[_Target, int] | None
    """Heard of once an ack on this target goes above this seq; None: not told yet."""


class Outbox:
    """The node's results and releases on their way to a leader (see module docstring).

    Args:
        journal: Where results are recorded; the outbox follows its durable mark.
        encode: Serializes results as one ``BatchResults`` payload for a seq.
        on_released: Called with each batch once it is released.
        max_merge_results: Bound on results per wire message.
        max_released: Released batches remembered for the hand-back (oldest dropped).
    """

    def __init__(
        self,
        journal: Journal,
        encode: Callable[[int, BatchRef, Sequence[Result]], bytes],
        *,
        on_released: Callable[[BatchRef], None] = lambda ref: None,
        max_merge_results: int = DEFAULT_MAX_MERGE_RESULTS,
        max_released: int = DEFAULT_MAX_RELEASED,
    ) -> None:
        self._journal = journal
        self._encode = encode
        self._on_released = on_released
        self._max_merge = max_merge_results
        self._max_released = max_released
        self._target: _Target | None = None
        self._held: dict[BatchRef, int] = {}
        """Batches being worked on -> seq of their last record."""
        self._pending: list[tuple[Release, int]] = []
        """Releases waiting for their last record to be on disk."""
        self._released: collections.OrderedDict[BatchRef, _Released] = collections.OrderedDict()
        journal.on_durable(self.on_durable)

    @property
    def unacked_results(self) -> int:
        """Results no leader has acknowledged."""
        return self._journal.unacked_results

    # -- results ---------------------------------------------------------------------

    def record(self, ref: BatchRef, results: Sequence[Result]) -> int:
        """Journal the results of one transaction now (no await); returns their seq."""
        if not results:
            return 0
        record = self._journal.append(
            len(results), ref.key(), lambda seq: self._encode(seq, ref, results)
        )
        if ref in self._held:
            self._held[ref] = record.seq
        return record.seq

    def on_durable(self, durable_seq: int) -> None:
        """The journal has everything up to ``durable_seq`` on disk: send it, then the
        releases it completes."""
        target = self._target
        if target is not None and durable_seq > target.sent_through:
            records = self._journal.between(target.sent_through, durable_seq)
            messages = merge_by_batch(records, self._max_merge)
            for message in messages:
                target.link.send_results(message)
            if messages:
                target.boundaries.append(messages[-1].seq)
            target.sent_through = durable_seq
        self._settle(durable_seq)

    def ack(self, link: Link, through_seq: int) -> None:
        """A leader stored the results of ``link`` up to ``through_seq``: forget them.

        Only the current stream's acks count, and only up to the last boundary (a
        sync's last message, a replayed message) sent on it at or below ``through_seq``.
        """
        target = self._target
        if target is None or target.link is not link:
            return
        index = bisect.bisect_right(target.boundaries, through_seq)
        if index == 0:
            return
        effective = target.boundaries[index - 1]
        del target.boundaries[:index]
        self._journal.ack(effective)
        heard = [
            ref
            for ref, entry in self._released.items()
            if entry.confirm is not None
            and entry.confirm[0] is target
            and entry.confirm[1] < effective
        ]
        for ref in heard:
            del self._released[ref]

    # -- batches ---------------------------------------------------------------------

    def hold(self, ref: BatchRef) -> None:
        """A batch was accepted: it is held until :meth:`release`."""
        self._held[ref] = 0
        self._released.pop(ref, None)

    def release(self, release: Release) -> None:
        """The batch's transactions are over; it goes out once its results are on disk."""
        last_seq = self._held.pop(release.ref, 0)
        self._pending.append((release, last_seq))
        self._settle(self._journal.durable_seq)

    def held(self) -> list[BatchRef]:
        """Batches not released yet (worked on, or waiting for their results' fsync)."""
        return [*self._held, *(release.ref for release, _ in self._pending)]

    def _settle(self, durable_seq: int) -> None:
        ready = [(r, s) for r, s in self._pending if s <= durable_seq]
        if not ready:
            return
        self._pending = [(r, s) for r, s in self._pending if s > durable_seq]
        target = self._target
        for release, _ in ready:
            confirm = None
            if target is not None:
                target.link.send_release(release)
                confirm = (target, target.sent_through)
            self._released[release.ref] = _Released(release, confirm)
            self._released.move_to_end(release.ref)
            while len(self._released) > self._max_released:
                self._released.popitem(last=False)
            self._on_released(release.ref)

    # -- streams ---------------------------------------------------------------------

    def attach(self, link: Link) -> Greeting:
        """``link`` is the new current stream: what its hello carries. Results on disk
        and not acknowledged are replayed; later ones follow as they reach the disk."""
        durable = self._journal.durable_seq
        replay = merge(self._journal.between(0, durable), self._max_merge)
        target = _Target(link, durable, [m.seq for m in replay])
        self._target = target
        for entry in self._released.values():
            entry.confirm = (target, 0)  # the hello leaves them out of held
        return Greeting(replay, self.held())

    def detach(self, link: Link) -> None:
        """``link`` ended: nothing more goes to it."""
        if self._target is not None and self._target.link is link:
            self._target = None

    def handback(self, budget_bytes: int = HANDBACK_BUDGET_BYTES) -> Handback:
        """What to hand back through etcd: released batches with all their unacknowledged
        results, newest release first, as many as fit ``budget_bytes``; then other
        results on disk, oldest first, while they fit.

        A released batch is listed only with every result of it that a leader has not
        acknowledged: a leader treats a released batch's recipients without a result as
        never attempted, so listing it without them could send them twice. Batches left
        out stay held as far as the leader knows, until a stream or a later hand-back
        (acks make room) tells it.
        """
        records = self._journal.between(0, self._journal.durable_seq)
        by_key: dict[str, list[Record]] = collections.defaultdict(list)
        for record in records:
            by_key[record.key].append(record)
        chosen: set[str] = set()
        released: list[BatchRef] = []
        used = left_out = 0
        for ref in reversed(self._released):
            cost = _MESSAGE_OVERHEAD_BYTES + _size(by_key.get(ref.key(), ()))
            if used + cost > budget_bytes:
                left_out += 1
                continue
            used += cost
            released.append(ref)
            chosen.add(ref.key())
        extra: set[int] = set()
        for record in records:
            if record.key not in chosen:
                cost = _size((record,))
                if used + cost > budget_bytes:
                    break
                used += cost
                extra.add(record.seq)
        picked = [r for r in records if r.key in chosen or r.seq in extra]
        complete = left_out == 0 and len(picked) == len(records)
        return Handback(merge(picked, self._max_merge), released, left_out, self.held(), complete)


def _size(records: Iterable[Record]) -> int:
    return sum(len(r.payload) + _MESSAGE_OVERHEAD_BYTES for r in records)
