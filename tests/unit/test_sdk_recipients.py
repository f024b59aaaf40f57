"""The recipients of a submit: replayed for every attempt, split and chunked without loss."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from client_sdk import _convert
from client_sdk._recipients import (
    RecipientFeed,
    arecipient_chunks,
    asplit_head,
    recipient_chunks,
    split_head,
)
from client_sdk.types import Recipient
from mailerpb.mailer.v1 import common_pb2


def _recipients(n: int) -> list[Recipient]:
    return [Recipient(f"r{i}@example.com") for i in range(n)]


def _emails(messages: list[common_pb2.Recipient]) -> list[str]:
    return [m.email for m in messages]


def test_a_one_shot_iterator_is_replayed_whole_after_a_partial_read() -> None:
    # Given a feed over a generator, read part way by a first attempt
    feed = RecipientFeed(iter(_recipients(5)), _convert.recipient_to_pb)
    first = feed.read()
    assert _emails([next(first), next(first)]) == ["r0@example.com", "r1@example.com"]
    # When a second attempt reads, Then it gets everything, in order
    assert _emails(list(feed.read())) == [f"r{i}@example.com" for i in range(5)]
    # And so does a third, from what was remembered
    assert len(list(feed.read())) == 5


def test_a_factory_is_called_again_for_every_read() -> None:
    calls: list[int] = []

    def source() -> Iterator[Recipient]:
        calls.append(1)
        return iter(_recipients(2))

    feed = RecipientFeed(source, _convert.recipient_to_pb)
    assert len(list(feed.read())) == len(list(feed.read())) == 2
    assert len(calls) == 2


async def test_the_async_read_replays_an_async_generator() -> None:
    async def source() -> AsyncIterator[Recipient]:
        for r in _recipients(3):
            yield r

    feed = RecipientFeed(source(), _convert.recipient_to_pb)
    first = feed.aread()
    await anext(first)
    assert _emails([m async for m in feed.aread()]) == [f"r{i}@example.com" for i in range(3)]


async def test_the_async_read_replays_a_one_shot_iterator_and_rereads_a_factory() -> None:
    # A plain iterator, read part way by a first attempt, is replayed whole
    feed = RecipientFeed(iter(_recipients(4)), _convert.recipient_to_pb)
    first = feed.aread()
    await anext(first)
    assert _emails([m async for m in feed.aread()]) == [f"r{i}@example.com" for i in range(4)]

    # A factory of a list, and one of an async generator, are read anew each time
    async def agen() -> AsyncIterator[Recipient]:
        for r in _recipients(2):
            yield r

    for factory in (lambda: _recipients(2), agen):
        again = RecipientFeed(factory, _convert.recipient_to_pb)
        assert [len([m async for m in again.aread()]) for _ in range(2)] == [2, 2]


async def test_an_async_source_is_refused_by_the_blocking_read() -> None:
    async def source() -> AsyncIterator[Recipient]:
        yield Recipient("a@example.com")

    with pytest.raises(TypeError, match="async client"):
        list(RecipientFeed(source(), _convert.recipient_to_pb).read())


def test_the_head_overflows_just_past_the_limits() -> None:
    messages = [_convert.recipient_to_pb(r) for r in _recipients(4)]
    # Exactly max_count fits one request; one more overflows, and is the last read
    assert split_head(iter(messages[:3]), 3, 10**6) == (messages[:3], False)
    rest = iter(messages)
    head, more = split_head(rest, 3, 10**6)
    assert (head, more) == (messages, True) and list(rest) == []
    # Exactly max_bytes fits; a byte less overflows
    size = sum(m.ByteSize() for m in messages[:2])
    assert split_head(iter(messages[:2]), 10, size) == (messages[:2], False)
    assert split_head(iter(messages[:2]), 10, size - 1)[1] is True


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40), max_size=60),
    chunk_size=st.integers(min_value=1, max_value=7),
    chunk_max_bytes=st.integers(min_value=1, max_value=200),
    inline_max=st.integers(min_value=0, max_value=20),
)
def test_every_recipient_lands_in_exactly_one_chunk(
    sizes: list[int], chunk_size: int, chunk_max_bytes: int, inline_max: int
) -> None:
    # Given recipients of assorted sizes, split off as a head and then chunked
    messages = [
        common_pb2.Recipient(email=f"r{i}@example.com", name="x" * n) for i, n in enumerate(sizes)
    ]
    stream = iter(messages)
    head, _ = split_head(stream, inline_max, 10**6)
    chunks = list(recipient_chunks([*head, *stream], chunk_size, chunk_max_bytes))
    # Then nothing is lost, duplicated or reordered
    assert [m for chunk in chunks for m in chunk] == messages
    # And every chunk is within its limits, unless one recipient alone exceeds the size
    for chunk in chunks:
        assert 0 < len(chunk) <= chunk_size
        assert sum(m.ByteSize() for m in chunk[:-1]) < chunk_max_bytes


async def test_the_async_chunks_are_the_blocking_ones() -> None:
    messages = [_convert.recipient_to_pb(r) for r in _recipients(12)]

    async def source() -> AsyncIterator[common_pb2.Recipient]:
        for m in messages:
            yield m

    stream = source()
    head, more = await asplit_head(stream, 4, 10**6)
    assert more and head == messages[:5]
    chunks = [c async for c in arecipient_chunks(head, stream, 5, 10**6)]
    assert chunks == list(recipient_chunks(messages, 5, 10**6))
