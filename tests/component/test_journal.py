"""The result journal and the outbox on a real directory: appends, fsync, restarts,
torn tails, acknowledgements, segment retention, and what a stream or hand-back gets."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from sender_node.journal import Journal, JournalError
from sender_node.journal_format import Record, encode, segment_first_seq
from sender_node.model import BatchRef, Release, Result, Status
from sender_node.outbox import Outbox, ResultsMessage, merge, merge_by_batch
from tests.helpers import assert_eventually

B1 = BatchRef("b1", 1)
B2 = BatchRef("b2", 1)


def segments(directory: Path) -> list[int]:
    return sorted(n for n in map(segment_first_seq, os.listdir(directory)) if n is not None)


async def test_appends_become_durable_and_are_announced(tmp_path: Path) -> None:
    # Given a fresh journal whose fsync task runs
    journal = Journal.open(tmp_path / "j")
    durable: list[int] = []
    journal.on_durable(durable.append)
    journal.start()
    try:
        # When three records are appended (synchronously)
        seqs = [journal.append(2, B1.key(), lambda seq: b"r%d" % seq).seq for _ in range(3)]

        # Then they are numbered from 1, written at once, and durable after the fsync
        assert seqs == [1, 2, 3]
        assert journal.last_seq == 3 and journal.unacked_results == 6
        async with asyncio.timeout(10):
            await journal.wait_durable(3)
        assert journal.durable_seq == 3 and durable[-1] == 3
        assert [r.payload for r in journal.unacked()] == [b"r1", b"r2", b"r3"]
    finally:
        await journal.close()


async def test_a_restart_reads_everything_back_and_continues_the_sequence(tmp_path: Path) -> None:
    # Given a journal with three records, closed (the process ended)
    journal = Journal.open(tmp_path)
    journal.start()
    for _ in range(3):
        journal.append(1, B1.key(), lambda seq: b"x%d" % seq)
    await journal.close()

    # When a new process opens the same directory
    again = Journal.open(tmp_path)
    try:
        # Then every record is unacknowledged and durable, and the sequence goes on
        assert [r.seq for r in again.unacked()] == [1, 2, 3]
        assert again.durable_seq == 3
        assert again.append(1, B1.key(), lambda seq: b"y").seq == 4
    finally:
        await again.close()


async def test_a_torn_tail_is_dropped_on_restart(tmp_path: Path) -> None:
    # Given a journal whose last record was half written when the process died
    journal = Journal.open(tmp_path)
    journal.start()
    for _ in range(2):
        journal.append(1, B1.key(), lambda seq: b"whole")
    await journal.close()
    (segment,) = segments(tmp_path)
    path = tmp_path / f"{segment:020d}.seg"
    torn = encode(Record(3, 1, B1.key(), b"never finished"))[:-4]
    with path.open("ab") as f:
        f.write(torn)

    # When it is opened again
    again = Journal.open(tmp_path)
    try:
        # Then the torn record is gone (from the file too), the rest is intact, and the
        # next record takes the torn one's place in the sequence
        assert [r.seq for r in again.unacked()] == [1, 2]
        assert path.stat().st_size == 2 * len(encode(Record(1, 1, B1.key(), b"whole")))
        assert again.append(1, B1.key(), lambda seq: b"z").seq == 3
    finally:
        await again.close()


async def test_acks_truncate_and_full_segments_are_deleted(tmp_path: Path) -> None:
    # Given small segments (rotated after every ~2 records) holding six records
    journal = Journal.open(tmp_path, segment_bytes=120, sync_interval_s=0.0)
    journal.start()
    try:
        for _ in range(6):
            journal.append(1, B1.key(), lambda seq: b"p" * 40)
        async with asyncio.timeout(10):
            await journal.wait_durable(6)
        assert len(segments(tmp_path)) == 3

        # When records up to 4 are acknowledged
        assert journal.ack(4) == 4

        # Then they are forgotten, and the segments holding only them are deleted
        assert [r.seq for r in journal.unacked()] == [5, 6]
        assert journal.unacked_results == 2
        await assert_eventually(lambda: segments(tmp_path) == [5], timeout_s=10)

        # And when the rest is acknowledged, the last segment goes too
        journal.ack(6)
        await assert_eventually(lambda: segments(tmp_path) == [], timeout_s=10)
    finally:
        await journal.close()

    # And a restart finds nothing unacknowledged, yet never reuses a sequence number
    again = Journal.open(tmp_path)
    try:
        assert list(again.unacked()) == []
        assert again.append(1, B1.key(), lambda seq: b"q").seq == 7
    finally:
        await again.close()


async def test_acks_never_pass_the_durable_mark(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)
    try:
        # Given a record written but not yet fsynced (the fsync task is not running)
        journal.append(1, B1.key(), lambda seq: b"p")

        # Then an acknowledgement of it is ignored: a leader cannot have it yet
        assert journal.ack(1) == 0
        assert journal.unacked_results == 1
    finally:
        await journal.close()


async def test_a_second_process_cannot_open_the_same_directory(tmp_path: Path) -> None:
    journal = Journal.open(tmp_path)
    try:
        with pytest.raises(JournalError, match="in use"):
            Journal.open(tmp_path)
    finally:
        await journal.close()
    Journal.open(tmp_path)  # the lock went with the first one


def test_merge_groups_consecutive_records_of_one_batch() -> None:
    records = [
        Record(1, 2, B1.key(), b"a"),
        Record(2, 2, B1.key(), b"b"),
        Record(3, 1, B2.key(), b"c"),
        Record(4, 2, B1.key(), b"d"),
        Record(5, 2, B1.key(), b"e"),
        Record(6, 2, B1.key(), b"f"),
    ]
    assert merge(records, max_results=4) == [
        ResultsMessage(2, B1, (b"a", b"b"), 4),
        ResultsMessage(3, B2, (b"c",), 1),
        ResultsMessage(5, B1, (b"d", b"e"), 4),
        ResultsMessage(6, B1, (b"f",), 2),
    ]


def test_merge_by_batch_groups_interleaved_records_in_the_order_of_their_seqs() -> None:
    records = [
        Record(1, 1, B1.key(), b"a"),
        Record(2, 1, B2.key(), b"b"),
        Record(3, 2, B1.key(), b"c"),
        Record(4, 1, B2.key(), b"d"),
        Record(5, 2, B1.key(), b"e"),
    ]
    assert merge_by_batch(records, max_results=4) == [
        ResultsMessage(3, B1, (b"a", b"c"), 3),
        ResultsMessage(4, B2, (b"b", b"d"), 2),
        ResultsMessage(5, B1, (b"e",), 2),
    ]


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    """An outbox on a started journal that syncs as soon as it is written to."""
    journal = Journal.open(tmp_path, sync_interval_s=0.0)
    journal.start()
    try:
        yield Outbox(journal, encode_results)
    finally:
        await journal.close()


class FakeLink:
    def __init__(self) -> None:
        self.sent: list[ResultsMessage | Release] = []

    def send_results(self, message: ResultsMessage) -> None:
        self.sent.append(message)

    def send_release(self, release: Release) -> None:
        self.sent.append(release)


def result(index: int) -> Result:
    return Result(index, f"u{index}@example.org", Status.DELIVERED, "250", 1, "n", 0)


def encode_results(seq: int, ref: BatchRef, results: Sequence[Result]) -> bytes:
    return f"{ref.batch_id}:{seq}:{len(results)}".encode()


async def test_the_outbox_sends_results_after_their_fsync_then_the_release(outbox: Outbox) -> None:
    # Given an outbox on a journal, a stream attached, and a batch held
    link = FakeLink()
    assert outbox.attach(link).replay == []
    outbox.hold(B1)

    # When two transactions' results are recorded and the batch is released
    outbox.record(B1, [result(0)])
    outbox.record(B1, [result(1), result(2)])
    outbox.release(Release(B1, epoch=3, unattempted=1))

    # Then nothing goes out before the fsync; after it, the results (one message)
    # and then the release
    assert link.sent == [] and outbox.held() == [B1]
    await assert_eventually(lambda: len(link.sent) == 2, timeout_s=10)
    message, release = link.sent
    assert message == ResultsMessage(2, B1, (b"b1:1:1", b"b1:2:2"), 3)
    assert release == Release(B1, 3, 1)
    assert outbox.held() == []

    # And an ack of that message lets the journal forget both records
    outbox.ack(link, 2)
    assert outbox.unacked_results == 0


async def test_one_sync_goes_out_grouped_by_batch_and_is_acknowledged_whole(outbox: Outbox) -> None:
    # Given an outbox whose stream is attached, with two batches at work
    link = FakeLink()
    outbox.attach(link)
    outbox.hold(B1)
    outbox.hold(B2)

    # When their transactions' results interleave within one fsync
    outbox.record(B1, [result(0)])
    outbox.record(B2, [result(5)])
    outbox.record(B1, [result(1)])
    outbox.record(B2, [result(6)])

    # Then one message per batch goes out, in the order of their last seqs
    await assert_eventually(lambda: len(link.sent) == 2, timeout_s=10)
    assert link.sent == [
        ResultsMessage(3, B1, (b"b1:1:1", b"b1:3:1"), 2),
        ResultsMessage(4, B2, (b"b2:2:1", b"b2:4:1"), 2),
    ]
    # And an ack of the first message forgets nothing: seq 2 is in the second
    outbox.ack(link, 3)
    assert outbox.unacked_results == 4
    # And an ack of the last one forgets the whole sync
    outbox.ack(link, 4)
    assert outbox.unacked_results == 0


async def test_a_new_stream_gets_the_unacked_results_and_the_held_batches(outbox: Outbox) -> None:
    # Given results sent on a stream that ended without acknowledging them, and a
    # batch still held
    first = FakeLink()
    outbox.attach(first)
    outbox.hold(B1)
    outbox.hold(B2)
    outbox.record(B1, [result(0)])
    outbox.record(B2, [result(5)])
    outbox.release(Release(B2, epoch=3, unattempted=0))
    await assert_eventually(lambda: len(first.sent) == 3, timeout_s=10)
    outbox.detach(first)

    # When another stream attaches
    second = FakeLink()
    greeting = outbox.attach(second)

    # Then its hello replays both results and lists the batch still held
    assert [m.seq for m in greeting.replay] == [1, 2]
    assert greeting.held == [B1]
    # And an ack from the old stream counts for nothing, one from the new does
    outbox.ack(first, 2)
    assert outbox.unacked_results == 2
    outbox.ack(second, 1)
    assert outbox.unacked_results == 1
    # And an ack between two messages stops at the last message at or below it
    outbox.ack(second, 1_000)
    assert outbox.unacked_results == 0


async def test_a_handback_lists_released_batches_with_all_their_results(
    tmp_path: Path,
) -> None:
    # Given two released batches whose results no leader acknowledged, with no stream
    journal = Journal.open(tmp_path, sync_interval_s=0.0)
    journal.start()
    outbox = Outbox(journal, encode_results)
    try:
        for ref in (B1, B2):
            outbox.hold(ref)
            outbox.record(ref, [result(0), result(1)])
            outbox.release(Release(ref, epoch=3, unattempted=0))
        async with asyncio.timeout(10):
            await journal.wait_durable(2)
        await assert_eventually(lambda: not outbox.held(), timeout_s=10)

        # When the hand-back is made with room for everything
        full = outbox.handback()

        # Then both batches are released with all their results
        assert sorted(r.batch_id for r in full.released) == ["b1", "b2"]
        assert [m.ref for m in full.results] == [B1, B2] and full.left_out == 0

        # And with room for one batch only, the newest release goes with its results
        one = outbox.handback(budget_bytes=200)
        assert one.released == [B2] and one.left_out == 1
        assert [m.ref for m in one.results] == [B2]
    finally:
        await journal.close()


async def test_a_disk_error_keeps_results_in_memory_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a journal whose disk fills up
    journal = Journal.open(tmp_path, sync_interval_s=0.0)
    journal.start()
    try:

        def full(fd: int, data: object) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr("sender_node.journal.os.write", full)

        # When a record is appended
        record = journal.append(1, B1.key(), lambda seq: b"p")

        # Then the journal reports the failure, keeps the record in memory, and lets it
        # count as durable (holding it back would only keep it from a leader)
        assert journal.failed is not None and "No space" in journal.failed
        async with asyncio.timeout(10):
            await journal.wait_durable(record.seq)
        assert [r.seq for r in journal.unacked()] == [record.seq]
    finally:
        monkeypatch.undo()
        await journal.close()
