"""The typed etcd values written by one process and read by another."""

from __future__ import annotations

import json

import pytest

from mailers_runtime.records import NodeRecord


def test_a_node_record_reads_back_as_written() -> None:
    record = NodeRecord("n1", "127.0.0.1:5000", 0xABC, 400, 1_700_000_000.5)
    # When it is stored and read back
    value = record.encode()
    # Then it is the same record, in JSON with sorted keys
    assert NodeRecord.decode(value) == record
    assert list(json.loads(value)) == sorted(json.loads(value))


def test_a_record_without_optional_fields_takes_the_key_s_node_id() -> None:
    record = NodeRecord.decode(b'{"address": "10.0.0.2:7800"}', node_id="n2")
    assert record == NodeRecord("n2", "10.0.0.2:7800")


@pytest.mark.parametrize(
    "value",
    [b"not json", b"[1, 2]", b'{"capacity": 4}', b'{"address": "a:1", "capacity": "many"}'],
)
def test_a_malformed_record_is_a_value_error_that_says_so(value: bytes) -> None:
    with pytest.raises(ValueError, match="malformed node registration"):
        NodeRecord.decode(value, node_id="n3")
