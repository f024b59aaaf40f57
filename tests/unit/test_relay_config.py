"""``MAILER_RELAYS`` with per-relay options, ``MAILER_RELAY_STRATEGY``, and ``Secret``."""

from __future__ import annotations

from pathlib import Path

import pytest

from sender_node.config import (
    RelayConfig,
    RelayTls,
    Secret,
    SmtpConfig,
    from_env,
    parse_relay,
    parse_relays,
)
from sender_node.errors import ConfigError
from sender_node.relay_choice import Strategy

PASSWORD = "s3cr3t-Pa55"
BASE = {"MAILER_ETCD_ENDPOINTS": "127.0.0.1:2379"}


def test_plain_host_port_lists_keep_working() -> None:
    # Given the historical syntax
    relays = parse_relays(" a.example:25 , [::1]:2525,")

    # Then each relay gets the defaults: auto TLS, verified, no AUTH, weight 1, no limits
    assert relays == (RelayConfig("a.example:25"), RelayConfig("[::1]:2525"))
    first = relays[0]
    assert (first.tls, first.verify, first.ca_file, first.user, first.password) == (
        RelayTls.AUTO,
        True,
        None,
        None,
        None,
    )
    assert (first.weight, first.connections, first.rate_per_s) == (1, None, None)
    assert (relays[1].host, relays[1].port) == ("::1", 2525)


def test_every_option(tmp_path: Path) -> None:
    # Given a CA file and a password in the environment
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    spec = (
        f"smtp.example.com:465;tls=implicit;user=bulk;password_env=RELAY_PW;weight=2;"
        f"connections=8;rate=100;ca={ca}, 127.0.0.1:2525;tls=none,"
        f" relay.internal:587 ; TLS=StartTLS ; verify=false"
    )

    # When it is parsed
    a, b, c = parse_relays(spec, {"RELAY_PW": PASSWORD})

    # Then every option lands in its field
    assert a == RelayConfig(
        "smtp.example.com:465",
        tls=RelayTls.IMPLICIT,
        ca_file=str(ca),
        user="bulk",
        password=Secret(PASSWORD),
        weight=2,
        connections=8,
        rate_per_s=100.0,
    )
    assert a.password is not None and a.password.reveal() == PASSWORD
    assert b == RelayConfig("127.0.0.1:2525", tls=RelayTls.NONE)
    assert c == RelayConfig("relay.internal:587", tls=RelayTls.STARTTLS, verify=False)


def test_password_file_is_read_once_with_the_newline_stripped(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    relay = parse_relay(f"r:587;user=u;password_file={secret}", {})
    secret.write_text("changed later")
    assert relay.password == Secret(PASSWORD)


def test_the_password_never_shows() -> None:
    # Given a relay with a password
    relay = parse_relay("r:587;user=u;password_env=PW", {"PW": PASSWORD})

    # Then no rendering of the config shows it
    for text in (repr(relay), str(relay), f"{relay}", repr(relay.password), f"{relay.password}"):
        assert PASSWORD not in text
    smtp = SmtpConfig(relays=(relay,))
    assert PASSWORD not in repr(smtp)
    assert "********" in repr(relay.password)
    assert Secret("a") != Secret("b") and hash(Secret("a")) == hash(Secret("b"))
    assert Secret("a") != "a"


@pytest.mark.parametrize(
    ("entry", "environ", "expected"),
    [
        ("r:25;colour=blue", {}, r"relay r:25: unknown option 'colour'"),
        ("r:25;tls=maybe", {}, r"relay r:25: tls='maybe' is not one of auto"),
        ("r:25;verify=perhaps", {}, r"relay r:25: verify='perhaps' is not a boolean"),
        ("r:25;weight=heavy", {}, r"relay r:25: weight='heavy' is not an integer"),
        ("r:25;weight=0", {}, r"relay r:25: weight must be at least 1"),
        ("r:25;connections=0", {}, r"relay r:25: connections must be at least 1"),
        ("r:25;rate=-1", {}, r"relay r:25: rate must be a positive number"),
        ("r:25;rate=fast", {}, r"relay r:25: rate='fast' is not a number"),
        ("r:25;weight=2;weight=3", {}, r"relay r:25: weight given twice"),
        ("r:25;weight=", {}, r"relay r:25: weight needs a value"),
        ("r:25;ca=/nonexistent/ca.pem", {}, r"relay r:25: ca file '/nonexistent/ca.pem'"),
        ("r:25;tls=none;ca=/etc/hostname", {}, r"relay r:25: ca is meaningless with tls=none"),
        ("r:25;user=u", {}, r"relay r:25: user needs password_env or password_file"),
        ("r:25;password_env=PW", {"PW": "x"}, r"relay r:25: user needs"),
        ("r:25;user=u;password_env=NOPE", {}, r"relay r:25: password_env names NOPE, which"),
        ("r:25;user=u;password_env=PW", {"PW": ""}, r"relay r:25: password_env names PW"),
        (
            "r:25;user=u;password_file=/nonexistent/pw",
            {},
            r"relay r:25: password_file '/nonexistent/pw' is not readable",
        ),
        (
            "r:25;user=u;password_env=PW;password_file=/x",
            {"PW": "x"},
            r"relay r:25: password_env and password_file are exclusive",
        ),
        ("r:25;user=u;password_env=PW;tls=none", {"PW": "x"}, r"relay r:25: user \(AUTH\)"),
        ("nohost;tls=none", {}, r"relay 'nohost' is not host:port"),
    ],
)
def test_errors_name_the_relay_and_the_key(
    entry: str, environ: dict[str, str], expected: str
) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_relay(entry, environ)


@pytest.mark.parametrize(
    "entry",
    [
        # A password typed inline, as an unknown key or as a bare option
        f"r:25;password={PASSWORD}",
        f"r:25;user=u;{PASSWORD}",
        # A password whose relay is otherwise misconfigured
        "r:25;user=u;password_env=PW;tls=none",
        "r:25;user=u;password_env=PW;weight=0",
        "r:25;password_env=PW",
    ],
)
def test_errors_never_contain_the_password(entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay(entry, {"PW": PASSWORD})
    assert PASSWORD not in str(info.value)


def test_errors_never_contain_the_password_file_content(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_bytes(PASSWORD.encode() + b"\xff\n")  # not UTF-8
    with pytest.raises(ConfigError, match="not UTF-8") as info:
        parse_relay(f"r:25;user=u;password_file={secret}", {})
    assert PASSWORD not in str(info.value)
    secret.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        parse_relay(f"r:25;user=u;password_file={secret}", {})


def test_from_env_reads_relay_options_strategy_and_passwords() -> None:
    # Given relays with options, a password variable, and the balance strategy
    environ = BASE | {
        "MAILER_RELAYS": "a:465;tls=implicit;user=bulk;password_env=RELAY_PW;weight=3,b:25",
        "MAILER_RELAY_STRATEGY": "balance",
        "RELAY_PW": PASSWORD,
    }

    # When the configuration is read
    config = from_env(environ, hostname="h", pid=1)

    # Then the relays and the strategy are there, and the password is held, not shown
    assert [r.address for r in config.smtp.relays] == ["a:465", "b:25"]
    assert config.smtp.relays[0].password == Secret(PASSWORD)
    assert config.smtp.strategy is Strategy.BALANCE
    assert PASSWORD not in repr(config)


def test_strategy_defaults_to_failover_and_rejects_unknown_names() -> None:
    config = from_env(BASE | {"MAILER_RELAYS": "a:25"}, hostname="h", pid=1)
    assert config.smtp.strategy is Strategy.FAILOVER
    with pytest.raises(ConfigError, match="MAILER_RELAY_STRATEGY"):
        from_env(BASE | {"MAILER_RELAYS": "a:25", "MAILER_RELAY_STRATEGY": "x"}, hostname="h")
    with pytest.raises(ConfigError, match="no SMTP relays"):
        parse_relays(" , ")


def test_from_env_reads_domain_limits_dkim_keys_and_etcd_tls(tmp_path: Path) -> None:
    # Given throttles, DKIM keys and etcd TLS files in the environment
    for name in ("ca.crt", "node.crt", "node.key"):
        (tmp_path / name).write_text("pem")
    environ = BASE | {
        "MAILER_RELAYS": "a:25",
        "MAILER_DOMAIN_LIMITS": "default=concurrency:8;gmail.com=rate:10,concurrency:2",
        "MAILER_DKIM_KEYS": "Example.com:s1:/keys/example.pem",
        "MAILER_ETCD_CA": str(tmp_path / "ca.crt"),
        "MAILER_ETCD_CERT": str(tmp_path / "node.crt"),
        "MAILER_ETCD_KEY": str(tmp_path / "node.key"),
    }
    config = from_env(environ, hostname="h", pid=1)

    # Then each lands in its field
    default = config.domain_limits.default
    assert default.max_concurrency == 8 and default.rate_per_s is None
    gmail = config.domain_limits.overrides["gmail.com"]
    assert (gmail.rate_per_s, gmail.max_concurrency) == (10.0, 2)
    assert config.dkim_keys == {"example.com": ("s1", "/keys/example.pem")}
    assert config.etcd.tls is not None and config.etcd.tls.cert_file == tmp_path / "node.crt"
    # And the defaults limit nothing but concurrency, sign nothing, and use plaintext etcd
    plain = from_env(BASE | {"MAILER_RELAYS": "a:25"}, hostname="h", pid=1)
    limits = plain.domain_limits
    assert (limits.default.max_concurrency, limits.default.rate_per_s) == (20, None)
    assert limits.overrides == {} and plain.dkim_keys == {}
    assert plain.etcd.tls is None


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MAILER_DOMAIN_LIMITS", "gmail.com=rate:x", "MAILER_DOMAIN_LIMITS: "),
        ("MAILER_DKIM_KEYS", "example.com:s1", "is not domain:selector:path"),
        ("MAILER_ETCD_CA", "/nonexistent/ca.crt", "MAILER_ETCD_CA='/nonexistent/ca.crt': "),
    ],
)
def test_bad_throttle_dkim_or_etcd_settings_are_config_errors(
    variable: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        from_env(BASE | {"MAILER_RELAYS": "a:25", variable: value}, hostname="h", pid=1)
