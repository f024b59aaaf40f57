"""The pure lease-trust rule (``mailers_runtime.lease``) and the sender's registration
record and config (no etcd involved). The rest of the lease rules: ``test_lease_rules.py``."""

from __future__ import annotations

import json

import pytest

from mailers_runtime.lease import lease_trusted, trust_deadline
from mailers_runtime.records import NodeRecord
from sender_node.config import EtcdConfig, RelayConfig, SmtpConfig, from_env
from sender_node.errors import ConfigError


@pytest.mark.parametrize(
    ("last_ok", "now", "trusted"),
    [
        (100.0, 100.0, True),
        (100.0, 103.9, True),
        (100.0, 104.0, False),  # TTL 5 minus margin 1: trust ends 4 s after the last refresh
        (100.0, 106.0, False),
        (100.0, 99.0, True),
    ],
)
def test_lease_trusted(last_ok: float, now: float, trusted: bool) -> None:
    assert lease_trusted(last_ok, now, ttl_s=5.0, margin_s=1.0) is trusted


def test_trust_deadline_matches_lease_trusted() -> None:
    deadline = trust_deadline(10.0, ttl_s=6.0, margin_s=1.5)
    assert deadline == 14.5
    assert lease_trusted(10.0, deadline - 1e-6, 6.0, 1.5)
    assert not lease_trusted(10.0, deadline, 6.0, 1.5)


def test_node_record_fields() -> None:
    record = json.loads(NodeRecord("n1", "127.0.0.1:5000", 0xABC, 400, 1700000000.5).encode())
    assert record == {
        "node_id": "n1",
        "address": "127.0.0.1:5000",
        "lease_id": 0xABC,
        "capacity": 400,
        "started_at": 1700000000.5,
    }


def test_config_from_env_defaults_and_overrides() -> None:
    base = {"MAILER_ETCD_ENDPOINTS": "127.0.0.1:2379", "MAILER_RELAYS": "127.0.0.1:25"}
    config = from_env(base, hostname="h", pid=7)
    assert config.node_id == "node-h-7"
    assert config.listen == "127.0.0.1:0"
    assert config.advertise is None
    assert config.etcd == EtcdConfig(endpoints=("127.0.0.1:2379",))
    assert config.smtp == SmtpConfig(relays=(RelayConfig("127.0.0.1:25"),), helo_name="h")
    assert (config.capacity, config.log_level) == (4000, "INFO")

    config = from_env(
        base
        | {
            "MAILER_NODE_ID": "n9",
            "MAILER_LISTEN": "0.0.0.0:7000",
            "MAILER_ADVERTISE": "n9.internal:7000",
            "MAILER_ETCD_PREFIX": "/x",
            "MAILER_RELAYS": "a:25, b:2525",
            "MAILER_LEASE_TTL_S": "3",
            "MAILER_SMTP_CONNECTIONS": "8",
            "MAILER_CAPACITY": "50",
            "MAILER_SMTP_TIMEOUT_S": "2.5",
            "MAILER_LOG_LEVEL": "debug",
        }
    )
    assert config.node_id == "n9"
    assert config.advertise == "n9.internal:7000"
    assert config.etcd.prefix == "/x" and config.etcd.lease_ttl_s == 3
    assert config.etcd.trust_margin_s == 0.75
    assert [r.address for r in config.smtp.relays] == ["a:25", "b:2525"]
    assert config.smtp.connections_per_relay == 8 and config.smtp.timeout_s == 2.5
    assert config.capacity == 50 and config.log_level == "DEBUG"


def test_config_accepts_the_smallest_ttl() -> None:
    env = {"MAILER_ETCD_ENDPOINTS": "e:1", "MAILER_RELAYS": "r:2", "MAILER_LEASE_TTL_S": "2"}
    assert from_env(env, hostname="h", pid=1).etcd.trust_margin_s == 0.5


@pytest.mark.parametrize(
    "override",
    [
        {"MAILER_RELAYS": ""},
        {"MAILER_ETCD_ENDPOINTS": ""},
        {"MAILER_ETCD_ENDPOINTS": "nohostport"},
        {"MAILER_RELAYS": "relay-without-port"},
        {"MAILER_LEASE_TTL_S": "1"},
        {"MAILER_CAPACITY": "many"},
        {"MAILER_SMTP_CONNECTIONS": "0"},
        {"MAILER_LOG_LEVEL": "chatty"},
    ],
)
def test_config_rejects_bad_values(override: dict[str, str]) -> None:
    env = {"MAILER_ETCD_ENDPOINTS": "127.0.0.1:2379", "MAILER_RELAYS": "127.0.0.1:25"} | override
    with pytest.raises(ConfigError):
        from_env(env, hostname="h", pid=1)
