"""``MAILER_SMTP_FINAL_REPLY_TIMEOUT_S``: a deadline of its own for the final dot's reply."""

from __future__ import annotations

import pytest

from sender_node.config import RelayConfig, SmtpConfig, from_env
from sender_node.errors import ConfigError

BASE = {"MAILER_ETCD_ENDPOINTS": "127.0.0.1:2379", "MAILER_RELAYS": "127.0.0.1:25"}


def test_final_reply_waits_longer_than_a_command_by_default() -> None:
    # Given no SMTP timeouts set
    smtp = from_env(BASE, hostname="h", pid=1).smtp
    # Then a command gets 30 s, the reply to the final dot 60 s
    assert (smtp.timeout_s, smtp.final_reply_timeout_s) == (30.0, 60.0)


def test_final_reply_timeout_is_read_from_the_environment() -> None:
    environ = {**BASE, "MAILER_SMTP_TIMEOUT_S": "10", "MAILER_SMTP_FINAL_REPLY_TIMEOUT_S": "120"}
    smtp = from_env(environ, hostname="h", pid=1).smtp
    assert (smtp.timeout_s, smtp.final_reply_timeout_s) == (10.0, 120.0)


@pytest.mark.parametrize(
    "environ",
    [
        {"MAILER_SMTP_FINAL_REPLY_TIMEOUT_S": "5"},
        {"MAILER_SMTP_TIMEOUT_S": "90"},
        {"MAILER_SMTP_FINAL_REPLY_TIMEOUT_S": "soon"},
    ],
)
def test_final_reply_timeout_below_the_command_timeout_is_refused(
    environ: dict[str, str],
) -> None:
    # Given a final-reply deadline shorter than a command's (or not a number)
    # Then the node refuses to start, naming the variable
    with pytest.raises(ConfigError, match="MAILER_SMTP_"):
        from_env({**BASE, **environ}, hostname="h", pid=1)


def test_equal_deadlines_are_allowed() -> None:
    relays = (RelayConfig("127.0.0.1:25"),)
    assert (
        SmtpConfig(relays, timeout_s=60.0, final_reply_timeout_s=60.0).final_reply_timeout_s == 60
    )
