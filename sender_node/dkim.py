"""DKIM signing (RFC 6376) of rendered messages, per sender domain, with dkimpy.

Pure: keys are read once, by :meth:`DkimSigner.from_files` at startup (the caller reads
the configuration, see :func:`parse_key_spec`), and :meth:`DkimSigner.sign` does no I/O.
Signatures are ``rsa-sha256`` with ``relaxed/relaxed`` canonicalization over
:data:`SIGNED_HEADERS`; each of those is listed twice in ``h=`` ("oversigned"), so a
header of that name added on the way (a second From, a forged List-Unsubscribe) breaks
the signature. ``d=`` is the domain of From, which is what DMARC alignment needs.

Cost: dkimpy does the RSA operation with Python's ``pow`` (two 1024-bit modular
exponentiations for a 2048-bit key: about 7 ms per message on this kind of machine,
against ~0.03 ms for rendering), so with DKIM on, signing bounds a node at roughly
150 messages/s per core; ``python -m bench.render --dkim`` measures it. An OpenSSL-backed
RSA primitive (``cryptography``) or Ed25519 would lift that.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

import dkim  # type: ignore[import-untyped]
from dkim.crypto import UnparsableKeyError, parse_pem_private_key  # type: ignore[import-untyped]

from sender_node.errors import ConfigError, RenderError

SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "MIME-Version",
    "Content-Type",
    "Reply-To",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
)
"""Headers in every signature; absent ones are signed as absent, which forbids adding them."""

_DOMAIN = re.compile(
    r"\A(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}\Z"
)
_SELECTOR = re.compile(r"\A[A-Za-z0-9]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9_-]+)*\Z")
_MIN_KEY_BITS = 1024


@dataclasses.dataclass(frozen=True)
class DkimKey:
    """The key of one signing domain.

    Args:
        selector: The DNS selector (``<selector>._domainkey.<domain>`` holds the public key).
        private_key_pem: The RSA private key, PEM (PKCS#1 or PKCS#8).
    """

    selector: str
    private_key_pem: bytes = dataclasses.field(repr=False)


def parse_key_spec(spec: str) -> dict[str, tuple[str, str]]:
    """Parse ``domain:selector:/path/key.pem,domain2:selector2:/path2`` into
    ``{domain: (selector, path)}`` (domains lower-cased).

    Raises:
        ConfigError: an entry does not have three parts, or a domain repeats.
    """
    keys: dict[str, tuple[str, str]] = {}
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        domain, sep1, rest = entry.partition(":")
        selector, sep2, path = rest.partition(":")
        if not (sep1 and sep2 and domain and selector and path):
            raise ConfigError(f"DKIM key {entry!r} is not domain:selector:path")
        domain = domain.strip().lower()
        if domain in keys:
            raise ConfigError(f"DKIM domain {domain!r} is given twice")
        keys[domain] = (selector.strip(), path.strip())
    return keys


class DkimSigner:
    """Signs messages for the domains it has keys for.

    Args:
        keys: Key by signing domain (matched case-insensitively against From's domain).
        headers: Header names to sign; ``From`` must be among them.

    Raises:
        ConfigError: a domain or selector is malformed, a key cannot be parsed or is
            shorter than 1024 bits, or ``From`` is not signed.
    """

    def __init__(
        self, keys: Mapping[str, DkimKey], *, headers: tuple[str, ...] = SIGNED_HEADERS
    ) -> None:
        if "from" not in (h.lower() for h in headers):
            raise ConfigError("DKIM must sign the From header")
        self._keys: dict[str, DkimKey] = {}
        for domain, key in keys.items():
            if not _DOMAIN.match(domain):
                raise ConfigError(f"DKIM domain {domain!r} is not a domain name")
            if not _SELECTOR.match(key.selector):
                raise ConfigError(f"DKIM selector {key.selector!r} of {domain} is malformed")
            try:
                parsed = parse_pem_private_key(key.private_key_pem)
            except (UnparsableKeyError, ValueError, IndexError) as exc:
                raise ConfigError(f"DKIM key of {domain} cannot be parsed: {exc}") from None
            if int(parsed["modulus"]).bit_length() < _MIN_KEY_BITS:
                raise ConfigError(f"DKIM key of {domain} is shorter than {_MIN_KEY_BITS} bits")
            self._keys[domain.lower()] = key
        names = [h.lower().encode("ascii") for h in headers]
        # Each name twice: the second occurrence signs the absence of another one.
        self._include = [name for name in names for _ in range(2)]

    @classmethod
    def from_files(cls, keys: Mapping[str, tuple[str, str | os.PathLike[str]]]) -> DkimSigner:
        """Read each domain's PEM file (``{domain: (selector, path)}``).

        Raises:
            ConfigError: a file cannot be read, or see the constructor.
        """
        loaded: dict[str, DkimKey] = {}
        for domain, (selector, path) in keys.items():
            try:
                with open(path, "rb") as f:
                    pem = f.read()
            except OSError as exc:
                raise ConfigError(f"DKIM key of {domain} cannot be read: {exc}") from None
            loaded[domain] = DkimKey(selector, pem)
        return cls(loaded)

    @property
    def domains(self) -> frozenset[str]:
        """The domains there is a key for."""
        return frozenset(self._keys)

    def can_sign(self, domain: str) -> bool:
        """Whether there is a key for ``domain``."""
        return domain.lower() in self._keys

    def sign(self, message: bytes, domain: str) -> bytes:
        """``message`` with a ``DKIM-Signature`` header prepended (``d=domain``);
        unchanged when there is no key for ``domain``.

        Raises:
            RenderError: dkimpy refused the message (e.g. it has no From header).
        """
        key = self._keys.get(domain.lower())
        if key is None:
            return message
        try:
            signature = dkim.sign(
                message,
                key.selector.encode("ascii"),
                domain.lower().encode("ascii"),
                key.private_key_pem,
                canonicalize=(b"relaxed", b"relaxed"),
                signature_algorithm=b"rsa-sha256",
                include_headers=self._include,
                linesep=b"\r\n",
            )
        except (dkim.DKIMException, IndexError, TypeError, ValueError) as exc:
            raise RenderError(f"DKIM signing for {domain} failed: {exc}") from None
        return bytes(signature) + message
