"""Prometheus metrics of a sender node, in a registry of its own (no module globals).

Served on ``MAILER_METRICS_LISTEN`` (host:port; empty disables). Recipient domains
are a label: that is what operators throttle and debug by; their number is bounded
by the domains a deployment actually mails.

The three metrics counted once per transaction (``messages``, ``smtp_replies``,
``transaction_seconds``) are plain numbers in a :class:`_TransactionTally`, turned into
metric families only when scraped: prometheus_client's own counters and histogram take
a lock and walk their buckets on every call, 21k instructions per transaction against
a few thousand here. The exposition is the same as theirs.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from mailers_runtime.breaker import BreakerState

_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}

TRANSACTION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# The ``le`` labels prometheus_client gives these bounds, and the last bucket's.
_BUCKET_LABELS = (*(repr(float(b)) for b in TRANSACTION_BUCKETS), "+Inf")


class _TransactionTally(Collector):
    """Per-transaction counts, kept as plain numbers on the event loop and read by the
    exporter's thread at scrape time. The reads copy each mapping or list in one C call,
    which the GIL keeps whole, so a scrape sees no half-made update of a mapping."""

    def __init__(self) -> None:
        self.messages: dict[tuple[str, str, str], float] = {}
        self.replies: dict[int, float] = {}
        self.messages_created: dict[tuple[str, str, str], float] = {}
        self.replies_created: dict[int, float] = {}
        self.bucket_counts = [0] * (len(TRANSACTION_BUCKETS) + 1)  # the last one is +Inf
        self.seconds_sum = 0.0
        self.seconds_created = time.time()

    def collect(self) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "mailers_node_messages", "SMTP transactions by relay, recipient domain and outcome",
            labels=["relay", "domain", "status"],
        )  # fmt: skip
        created = dict(self.messages_created)
        for key, value in dict(self.messages).items():
            messages.add_metric(key, value, created=created.get(key))
        yield messages
        replies = CounterMetricFamily(
            "mailers_node_smtp_replies", "SMTP reply codes that decided a transaction",
            labels=["code"],
        )  # fmt: skip
        replies_created = dict(self.replies_created)
        for code, value in dict(self.replies).items():
            replies.add_metric([str(code)], value, created=replies_created.get(code))
        yield replies
        counts, total = list(self.bucket_counts), self.seconds_sum
        cumulative, buckets = 0, []
        for label, count in zip(_BUCKET_LABELS, counts, strict=True):
            cumulative += count
            buckets.append((label, cumulative))
        seconds = HistogramMetricFamily(
            "mailers_node_transaction_seconds", "Duration of one SMTP transaction",
            buckets=buckets, sum_value=total,
        )  # fmt: skip
        seconds.add_sample("mailers_node_transaction_seconds_created", {}, self.seconds_created)
        yield seconds


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._tally = _TransactionTally()
        r.register(self._tally)
        self.in_flight = Gauge(
            "mailers_node_in_flight", "Recipients accepted and not yet reported", registry=r
        )
        self.batches = Counter(
            "mailers_node_batches", "Batches by how they ended", ["outcome"], registry=r
        )
        self.lease_renewals = Counter(
            "mailers_node_lease_renewals", "Lease keepalives by result", ["result"], registry=r
        )
        self.registrations = Counter(
            "mailers_node_registrations", "Times the node registered under a new lease", registry=r
        )
        self.throttled = Counter(
            "mailers_node_throttled", "Transactions deferred waiting for their domain's turn",
            ["domain"], registry=r,
        )  # fmt: skip
        self.domain_slowdowns = Counter(
            "mailers_node_domain_slowdowns", "421/451 replies that cut a domain's rate",
            ["domain"], registry=r,
        )  # fmt: skip
        self.relay_breaker_state = Gauge(
            "mailers_node_relay_breaker_state",
            "Per-relay breaker: 0 closed, 1 half-open, 2 open", ["relay"], registry=r,
        )  # fmt: skip

    def count_message(self, relay: str, domain: str, status: str, recipients: int = 1) -> None:
        """Recipients' transaction outcome in ``mailers_node_messages``."""
        tally = self._tally
        key = (relay, domain, status)
        value = tally.messages.get(key)
        if value is None:
            tally.messages_created[key] = time.time()
            value = 0.0
        tally.messages[key] = value + recipients

    def count_reply(self, code: int, recipients: int = 1) -> None:
        """A reply code that decided a transaction, in ``mailers_node_smtp_replies``
        (once per recipient it decided)."""
        tally = self._tally
        value = tally.replies.get(code)
        if value is None:
            tally.replies_created[code] = time.time()
            value = 0.0
        tally.replies[code] = value + recipients

    def observe_transaction(self, seconds: float) -> None:
        """One transaction's duration in ``mailers_node_transaction_seconds``."""
        tally = self._tally
        tally.bucket_counts[bisect.bisect_left(TRANSACTION_BUCKETS, seconds)] += 1
        tally.seconds_sum += seconds

    def set_relay_breaker(self, relay: str, state: BreakerState) -> None:
        """Set the relay's breaker gauge (0 closed, 1 half-open, 2 open)."""
        self.relay_breaker_state.labels(relay).set(_BREAKER_GAUGE[state])

    def serve(self, listen: str) -> None:
        """Start the HTTP exporter (a daemon thread) on host:port."""
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
