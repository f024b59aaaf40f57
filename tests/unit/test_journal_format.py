"""The journal's record format, torn tails, and its retention rule (pure)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sender_node.journal_format import (
    Record,
    Span,
    decode_mark,
    encode,
    encode_mark,
    next_seq,
    retired,
    scan,
    segment_first_seq,
    segment_name,
)
from sender_node.model import BatchRef

records = st.builds(
    Record,
    seq=st.integers(min_value=1, max_value=2**63),
    results=st.integers(min_value=0, max_value=500),
    key=st.text(max_size=40),
    payload=st.binary(max_size=300),
)


@given(st.lists(records, max_size=8))
def test_records_read_back_as_written(written: list[Record]) -> None:
    # Given records framed one after another
    data = b"".join(encode(r) for r in written)

    # When the bytes are scanned
    result = scan(data)

    # Then every record comes back, and nothing is dropped
    assert result.records == written
    assert result.valid_bytes == len(data)
    assert not result.damaged(len(data))


@given(st.lists(records, min_size=1, max_size=5), st.data())
def test_a_torn_tail_drops_only_the_last_record(written: list[Record], data: st.DataObject) -> None:
    # Given records whose last one was cut anywhere inside its frame (a crash mid-write)
    whole = b"".join(encode(r) for r in written[:-1])
    last = encode(written[-1])
    cut = data.draw(st.integers(min_value=0, max_value=len(last) - 1))
    torn = whole + last[:cut]

    # When the bytes are scanned
    result = scan(torn)

    # Then the intact records come back and the torn one is dropped
    assert result.records == written[:-1]
    assert result.valid_bytes == len(whole)
    assert result.damaged(len(torn)) == (cut > 0)


def test_a_flipped_bit_stops_the_scan_at_that_record() -> None:
    # Given three records, the second damaged in its payload
    first, second, third = (Record(n, 1, "1:b", b"payload-%d" % n) for n in (1, 2, 3))
    damaged = bytearray(encode(second))
    damaged[-1] ^= 0x01
    data = encode(first) + bytes(damaged) + encode(third)

    # When scanned, only the first survives: nothing after damage can be trusted
    result = scan(data)
    assert result.records == [first]
    assert result.valid_bytes == len(encode(first))


def test_an_absurd_length_is_damage_not_a_huge_read() -> None:
    # Given a frame header claiming a 1 GiB body
    data = struct.pack("<II", 1 << 30, 0) + b"x" * 32

    # Then nothing is read
    assert scan(data).records == []
    assert scan(data).valid_bytes == 0


def test_encode_refuses_fields_that_do_not_fit() -> None:
    with pytest.raises(ValueError):
        encode(Record(-1, 1, "k", b""))
    with pytest.raises(ValueError):
        encode(Record(1, 1, "k" * 70_000, b""))


def test_segment_names_sort_by_first_seq() -> None:
    names = [segment_name(n) for n in (10, 9, 100, 1)]
    assert sorted(names) == [segment_name(n) for n in (1, 9, 10, 100)]
    assert segment_first_seq(segment_name(42)) == 42
    assert segment_first_seq("acked") is None
    assert segment_first_seq("42.seg") is None


def test_retired_segments_are_those_wholly_acknowledged() -> None:
    # Given segments holding seqs 1-10, 11-20 and 21-25, and one empty
    spans = [Span(1, 10), Span(11, 20), Span(21, 25), Span(26, 0)]

    # When everything up to 15 is acknowledged
    gone = retired(spans, acked_through=15)

    # Then the first goes (and the empty one); the second still holds 16-20
    assert gone == [Span(1, 10), Span(26, 0)]
    assert retired(spans, acked_through=25) == spans
    assert retired(spans, acked_through=0) == [Span(26, 0)]


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_the_acked_mark_reads_back(through: int) -> None:
    assert decode_mark(encode_mark(through)) == through


def test_a_damaged_or_missing_mark_reads_as_nothing_acknowledged() -> None:
    mark = bytearray(encode_mark(77))
    mark[0] ^= 0xFF
    assert decode_mark(bytes(mark)) == 0
    assert decode_mark(b"") == 0
    assert decode_mark(b"garbage") == 0


def test_the_sequence_continues_after_both_records_and_the_mark() -> None:
    # After the highest record found
    assert next_seq([3, 9, 4], acked_through=2) == 10
    # After the mark when every segment was deleted: a seq is never reused
    assert next_seq([], acked_through=500) == 501
    assert next_seq([], acked_through=0) == 1


@given(st.text(max_size=30), st.integers(min_value=1, max_value=10_000))
def test_batch_keys_round_trip(batch_id: str, attempt: int) -> None:
    ref = BatchRef(batch_id, attempt)
    assert BatchRef.from_key(ref.key()) == ref


def test_a_key_not_made_by_a_batch_is_refused() -> None:
    with pytest.raises(ValueError):
        BatchRef.from_key("no-attempt")
