"""The node's hot-path shortcuts give what the longer ways gave: the permit read off the
live stream, cached metric children, the one-click token made only when used, and a
shared message's outcome judged once and converted once for its recipients."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram

from mailerpb.mailer.v1 import common_pb2, sender_pb2
from mailers_runtime.message import Content, Mailbox
from mailers_runtime.verp import Purpose, ReturnPath, TokenKey
from sender_node import _convert
from sender_node.classify import Phase
from sender_node.config import NodeTimings
from sender_node.fencing import StreamState, StreamView, start_refusal
from sender_node.metrics import TRANSACTION_BUCKETS, NodeMetrics
from sender_node.model import BatchRef, Recipient, Reply, Result, Status, Work
from sender_node.smtp_client import RelayInfo, SendOutcome
from sender_node.stream import Stream
from sender_node.transaction import Guard, SendEngine

NOW_S = 1_700_000_000.0
JOB = "01a248bca79b-5cda8cf7"


class CountingKey(TokenKey):
    """A token key that counts the tokens it makes, by purpose."""

    def __init__(self) -> None:
        super().__init__(b"k" * 32)
        self.made: list[Purpose] = []

    def token(self, purpose: Purpose, job_id: str, index: int) -> str:
        self.made.append(purpose)
        return super().token(purpose, job_id, index)


class FixedMailer:
    """Answers every transaction with the outcomes given (none: it must not be asked)."""

    def __init__(self, outcomes: list[SendOutcome] | None = None) -> None:
        self.outcomes = outcomes

    async def send_group(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        data: bytes,
        may_send: Callable[[], bool] | None = None,
    ) -> list[SendOutcome]:
        assert self.outcomes is not None and len(rcpts) == len(self.outcomes)
        return self.outcomes

    def relays(self) -> list[RelayInfo]:
        return []


def engine(path: ReturnPath) -> SendEngine:
    timings = NodeTimings(final_reply_s=60.0, start_budget_s=30.0, max_authority_s=5.0)
    return SendEngine(
        node_id="node0",
        mailer=FixedMailer(),
        concurrency=1,
        timings=timings,
        metrics=NodeMetrics(),
        return_path=path,
        wall_clock=lambda: NOW_S,
    )


def work(unsubscribe_url: str) -> Work:
    content = Content(
        sender=Mailbox("news@example.com", "News"),
        subject="Hello {{ name }}",
        text_body="Hi {{ name }}",
        unsubscribe_url=unsubscribe_url,
    )
    recipient = Recipient(index=41, email="ann@example.org", name="Ann", variables={}, attempts=0)
    return Work(BatchRef("b1", 1), JOB, 1, 0, content, (recipient,), bounce_domain="")


def test_the_job_s_own_unsubscribe_url_makes_no_node_token() -> None:
    # Given a node with one-click unsubscribe links and a job with its own URL
    key = CountingKey()
    path = ReturnPath(key, "bounces.example.com", unsubscribe_url="https://u.example/")
    node, batch = engine(path), work("https://example.com/unsub?e={{email}}")
    compiled = node.compile(batch)
    recipient = batch.recipients[0]
    # When the message is rendered
    data = node._render(compiled, batch.recipients)
    # Then it is what rendering with the node's link gave (the job's URL wins), and no
    # unsubscribe token was made for it
    assert key.made == []
    date = datetime.fromtimestamp(NOW_S, UTC)
    link = path.list_unsubscribe(JOB, recipient.index)
    expected = compiled.render(
        index=41, email=recipient.email, name="Ann", variables={}, date=date, unsubscribe=link
    )
    assert data == expected
    assert b"List-Unsubscribe: <https://example.com/unsub?e=ann%40example.org>" in data


def test_a_job_without_its_own_url_gets_the_node_s_one_click_link() -> None:
    # Given a node with one-click unsubscribe links and a job without a URL
    key = CountingKey()
    path = ReturnPath(key, "bounces.example.com", unsubscribe_url="https://u.example/")
    node, batch = engine(path), work("")
    compiled = node.compile(batch)
    # When the message is rendered
    data = node._render(compiled, batch.recipients)
    # Then it carries the node's signed link and the one-click header
    assert key.made == [Purpose.UNSUBSCRIBE]
    link = path.list_unsubscribe(JOB, 41)
    assert f"List-Unsubscribe: {link}\r\n".encode() in data
    assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n" in data


async def test_a_shared_outcome_is_judged_once_and_each_recipient_gets_its_own_result() -> None:
    # Given a job sharing its message, and a relay that accepted the message for two of
    # three recipients and refused the middle one at RCPT
    accepted = SendOutcome(250, "2.0.0 queued", Phase.DATA_END, relay="r1")
    refused = SendOutcome(550, "5.1.1 no such user", Phase.RCPT, relay="r1")
    node = engine(ReturnPath(CountingKey(), "bounces.example.com"))
    node.mailer = FixedMailer([accepted, refused, accepted])
    content = Content(
        sender=Mailbox("news@example.com"), subject="Notice", text_body="Hi",
        recipients_per_message=3,
    )  # fmt: skip
    group = tuple(
        Recipient(index=i, email=f"u{i}@example.org", name="", variables={}, attempts=i)
        for i in range(3)
    )
    batch = Work(BatchRef("b1", 1), JOB, 1, 0, content, group, bounce_domain="")
    recorded: list[Result] = []

    # When the transaction runs
    sent = await node.transact(
        node.compile(batch), group, 0, lambda: True, recorded.extend, Guard()
    )

    # Then each recipient has its own result: attempts and address its own, the
    # verdict of its own outcome
    assert sent
    assert [(r.index, r.email, r.status, r.attempts) for r in recorded] == [
        (0, "u0@example.org", Status.DELIVERED, 1),
        (1, "u1@example.org", Status.FAILED, 2),
        (2, "u2@example.org", Status.DELIVERED, 3),
    ]
    assert [r.reply.code if r.reply else 0 for r in recorded] == [250, 550, 250]
    assert recorded[0].message_id == recorded[2].message_id != ""
    # And the metrics count every recipient, as counting them one by one did
    samples = {
        (s.name, tuple(sorted(s.labels.values()))): s.value
        for family in node.metrics.registry.collect()
        for s in family.samples
        if s.name in ("mailers_node_messages_total", "mailers_node_smtp_replies_total")
    }
    assert samples == {
        ("mailers_node_messages_total", ("delivered", "example.org", "r1")): 2,
        ("mailers_node_messages_total", ("example.org", "permanent", "r1")): 1,
        ("mailers_node_smtp_replies_total", ("250",)): 2,
        ("mailers_node_smtp_replies_total", ("550",)): 1,
    }


SHARED_REPLIES = [
    Reply(250, "2.0.0", "2.0.0 Ok: queued"),
    Reply(550, "5.1.1", "no such user"),
    None,
]


@given(
    st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 5), st.sampled_from(SHARED_REPLIES)),
        min_size=1,
        max_size=30,
    )
)
def test_a_records_results_serialize_as_converting_each_one_did(
    rows: list[tuple[int, int, Reply | None]],
) -> None:
    # Given the results of one transaction: recipients sharing an outcome or not
    results = [
        Result(
            index=index,
            email=f"u{index}@example.org",
            status=Status.DELIVERED if reply and reply.code == 250 else Status.FAILED,
            reason="" if reply else "relay unavailable",
            attempts=attempts,
            node_id="node0",
            updated_at_ns=1_700_000_000_123_456_789,
            reply=reply,
            relay="r1",
            message_id="<m@example.com>",
        )  # fmt: skip
        for index, attempts, reply in rows
    ]
    # When they are serialized for the journal
    payload = _convert.results_payload(7, BatchRef("b1", 2), results)
    # Then the bytes are those of converting every result on its own
    one_by_one = sender_pb2.BatchResults(
        batch_id="b1", attempt=2, seq=7, results=[_convert.result_to_proto(r) for r in results]
    )
    assert payload == one_by_one.SerializeToString()
    # And each result reads back field by field (the two sides share the field setting)
    parsed = sender_pb2.BatchResults.FromString(payload)
    assert [_fields(m) for m in parsed.results] == [_expected_fields(r) for r in results]


def _fields(m: common_pb2.RecipientResult) -> tuple[object, ...]:
    reply = (m.reply.code, m.reply.enhanced_code, m.reply.text) if m.HasField("reply") else None
    status = common_pb2.RecipientStatus.Name(m.status)
    return (m.index, m.email, status, m.reason, m.attempts, m.node_id, m.ambiguous, reply,
            m.relay, m.message_id, m.updated_at.ToNanoseconds())  # fmt: skip


def _expected_fields(r: Result) -> tuple[object, ...]:
    reply = (r.reply.code, r.reply.enhanced_code, r.reply.text) if r.reply else None
    status = f"RECIPIENT_STATUS_{r.status.name}"
    return (r.index, r.email, status, r.reason, r.attempts, r.node_id, r.ambiguous, reply,
            r.relay, r.message_id, r.updated_at_ns)  # fmt: skip


@given(
    calls=st.lists(
        st.tuples(
            st.sampled_from(["r1", "r2"]),
            st.sampled_from(["a.example", "b.example"]),
            st.sampled_from(["delivered", "permanent", "transient"]),
            st.sampled_from([0, 250, 421, 550]),
            st.integers(1, 100),
            st.one_of(st.sampled_from(TRANSACTION_BUCKETS), st.floats(0, 60)),
        ),
        max_size=30,
    )
)
def test_tallied_metrics_expose_what_prometheus_metrics_would(
    calls: list[tuple[str, str, str, int, int, float]],
) -> None:
    # Given prometheus_client's own labelled counters and histogram beside the node's
    reference = CollectorRegistry()
    messages = Counter(
        "mailers_node_messages", "SMTP transactions by relay, recipient domain and outcome",
        ["relay", "domain", "status"], registry=reference,
    )  # fmt: skip
    replies = Counter(
        "mailers_node_smtp_replies", "SMTP reply codes that decided a transaction",
        ["code"], registry=reference,
    )  # fmt: skip
    seconds = Histogram(
        "mailers_node_transaction_seconds", "Duration of one SMTP transaction",
        buckets=TRANSACTION_BUCKETS, registry=reference,
    )  # fmt: skip
    tallied = NodeMetrics()
    # When the same transactions are counted both ways (bounds themselves included)
    for relay, domain, status, code, recipients, duration in calls:
        messages.labels(relay, domain, status).inc(recipients)
        tallied.count_message(relay, domain, status, recipients)
        if code:
            replies.labels(str(code)).inc(recipients)
            tallied.count_reply(code, recipients)
        seconds.observe(duration)
        tallied.observe_transaction(duration)

    # Then both expose the same families and samples, in the same order
    def samples(registry: CollectorRegistry) -> list[tuple[object, ...]]:
        return [
            (f.name, f.type, f.documentation, sorted(
                (s.name, sorted(s.labels.items()), s.value if "created" not in s.name else 0)
                for s in f.samples
            ))
            for f in registry.collect()
            if f.name.startswith(("mailers_node_messages", "mailers_node_smtp_replies",
                                  "mailers_node_transaction_seconds"))
        ]  # fmt: skip

    expected = samples(reference)
    assert samples(tallied.registry) == expected
    assert [f[0] for f in expected] == [
        "mailers_node_messages",
        "mailers_node_smtp_replies",
        "mailers_node_transaction_seconds",
    ]


@given(
    epoch=st.integers(0, 3),
    current=st.booleans(),
    ended=st.booleans(),
    half_closed=st.booleans(),
    now_s=st.floats(0, 20),
    highest=st.integers(0, 3),
    trusted=st.booleans(),
    stopping=st.sampled_from([None, "stopping"]),
)
def test_the_live_stream_permits_as_its_view_does(
    epoch: int,
    current: bool,
    ended: bool,
    half_closed: bool,
    now_s: float,
    highest: int,
    trusted: bool,
    stopping: str | None,
) -> None:
    # Given a stream in any state
    stream = Stream(epoch, "c1", max_authority_s=10.0)
    stream.grant(0.0, 10_000)
    stream.current, stream.ended, stream.half_closed = current, ended, half_closed

    # When a transaction asks for a permit, reading the stream itself or its view
    def ask(state: StreamState) -> str | None:
        return start_refusal(
            state,
            now_s=now_s,
            highest_epoch=highest,
            lease_trusted=trusted,
            stopping=stopping,
        )

    # Then both answers are the same
    view = StreamView(stream.epoch, stream.current, stream.open, stream.authority_until_s)
    assert ask(stream) == ask(view)
