"""Prometheus metrics of a sender node, in a registry of its own (no module globals).

Served on ``MAILER_METRICS_LISTEN`` (host:port; empty disables). Recipient domains
are a label: that is what operators throttle and debug by; their number is bounded
by the domains a deployment actually mails.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from mailers_runtime.breaker import BreakerState

_BREAKER_GAUGE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._message_children: dict[tuple[str, str, str], Counter] = {}
        self._reply_children: dict[int, Counter] = {}
        r = self.registry
        self.messages = Counter(
            "mailers_node_messages", "SMTP transactions by relay, recipient domain and outcome",
            ["relay", "domain", "status"], registry=r,
        )  # fmt: skip
        self.smtp_replies = Counter(
            "mailers_node_smtp_replies", "SMTP reply codes that decided a transaction",
            ["code"], registry=r,
        )  # fmt: skip
        self.transaction_seconds = Histogram(
            "mailers_node_transaction_seconds", "Duration of one SMTP transaction",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )  # fmt: skip
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
        """Recipients' transaction outcome in ``messages``. The labelled children are
        kept (``labels()`` takes a lock and validates on every call, once per message);
        they are as many as the metric's own."""
        key = (relay, domain, status)
        child = self._message_children.get(key)
        if child is None:
            child = self._message_children[key] = self.messages.labels(relay, domain, status)
        child.inc(recipients)

    def count_reply(self, code: int, recipients: int = 1) -> None:
        """A reply code that decided a transaction, in ``smtp_replies`` (once per
        recipient it decided)."""
        child = self._reply_children.get(code)
        if child is None:
            child = self._reply_children[code] = self.smtp_replies.labels(str(code))
        child.inc(recipients)

    def set_relay_breaker(self, relay: str, state: BreakerState) -> None:
        """Set the relay's breaker gauge (0 closed, 1 half-open, 2 open)."""
        self.relay_breaker_state.labels(relay).set(_BREAKER_GAUGE[state])

    def serve(self, listen: str) -> None:
        """Start the HTTP exporter (a daemon thread) on host:port."""
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
