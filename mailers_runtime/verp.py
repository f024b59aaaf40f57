"""Signed recipient tokens: VERP envelope senders and one-click unsubscribe links.

A token names a job and a recipient's index and carries an HMAC-SHA256 tag under a
key shared by the cluster, so only Mailers can make one: a forged or altered bounce or
unsubscribe changes nothing. Each purpose signs a different message, so a bounce
address cannot be replayed as an unsubscribe link. Pure; the key is given.

Token: ``<job_id>.<index in base 36>.<tag>``, the tag the first 10 bytes of the HMAC in
lower-case base32 (16 characters), e.g. ``01a248bca79b-5cda8cf7.2s.mfrggzdfmztwq2lk``.
As an envelope sender (RFC 5321 allows 64 octets of local part):
``bounces+01a248bca79b-5cda8cf7.2s.mfrggzdfmztwq2lk@bounces.example.com`` (54). Only
lower-case letters, digits, ``-`` and ``.``: it survives MTAs that fold case.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import re
from pathlib import Path

from mailers_runtime.errors import ConfigError

_TAG_BYTES = 10
_BLOCK_BYTES = 64  # SHA-256's block: HMAC pads (or first hashes) the key to it
_INNER_PAD = bytes(b ^ 0x36 for b in range(256))
_OUTER_PAD = bytes(b ^ 0x5C for b in range(256))
_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648's alphabet, lower case
_BASE32_PAIRS = tuple(a + b for a in _BASE32 for b in _BASE32)
"""Ten bits to their two base32 characters: a tag's 80 bits are eight lookups."""
_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
_BASE36_PAIRS = tuple(a + b for a in _BASE36 for b in _BASE36)
"""0 to 1295 as two base-36 digits (leading zero kept)."""
_BASE36_SHORT = tuple(pair[1:] if pair[0] == "0" else pair for pair in _BASE36_PAIRS)
"""0 to 1295 in base 36, without the leading zero."""
_SHORT_LIMIT = len(_BASE36_SHORT)
_TOKEN = re.compile(r"\A([0-9a-z][0-9a-z-]{0,39})\.([0-9a-z]{1,7})\.([a-z2-7]{16})\Z")
MIN_KEY_BYTES = 32


class Purpose(enum.Enum):
    BOUNCE = "b"
    UNSUBSCRIBE = "u"


@dataclasses.dataclass(frozen=True)
class RecipientRef:
    """Which recipient a verified token names."""

    job_id: str
    index: int


class TokenKey:
    """The cluster's token key (read from a file of at least 32 random bytes)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ConfigError(f"the token key needs at least {MIN_KEY_BYTES} bytes")
        # HMAC-SHA256 (RFC 2104) spelled out, so that the work shared by every tag is done
        # once: the two padded key blocks are hashed here, and each purpose's inner hash
        # has its prefix already. A tag then copies two hashes (a node signs one or two
        # per message): 12k instructions against hmac's 17k, and no Purpose.value.
        if len(key) > _BLOCK_BYTES:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_BLOCK_BYTES, b"\0")
        self._outer = hashlib.sha256(key.translate(_OUTER_PAD))
        self._inner = {
            purpose: hashlib.sha256(key.translate(_INNER_PAD) + f"{purpose.value}:".encode())
            for purpose in Purpose
        }

    @classmethod
    def from_file(cls, path: str) -> TokenKey:
        try:
            return cls(Path(path).read_bytes().strip())
        except OSError as exc:
            raise ConfigError(f"cannot read the token key {path}: {exc.strerror}") from None

    def __repr__(self) -> str:
        return "TokenKey(<hidden>)"

    def token(self, purpose: Purpose, job_id: str, index: int) -> str:
        return f"{job_id}.{_base36(index)}.{self._tag(purpose, job_id, index)}"

    def verify(self, purpose: Purpose, token: str) -> RecipientRef | None:
        """The recipient ``token`` names, or None if it is malformed or not ours."""
        match = _TOKEN.match(token.lower())
        if match is None:
            return None
        job_id, index36, tag = match.groups()
        index = int(index36, 36)
        if not hmac.compare_digest(tag, self._tag(purpose, job_id, index)):
            return None
        return RecipientRef(job_id, index)

    def _tag(self, purpose: Purpose, job_id: str, index: int) -> str:
        """The first 10 bytes of HMAC-SHA256(key, "<purpose>:<job_id>:<index>"), in
        base32."""
        inner = self._inner[purpose].copy()
        inner.update(f"{job_id}:{index}".encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return _base32_tag(outer.digest())


@dataclasses.dataclass(frozen=True)
class ReturnPath:
    """How a node writes envelope senders (``<local>+<token>@<domain>``) and, with an
    ``unsubscribe_url`` (the coordinators' endpoint, ending in ``/``), each recipient's
    one-click ``List-Unsubscribe`` (RFC 8058): that URL and a ``mailto:`` on the bounce
    domain, both carrying an unsubscribe token."""

    key: TokenKey
    domain: str
    local: str = "bounces"
    unsubscribe_url: str = ""

    def envelope_from(self, job_id: str, index: int, domain: str = "") -> str:
        """The VERP address on ``domain`` (a tenant's), else on :attr:`domain`."""
        token = self.key.token(Purpose.BOUNCE, job_id, index)
        return f"{self.local}+{token}@{domain or self.domain}"

    def list_unsubscribe(self, job_id: str, index: int, domain: str = "") -> str:
        """The header value (folded), or "" without an unsubscribe URL."""
        if not self.unsubscribe_url:
            return ""
        token = self.key.token(Purpose.UNSUBSCRIBE, job_id, index)
        mailto = f"unsubscribe+{token}@{domain or self.domain}"
        return f"<{self.unsubscribe_url}{token}>,\r\n <mailto:{mailto}>"


def bounce_ref(
    key: TokenKey, address: str, domains: frozenset[str] | None = None
) -> RecipientRef | None:
    """The recipient a bounce sent to ``address`` is about, when ``address`` is a VERP
    address (of one of ``domains``, unless None) with a valid token; None otherwise."""
    local, at, domain = address.strip("<>").rpartition("@")
    if not at or (domains is not None and domain.lower() not in domains):
        return None
    _, plus, token = local.partition("+")
    return key.verify(Purpose.BOUNCE, token) if plus else None


def _base32_tag(digest: bytes) -> str:
    """``base64.b32encode(digest[:10]).decode().lower()`` (80 bits: 16 characters, no
    padding) at half its cost: two 40-bit halves, four table lookups each."""
    pairs = _BASE32_PAIRS
    a = int.from_bytes(digest[:5], "big")
    b = int.from_bytes(digest[5:_TAG_BYTES], "big")
    return (
        pairs[a >> 30] + pairs[(a >> 20) & 1023] + pairs[(a >> 10) & 1023] + pairs[a & 1023]
        + pairs[b >> 30] + pairs[(b >> 20) & 1023] + pairs[(b >> 10) & 1023] + pairs[b & 1023]
    )  # fmt: skip


def _base36(n: int) -> str:
    """``n`` in lower-case base 36, without leading zeros: two digits per lookup."""
    if n < _SHORT_LIMIT:
        if n < 0:
            raise ValueError("index must not be negative")
        return _BASE36_SHORT[n]
    high, low = divmod(n, _SHORT_LIMIT)
    return _base36(high) + _BASE36_PAIRS[low]
