"""The node's time bounds come from one table and are checked for consistency; the
journal's settings come from MAILER_STATE_DIR and MAILER_MAX_UNACKED_RESULTS."""

from __future__ import annotations

import pytest

from sender_node.config import (
    MAX_MESSAGE_BYTES,
    MIN_THROUGHPUT_BYTES_PER_S,
    NodeTimings,
    derive_timings,
    from_env,
    timings_of,
)
from sender_node.errors import ConfigError
from sender_node.relay_breaker import data_timeout_s

BASE = {"MAILER_ETCD_ENDPOINTS": "127.0.0.1:2379", "MAILER_RELAYS": "127.0.0.1:25"}


def test_defaults_derive_every_bound_from_the_settings() -> None:
    # Given the default settings (SMTP steps 30 s, the final reply 60 s, lease TTL 5 s
    # with a 1 s margin)
    timings = timings_of(from_env(BASE, hostname="h", pid=1))

    # Then the final reply is the final-reply timeout plus the largest message
    # (dot-stuffed) at the slowest healthy throughput: the SMTP client's own deadline
    largest_payload = MAX_MESSAGE_BYTES + MAX_MESSAGE_BYTES // 3 + 3
    assert timings.final_reply_s == data_timeout_s(
        60.0, largest_payload, MIN_THROUGHPUT_BYTES_PER_S
    )
    # And a transaction is its start budget (pacing wait, 4 steps) then its final reply
    assert timings.start_budget_s == 30.0 + 4 * 30.0
    assert timings.transaction_s == timings.start_budget_s + timings.final_reply_s
    # And authority never outlasts the lease's trusted span
    assert timings.max_authority_s == 5 - 1.0
    assert timings.release_s == timings.final_reply_s + timings.stop_slack_s


def test_shorter_smtp_timeouts_shorten_the_bounds() -> None:
    fast = derive_timings(smtp_timeout_s=5.0, lease_ttl_s=5, trust_margin_s=1.0)
    slow = derive_timings(smtp_timeout_s=60.0, lease_ttl_s=5, trust_margin_s=1.0)
    assert fast.final_reply_s < slow.final_reply_s
    assert fast.transaction_s < slow.transaction_s


@pytest.mark.parametrize(
    ("smtp_timeout_s", "lease_ttl_s", "trust_margin_s"),
    [
        (0.0, 5, 1.0),  # no SMTP deadline: no final-reply bound
        (30.0, 5, 5.0),  # the margin eats the whole lease: no span to grant authority in
        (30.0, 5, -1.0),
    ],
)
def test_inconsistent_settings_are_refused(
    smtp_timeout_s: float, lease_ttl_s: int, trust_margin_s: float
) -> None:
    with pytest.raises(ConfigError):
        derive_timings(
            smtp_timeout_s=smtp_timeout_s, lease_ttl_s=lease_ttl_s, trust_margin_s=trust_margin_s
        )


def test_timings_refuse_nonsense() -> None:
    with pytest.raises(ConfigError):
        NodeTimings(final_reply_s=0.0, start_budget_s=1.0, max_authority_s=1.0)
    with pytest.raises(ConfigError):
        NodeTimings(final_reply_s=1.0, start_budget_s=1.0, max_authority_s=0.0)
    with pytest.raises(ConfigError):
        NodeTimings(final_reply_s=1.0, start_budget_s=1.0, max_authority_s=1.0, stop_slack_s=-1)


def test_state_dir_defaults_to_the_node_own_directory() -> None:
    config = from_env(BASE | {"MAILER_NODE_ID": "n7"})
    assert config.state_dir == "/var/lib/mailers/node-n7"
    assert config.max_unacked_results == 50_000


def test_state_dir_and_unacked_bound_are_read() -> None:
    config = from_env(
        BASE | {"MAILER_STATE_DIR": "/srv/mailers/n1", "MAILER_MAX_UNACKED_RESULTS": "1000"}
    )
    assert config.state_dir == "/srv/mailers/n1"
    assert config.max_unacked_results == 1000


@pytest.mark.parametrize(
    "env",
    [
        {"MAILER_STATE_DIR": "relative/dir"},
        {"MAILER_MAX_UNACKED_RESULTS": "0"},
        {"MAILER_MAX_UNACKED_RESULTS": "many"},
    ],
)
def test_bad_journal_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        from_env(BASE | env)
