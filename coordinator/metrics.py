"""Prometheus metrics of a coordinator, in a registry of its own (no module globals).

Served over HTTP on ``MAILER_METRICS_LISTEN`` (host:port; empty disables). Standbys
serve them too: ``mailers_coordinator_leader`` tells which one leads.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_BREAKER_VALUE = {"closed": 0, "half_open": 1, "open": 2}


class CoordinatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.leader = Gauge(
            "mailers_coordinator_leader", "1 while this coordinator leads", registry=r
        )
        self.leader_changes = Counter(
            "mailers_leader_changes", "Times this coordinator became or stopped being leader",
            ["change"], registry=r,
        )  # fmt: skip
        self.batches_dispatched = Counter(
            "mailers_batches_dispatched", "Batches handed to nodes", ["node"], registry=r
        )
        self.dispatch_rounds = Counter(
            "mailers_dispatch_rounds", "Dispatch rounds, each one store transaction", registry=r
        )
        self.batch_ack_seconds = Histogram(
            "mailers_batch_ack_seconds", "Time from handing a batch to a node to its ack",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120), registry=r,
        )  # fmt: skip
        self.reassignments = Counter(
            "mailers_batches_reassigned", "Batches taken from a node and queued again",
            ["reason"], registry=r,
        )  # fmt: skip
        self.recipients = Counter(
            "mailers_recipients", "Recipient outcomes applied", ["status"], registry=r
        )
        self.smtp_replies = Counter(
            "mailers_smtp_replies", "SMTP reply codes reported by nodes", ["code"], registry=r
        )
        self.duplicates = Counter(
            "mailers_duplicate_deliveries", "Recipients delivered more than once", registry=r
        )
        self.queue_batches = Gauge(
            "mailers_queue_batches", "Batches waiting to be handed out", ["kind"], registry=r
        )
        self.jobs_active = Gauge("mailers_jobs_active", "Unfinished jobs", registry=r)
        self.breaker_state = Gauge(
            "mailers_node_breaker_state",
            "Coordinator breaker per node: 0 closed, 1 half-open, 2 open",
            ["node"], registry=r,
        )  # fmt: skip
        self.nodes_connected = Gauge(
            "mailers_nodes_connected", "Nodes with an open dispatch stream", registry=r
        )
        self._webhook_metrics(r)

    def _webhook_metrics(self, r: CollectorRegistry) -> None:
        self.webhook_deliveries = Counter(
            "mailers_webhook_deliveries", "Webhook POSTs by endpoint and outcome (ok, failed)",
            ["webhook", "outcome"], registry=r,
        )  # fmt: skip
        self.webhook_events = Counter(
            "mailers_webhook_events_delivered", "Events an endpoint acknowledged",
            ["webhook"], registry=r,
        )  # fmt: skip
        self.webhook_lag = Gauge(
            "mailers_webhook_lag_seconds",
            "Age of the oldest event an endpoint has not acknowledged (0: caught up)",
            ["webhook"], registry=r,
        )  # fmt: skip
        self.webhook_failing = Gauge(
            "mailers_webhook_state", "Endpoint state: 0 active, 1 failing, 2 disabled",
            ["webhook"], registry=r,
        )  # fmt: skip

    def set_breaker(self, node: str, state: str) -> None:
        self.breaker_state.labels(node).set(_BREAKER_VALUE.get(state, 0))

    def serve(self, listen: str) -> None:
        """Start the HTTP exporter (a daemon thread) on host:port."""
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host or "0.0.0.0", registry=self.registry)
