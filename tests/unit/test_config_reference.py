"""deploy/CONFIG.md is generated from the settings declarations and cannot drift from them.

- The file is what ``scripts/gen_config_reference.py`` produces now (``--check``).
- Every declared variable is in the reference; every ``MAILER_*`` name in the product
  code is declared (or listed as read elsewhere), and the reference lists no variable
  the code no longer reads.
- The declarations are true: setting each variable changes the field it is declared
  on (or the process refuses the value, naming the variable).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mailers_runtime import settings
from mailers_runtime.errors import ConfigError
from scripts import gen_config_reference as ref

# A valid value, different from the default, for every declared variable. A new
# variable fails test_each_variable_sets_its_field until it gets a sample here.
SAMPLES = {
    "MAILER_ETCD_ENDPOINTS": "10.0.0.1:2379,10.0.0.2:2379",
    "MAILER_LISTEN": "0.0.0.0:7999",
    "MAILER_ADVERTISE": "10.0.0.9:7999",
    "MAILER_COORDINATOR_ID": "coordinator-x",
    "MAILER_METRICS_LISTEN": "0.0.0.0:9100",
    "MAILER_ETCD_PREFIX": "/elsewhere",
    "MAILER_ELECTION_TTL_S": "7",
    "MAILER_BATCH_SIZE": "25",
    "MAILER_HEARTBEAT_INTERVAL_S": "0.5",
    "MAILER_AUTHORITY_S": "2",
    "MAILER_MAX_UNSAVED_RESULTS": "5000",
    "MAILER_RETENTION_DAYS": "7",
    "MAILER_RETENTION_CHECK_S": "60",
    "MAILER_DATABASE_URL": "postgresql://m@db.example:5432/m?sslmode=verify-full",
    "MAILER_DATABASE_PASSWORD_FILE": "/run/secrets/db-password",
    "MAILER_DATABASE_POOL_SIZE": "20",
    "MAILER_MAX_ATTEMPTS": "3",
    "MAILER_MAX_DISPATCHES": "4",
    "MAILER_RETRY_INITIAL_S": "3",
    "MAILER_RETRY_MAX_S": "120",
    "MAILER_BOUNCE_DOMAIN": "bounces.example.com",
    "MAILER_BOUNCE_DOMAINS": "bounces.example.com,bounces.example.org",
    "MAILER_INBOUND_LISTEN": "0.0.0.0:2525",
    "MAILER_INBOUND_MAX_BYTES": "2000000",
    "MAILER_INBOUND_MAX_CONNECTIONS": "20",
    "MAILER_HTTP_LISTEN": "0.0.0.0:8443",
    "MAILER_CONSOLE": "1",
    "MAILER_UNSUBSCRIBE_URL": "https://mail.example.com:8443/unsubscribe/",
    "MAILER_TOKEN_KEY_FILE": "/etc/mailers/token.key",
    "MAILER_WEBHOOK_RETRY_INITIAL_S": "3",
    "MAILER_WEBHOOK_RETRY_MAX_S": "600",
    "MAILER_WEBHOOK_RETRY_HORIZON_S": "7200",
    "MAILER_WEBHOOK_TIMEOUT_S": "4",
    "MAILER_WEBHOOK_BATCH": "50",
    "MAILER_WEBHOOK_ALLOW_HTTP": "true",
    "MAILER_WEBHOOK_CA_FILE": "/etc/mailers/webhook-ca.pem",
    "MAILER_MAX_JOB_AGE_S": "3600",
    "MAILER_BREAKER_FAILURES": "7",
    "MAILER_BREAKER_RESET_S": "20",
    "MAILER_NODE_ID": "node-x",
    "MAILER_LEASE_TTL_S": "2",
    "MAILER_RELAYS": "10.0.0.5:25,10.0.0.6:25",
    "MAILER_SMTP_CONNECTIONS": "3",
    "MAILER_SMTP_TIMEOUT_S": "10",
    "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S": "90",
    "MAILER_CAPACITY": "100",
    "MAILER_DRAIN_TIMEOUT_S": "30",
    "MAILER_LOG_LEVEL": "DEBUG",
    "MAILER_MAX_RECIPIENTS": "5000",
    "MAILER_MAX_BODY_BYTES": "200000",
    "MAILER_MAX_CONTENT_BYTES": "300000",
    "MAILER_MAX_SUBJECT_CHARS": "200",
    "MAILER_MAX_HEADERS": "10",
    "MAILER_MAX_VARIABLES": "20",
    "MAILER_MAX_VARIABLE_CHARS": "500",
    "MAILER_MAX_MESSAGE_BYTES": "4194304",
    "MAILER_AUTH_FILE": "/etc/mailers/auth.json",
    "MAILER_QUOTA_MAX_RECIPIENTS_PER_JOB": "10000",
    "MAILER_QUOTA_MESSAGES_PER_HOUR": "50000",
    "MAILER_QUOTA_MAX_ACTIVE_JOBS": "3",
    "MAILER_HEALTH_LISTEN": "0.0.0.0:7702",
    "MAILER_RELAY_STRATEGY": "balance",
    "MAILER_DKIM_KEYS": "example.com:s1:/etc/mailers/dkim/example.com.pem",
    "MAILER_STATE_DIR": "/srv/mailers/node-x",
    "MAILER_MAX_UNACKED_RESULTS": "1000",
    "MAILER_SMTP_MAX_MESSAGE_BYTES": "1048576",
    "MAILER_DOMAIN_LIMITS": "default=concurrency:8;gmail.com=rate:10",
    "MAILER_PLAINTEXT": "1",
    "MAILER_TLS_CA": "/etc/mailers/tls/ca.crt",
    "MAILER_TLS_CERT": "/etc/mailers/tls/tls.crt",
    "MAILER_TLS_KEY": "/etc/mailers/tls/tls.key",
    "MAILER_TLS_SERVER_NAME": "mailers-node",
    "MAILER_TLS_CLIENT_AUTH": "none",
    "MAILER_TLS_ALLOWED_CLIENTS": "a,b",
    "MAILER_ETCD_SERVER_NAME": "etcd.internal",
}
ETCD_FILES = ("MAILER_ETCD_CA", "MAILER_ETCD_CERT", "MAILER_ETCD_KEY")
"""Declared as existing files: their samples are made per test."""


@pytest.fixture
def samples(tmp_path: Path) -> dict[str, str]:
    files = {}
    for name in ETCD_FILES:
        path = tmp_path / name.lower()
        path.write_text("pem")
        files[name] = str(path)
    return SAMPLES | files


def test_reference_is_current() -> None:
    # When the reference is regenerated from the code, nothing changes
    assert ref.main(["--check"]) == 0, "run: python scripts/gen_config_reference.py"


def test_every_variable_is_declared_and_in_the_reference() -> None:
    text = ref.OUTPUT.read_text()
    declared = {
        d.variable.name for p in ref.PROCESSES for d in settings.declarations(p.config_class)
    }
    # Every declared variable is in the reference
    absent = {name for name in declared if f"`{name}`" not in text}
    assert not absent, f"declared variables not in deploy/CONFIG.md: {absent}"
    # Every MAILER_* name in the product code is in it, and declared or read elsewhere
    in_code = ref.product_variables()
    missing = {name: files for name, files in in_code.items() if f"`{name}`" not in text}
    assert not missing, f"MAILER_* variables not in deploy/CONFIG.md: {missing}"
    unknown = set(in_code) - declared - set(ref.OTHER_VARIABLES)
    assert not unknown, (
        f"not declared: declare them, or describe them in OTHER_VARIABLES: {unknown}"
    )
    stale = set(ref.OTHER_VARIABLES) - set(in_code)
    assert not stale, f"OTHER_VARIABLES lists names the code no longer uses: {stale}"


@pytest.mark.parametrize("process", ref.PROCESSES, ids=lambda p: p.title)
def test_each_variable_sets_its_field(process: ref.Process, samples: dict[str, str]) -> None:
    baseline = ref.build(process, process.required_samples)
    for declared in settings.declarations(process.config_class):
        name = declared.variable.name
        assert name in samples, f"add a sample value for {name}"
        # When only this variable is set (with those it needs, and the required ones)
        env = {**process.required_samples, **{v: samples[v] for v in declared.together}}
        try:
            changed = ref.build(process, env)
        except ConfigError as exc:
            # Then the process refuses the value, naming the variable (a node accepts
            # only client_auth=require, say)...
            assert name in str(exc), f"{name}: {exc}"
            continue
        # ...or the field it is declared on changes
        before = ref.field_value(baseline, declared.path)
        after = ref.field_value(changed, declared.path)
        assert before != after, f"{name} did not change {declared.path}"


def test_a_missing_declaration_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a product file mentioning a variable that nothing declares
    found = ref.product_variables()
    monkeypatch.setattr(ref, "product_variables", lambda: found | {"MAILER_NOWHERE": {"x.py"}})
    # Then the check fails, naming it
    with pytest.raises(AssertionError, match="MAILER_NOWHERE"):
        test_every_variable_is_declared_and_in_the_reference()


@pytest.mark.parametrize("process", ref.PROCESSES, ids=lambda p: p.title)
def test_every_field_is_in_the_reference(process: ref.Process) -> None:
    text = ref.OUTPUT.read_text()
    for row in ref.rows(process):
        assert f"`{row.path}`" in text
    assert dataclasses.is_dataclass(process.config_class)
