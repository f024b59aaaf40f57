"""Signed recipient tokens: round trips, forgeries, purposes, the 64-octet local part."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailers_runtime.errors import ConfigError
from mailers_runtime.verp import Purpose, RecipientRef, ReturnPath, TokenKey, bounce_ref

KEY = TokenKey(b"k" * 32)
JOB = "01a248bca79b-5cda8cf7"
DOMAINS = frozenset({"bounces.example.com"})


@given(index=st.integers(min_value=0, max_value=10_000_000))
def test_a_token_names_its_recipient_and_fits_a_local_part(index: int) -> None:
    path = ReturnPath(KEY, "bounces.example.com")
    address = path.envelope_from(JOB, index)
    local = address.rpartition("@")[0]
    assert len(local) <= 64 and local == local.lower()
    assert bounce_ref(KEY, address, DOMAINS) == RecipientRef(JOB, index)
    # Case folded by a relay on the way back: still ours
    assert bounce_ref(KEY, f"<{address.upper()}>", DOMAINS) == RecipientRef(JOB, index)


def test_forged_altered_or_foreign_tokens_name_nobody() -> None:
    address = ReturnPath(KEY, "bounces.example.com").envelope_from(JOB, 41)
    local, _, domain = address.rpartition("@")
    token = local.partition("+")[2]
    job, index, tag = token.split(".")
    altered = [
        f"bounces+{job}.{'1a'}.{tag}@{domain}",  # another recipient, same tag
        f"bounces+{job[:-1]}0.{index}.{tag}@{domain}",  # another job
        f"bounces+{job}.{index}.{'a' * 16}@{domain}",  # a made-up tag
        f"bounces+{token}@other.example.com",  # not our bounce domain
        f"bounces@{domain}",  # no token
        "",
    ]
    for candidate in altered:
        assert bounce_ref(KEY, candidate, DOMAINS) is None, candidate
    # A token made with another key is not ours either
    other = ReturnPath(TokenKey(b"x" * 32), domain).envelope_from(JOB, 41)
    assert bounce_ref(KEY, other, DOMAINS) is None


def test_a_bounce_token_is_no_unsubscribe_token() -> None:
    token = KEY.token(Purpose.BOUNCE, JOB, 7)
    assert KEY.verify(Purpose.BOUNCE, token) == RecipientRef(JOB, 7)
    assert KEY.verify(Purpose.UNSUBSCRIBE, token) is None


def test_short_keys_are_refused_and_never_shown() -> None:
    with pytest.raises(ConfigError):
        TokenKey(b"short")
    assert "k" * 8 not in repr(KEY)


@given(
    index=st.one_of(
        st.integers(min_value=0, max_value=10_000_000),
        # Where base 36 gains a digit, and where a lookup of two digits ends
        st.sampled_from([0, 35, 36, 1295, 1296, 1296**2 - 1, 1296**2, 2**40]),
    ),
    # Keys longer than SHA-256's 64-byte block are hashed first (RFC 2104)
    key=st.binary(min_size=32, max_size=200),
    purpose=st.sampled_from(Purpose),
)
def test_tokens_keep_their_published_form(index: int, key: bytes, purpose: Purpose) -> None:
    # Bounces and unsubscribes for mail sent by earlier versions must still verify: the
    # tag stays the first 10 bytes of HMAC-SHA256, in lower-case RFC 4648 base32, and
    # the index is in base 36 without leading zeros.
    job, index36, tag = TokenKey(key).token(purpose, JOB, index).split(".")
    signed = f"{purpose.value}:{JOB}:{index}".encode()
    expected = base64.b32encode(hmac.new(key, signed, hashlib.sha256).digest()[:10])
    assert (job, int(index36, 36), tag) == (JOB, index, expected.decode().lower())
    assert index36 == "0" or index36[0] != "0"
    assert index36 == index36.lower()
