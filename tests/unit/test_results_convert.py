"""The leader's side of a node's results: a shared message's recipients are converted
once, and what comes out is what converting each result on its own gives."""

from __future__ import annotations

import collections
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from coordinator import _convert
from coordinator.db.store import outcome_arguments
from coordinator.dispatcher import tally
from coordinator.model import RecipientOutcome, Result, Status
from mailerpb.mailer.v1 import common_pb2, sender_pb2

# Each field drawn from two values, so neighbours often agree on all but one of them.
_RESULTS = st.builds(
    lambda status, code, text, attempts, node, seconds, mid, relay, stamped: (
        common_pb2.RecipientResult(
            status=status,
            reply=common_pb2.SmtpReply(code=code, enhanced_code="2.0.0", text=text),
            attempts=attempts,
            node_id=node,
            updated_at=Timestamp(seconds=seconds, nanos=5) if stamped else None,
            message_id=mid,
            relay=relay,
        )
    ),
    st.sampled_from([common_pb2.RECIPIENT_STATUS_DELIVERED, common_pb2.RECIPIENT_STATUS_FAILED]),
    st.sampled_from([250, 550]),
    st.sampled_from(["ok", "no such user"]),
    st.integers(1, 2),
    st.sampled_from(["node0", "node1"]),
    st.integers(1_700_000_000, 1_700_000_001),
    st.sampled_from(["<a@example.com>", ""]),
    st.sampled_from(["r1", "r2"]),
    st.booleans(),
)


@given(st.lists(_RESULTS, min_size=1, max_size=20))
def test_results_convert_as_each_one_did(results: list[common_pb2.RecipientResult]) -> None:
    # Given a node's results, neighbours often equal but for index and address
    for index, r in enumerate(results):
        r.index, r.email = index, f"u{index}@example.org"
    pb = sender_pb2.BatchResults(batch_id="j1:0", seq=3, results=results)
    # When the leader reads them
    message = _convert.results_from(pb)
    # Then each is what converting it alone gives, and equal neighbours share one object
    assert message.batch_id == "j1:0" and message.seq == 3
    assert [i for i, _ in message.results] == [r.index for r in results]
    assert [res for _, res in message.results] == [_convert.result_from(r)[1] for r in results]
    for (_, a), (_, b) in zip(message.results, message.results[1:], strict=False):
        assert (a is b) == (a == b)
    # And PostgreSQL gets each shared result once, and for each recipient the row of its
    # unshared result
    outcomes = [RecipientOutcome("j1", i, res) for i, res in message.results]
    alone = [RecipientOutcome("j1", i, _convert.result_from(r)[1]) for i, r in enumerate(results)]
    shared = outcome_arguments(outcomes, 1.0)
    assert len(shared[0]) == len({id(res) for _, res in message.results})
    assert _rows(shared) == _rows(outcome_arguments(alone, 1.0))


def _rows(arguments: list[Any]) -> list[tuple[int, tuple[Any, ...]]]:
    """Each recipient's index and result row, as ``apply_results`` pairs them."""
    results, indexes, ends, _ = arguments
    assert len(results) == len(ends) and ends == sorted(set(ends)) and ends[-1] == len(indexes)
    starts = [0, *ends[:-1]]
    return [
        (index, row)
        for row, start, end in zip(results, starts, ends, strict=True)
        for index in indexes[start:end]
    ]


@given(
    st.lists(
        st.tuples(st.sampled_from(list(Status)), st.sampled_from([0, 250, 451, 550]),
                  st.integers(min_value=1, max_value=4)),
        max_size=12,
    )
)  # fmt: skip
def test_tally_counts_runs_as_counting_each_recipient_did(
    shape: list[tuple[Status, int, int]],
) -> None:
    """Counting a run of recipients that share a result once gives what counting every
    recipient on its own gives, whatever the mix of shared and single results."""
    runs: list[tuple[Result, int]] = []
    each: list[Result] = []
    for status, code, size in shape:
        result = Result(status, code=code)
        runs.append((result, len(each)))
        each += [result] * size
    statuses, codes = tally(runs, len(each))
    assert statuses == collections.Counter(r.status for r in each)
    assert codes == collections.Counter(r.code for r in each if r.code)
    assert sum(statuses.values()) == len(each)


@given(
    seconds=st.integers(-62_135_596_800, 253_402_300_799),
    nanos=st.integers(0, 999_999_999),
)
def test_a_timestamp_reads_as_protobuf_reads_it(seconds: int, nanos: int) -> None:
    stamp = Timestamp(seconds=seconds, nanos=nanos)
    assert _convert.unix(stamp, True) == stamp.ToNanoseconds() / 1e9
    assert _convert.unix(stamp, False) is None


def test_a_timestamp_out_of_range_gets_protobuf_s_error() -> None:
    for bad in (
        Timestamp(seconds=253_402_300_800),
        Timestamp(seconds=-62_135_596_801),
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=0, nanos=1_000_000_000),
    ):
        with pytest.raises(ValueError):
            _convert.unix(bad, True)


def test_a_result_without_a_time_has_time_zero() -> None:
    _, result = _convert.result_from(common_pb2.RecipientResult(index=3))
    assert result.updated_at == 0.0
