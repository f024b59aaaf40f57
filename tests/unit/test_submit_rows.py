"""What submit hands to COPY: recipients read from the wire, their maps as JSON."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from coordinator import _convert
from coordinator.db.store import json_object
from coordinator.model import Recipient
from mailerpb.mailer.v1 import common_pb2

_maps = st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=6)


@given(strings=_maps)
def test_a_map_is_written_as_json_dumps_writes_it(strings: dict[str, str]) -> None:
    assert json_object(strings) == json.dumps(strings)
    assert json.loads(json_object(strings)) == strings


def test_quotes_controls_and_non_ascii_are_escaped() -> None:
    strings = {'say "hi"': "a\\b\n\t\x00\x1f", "ünï": "🙂 \u2028 \ud800"}
    assert json_object(strings) == json.dumps(strings)
    assert json_object(strings).isascii()


@given(email=st.text(max_size=30), name=st.text(max_size=30), variables=_maps, metadata=_maps)
def test_a_recipient_reads_back_as_sent(
    email: str, name: str, variables: dict[str, str], metadata: dict[str, str]
) -> None:
    pb = common_pb2.Recipient(email=email, name=name, variables=variables, metadata=metadata)
    recipient = _convert.recipient_from(pb)
    assert recipient == Recipient(email, name, variables, metadata)
    # Plain dicts, not views of the message: clearing it changes nothing
    pb.Clear()
    assert (recipient.variables, recipient.metadata) == (variables, metadata)
    assert type(recipient.variables) is dict and type(recipient.metadata) is dict
