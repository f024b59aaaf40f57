"""DKIM signing (RFC 6376; Ed25519 per RFC 8463) of rendered messages, per sender domain.

Pure: keys are read once, by :meth:`DkimSigner.from_files` at startup (the caller reads
the configuration, see :func:`parse_key_spec`), parsed once by the constructor, and
:meth:`DkimSigner.sign` does no I/O (it reads the injected clock for ``t=``).

Signatures are ``rsa-sha256`` for RSA keys and ``ed25519-sha256`` for Ed25519 keys, with
``relaxed/relaxed`` canonicalization (RFC 6376 §3.4.2 and §3.4.4) over
:data:`SIGNED_HEADERS`. Each of those is listed in ``h=`` once more than the message has
it ("oversigned"; once when absent), so a header of that name added on the way, above or
below the signed ones (a second From, a forged List-Unsubscribe), breaks the signature.
``d=`` is the domain of From, which is what DMARC alignment needs.

Canonicalization, hashing and the ``DKIM-Signature`` header are done here; only the
private-key operation is delegated, to OpenSSL through ``cryptography``. The unit tests
check every signature against dkimpy's verifier. What is signed is the message as
aiosmtplib transmits it (bare CR and LF turned into CRLF, a final CRLF added), and that
form is what :meth:`DkimSigner.sign` returns.

Cost, measured with ``python -m bench.render --dkim --repeat 5`` (one core, CPU time, the
~2 KB HTML+text campaign message, which renders in ~27 us; a 2-core machine under load,
so +-10%): rendering plus signing with an RSA-2048 key takes ~0.35 ms, 2,700-3,100 signed
messages/s, of which the RSA private operation in OpenSSL is ~0.25 ms and our
canonicalization and header ~30 us; with Ed25519 ~0.1 ms, 9,300-10,400 messages/s.
dkimpy, used before, did the RSA operation with Python's ``pow``: ~6.6 ms per message,
~150 messages/s, with the same command.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from mailers_runtime.message import RenderError
from sender_node.errors import ConfigError

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

_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
"""RFC 5322 ``field-name``: printable ASCII but the colon."""
_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)(?:\r\n|\Z)")
"""A header field: name, then the value with its folds. WSP before the colon is obsolete
syntax (RFC 5322 §4.5) that canonicalization removes."""
_WITH_H_MAX = 64
"""How many ``h=`` layouts a key keeps (a bound, should messages vary wildly)."""
_WSP_RUN = re.compile(rb"[ \t]+")
_EOL = re.compile(rb"\r\n|\n|\r")
"""aiosmtplib's ``LINE_ENDINGS_REGEX``: what it turns into CRLF before DATA."""
_LINE_MAX = 78
"""RFC 5322 §2.1.1's recommended limit, CRLF excluded."""
_SIGNATURE_FIELD = b"DKIM-Signature:"


@dataclasses.dataclass(frozen=True)
class DkimKey:
    """The key of one signing domain.

    Args:
        selector: The DNS selector (``<selector>._domainkey.<domain>`` holds the public key).
        private_key_pem: The private key, PEM: RSA (PKCS#1 or PKCS#8, at least 1024
            bits; signs ``rsa-sha256``) or Ed25519 (PKCS#8; signs ``ed25519-sha256``).
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


@dataclasses.dataclass(frozen=True, slots=True)
class _SigningKey:
    """A parsed private key and the part of its signature header no message changes."""

    sign: Callable[[bytes], bytes]
    """Signs the header hash input (RFC 6376 §3.7): PKCS#1 v1.5 with SHA-256, or
    Ed25519 over the SHA-256 digest (RFC 8463 §3)."""
    head: bytes
    """``DKIM-Signature:`` up to ``s=``, folded."""
    column: int
    """Length of the last line of ``head``."""
    with_h: dict[tuple[int, ...], tuple[bytes, int]] = dataclasses.field(default_factory=dict)
    """``head`` and ``h=``, folded, and the length of its last line, by how many of each
    signed header the message has (nearly always the same few). Filled as messages come;
    threads signing at once at worst compute an entry twice (dict writes are atomic)."""


def _load_key(domain: str, key: DkimKey) -> _SigningKey:
    """Parse ``key`` once and prepare what each signature by it reuses.

    Raises:
        ConfigError: the PEM cannot be parsed (or is encrypted), is neither RSA nor
            Ed25519, or is an RSA key shorter than 1024 bits.
    """
    try:
        private = serialization.load_pem_private_key(key.private_key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"DKIM key of {domain} cannot be parsed: {exc}") from None
    sign: Callable[[bytes], bytes]
    if isinstance(private, rsa.RSAPrivateKey):
        if private.key_size < _MIN_KEY_BITS:
            raise ConfigError(f"DKIM key of {domain} is shorter than {_MIN_KEY_BITS} bits")
        algorithm = b"rsa-sha256"
        rsa_key, pkcs1, sha256 = private, padding.PKCS1v15(), hashes.SHA256()

        def sign(data: bytes) -> bytes:
            return rsa_key.sign(data, pkcs1, sha256)

    elif isinstance(private, ed25519.Ed25519PrivateKey):
        algorithm = b"ed25519-sha256"
        ed_key = private

        def sign(data: bytes) -> bytes:
            return ed_key.sign(hashlib.sha256(data).digest())

    else:
        kind = type(private).__name__
        raise ConfigError(f"DKIM key of {domain} is neither RSA nor Ed25519 ({kind})")
    selector = key.selector.encode("ascii")
    tags = (
        b"v=1",
        b"a=" + algorithm,
        b"c=relaxed/relaxed",
        b"d=" + domain.encode(),
        b"s=" + selector,
    )
    head, column = _fold((_SIGNATURE_FIELD, *(b" " + tag + b";" for tag in tags)), b"", 0)
    return _SigningKey(sign, head, column)


def _fold(tokens: Iterable[bytes], text: bytes, column: int) -> tuple[bytes, int]:
    """Append ``tokens`` to ``text`` (whose last line is ``column`` long), folding before
    a token that would pass :data:`_LINE_MAX`; a token's leading space is its separator,
    which the fold replaces. Returns the text and the length of its last line."""
    parts = [text]
    for token in tokens:
        if column + len(token) > _LINE_MAX and column > 1:
            token = token.lstrip(b" ")
            parts.append(b"\r\n ")
            column = 1
        parts.append(token)
        column += len(token)
    return b"".join(parts), column


def _single_spaced(text: bytes) -> bytes:
    """``text`` with each run of SP and HTAB made one SP."""
    # Most text has neither; the substring tests are much cheaper than the regex scan.
    if b"\t" in text or b"  " in text:
        return _WSP_RUN.sub(b" ", text)
    return text


def _relaxed_value(value: bytes) -> bytes:
    """RFC 6376 §3.4.2 for a field value: unfold, one SP per WSP run, no WSP at the ends."""
    return _single_spaced(value.replace(b"\r\n", b"")).strip(b" ")


def _relaxed_body(body: bytes) -> bytes:
    """RFC 6376 §3.4.4: one SP per WSP run, none at line ends, no empty lines at the end,
    a final CRLF unless empty. ``body`` has only CRLF line endings."""
    # After the runs are single spaces, " \r\n" is exactly "WSP at the end of a line";
    # and as every CR and LF is in a CRLF, stripping both strips whole empty lines.
    body = _single_spaced(body).replace(b" \r\n", b"\r\n").rstrip(b"\r\n")
    return body + b"\r\n" if body else body


def _signed_fields(head: bytes, names: frozenset[bytes]) -> dict[bytes, list[bytes]]:
    """The raw values, with their folds, of the fields named in ``names`` (lower case)
    that the header block ``head`` has, in order, by lower-cased name.

    Raises:
        RenderError: a line is neither a field nor the continuation of one.
    """
    found: dict[bytes, list[bytes]] = {}
    at = 0
    for field in _FIELD.finditer(head):
        if field.start() != at:
            break
        at = field.end()
        name = field[1].lower()
        if name in names:
            found.setdefault(name, []).append(field[2])
    if at != len(head):
        raise RenderError(f"header line {head[at : at + 40]!r} is not a field")
    return found


class DkimSigner:
    """Signs messages for the domains it has keys for.

    Args:
        keys: Key by signing domain (matched case-insensitively against From's domain).
        headers: Header names to sign; ``From`` must be among them.
        clock: Seconds since the epoch, read once per signature for ``t=``.

    Raises:
        ConfigError: a domain, selector or header name is malformed, a key cannot be
            parsed, is neither RSA nor Ed25519, or is an RSA key shorter than 1024 bits,
            or ``From`` is not signed.
    """

    def __init__(
        self,
        keys: Mapping[str, DkimKey],
        *,
        headers: tuple[str, ...] = SIGNED_HEADERS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if "from" not in (h.lower() for h in headers):
            raise ConfigError("DKIM must sign the From header")
        for header in headers:
            if not (header.isascii() and _FIELD_NAME.fullmatch(header.encode("ascii"))):
                raise ConfigError(f"DKIM header name {header!r} is malformed")
        self._names = tuple(dict.fromkeys(h.lower().encode("ascii") for h in headers))
        self._wanted = frozenset(self._names)
        self._clock = clock
        self._keys: dict[str, _SigningKey] = {}
        for domain, key in keys.items():
            if not _DOMAIN.match(domain):
                raise ConfigError(f"DKIM domain {domain!r} is not a domain name")
            if not _SELECTOR.match(key.selector):
                raise ConfigError(f"DKIM selector {key.selector!r} of {domain} is malformed")
            self._keys[domain.lower()] = _load_key(domain.lower(), key)

    def _fold_h(self, key: _SigningKey, counts: tuple[int, ...]) -> tuple[bytes, int]:
        """``key.head`` followed by ``h=`` for a message with ``counts`` of each signed
        header, folded (kept in ``key.with_h``)."""
        listed = [
            n + b":" for n, count in zip(self._names, counts, strict=True) for _ in range(count + 1)
        ]
        listed[0] = b" h=" + listed[0]
        listed[-1] = listed[-1][:-1] + b";"
        with_h = _fold(listed, key.head, key.column)
        if len(key.with_h) < _WITH_H_MAX:
            key.with_h[counts] = with_h
        return with_h

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

        A signed message has CRLF line endings and ends with CRLF: bare CR and LF are
        turned into CRLF first, as aiosmtplib would on sending (render output has none).

        Raises:
            RenderError: the header has a line that is not a field, or no From.
        """
        key = self._keys.get(domain.lower())
        if key is None:
            return message
        crlf = message.count(b"\r\n")
        if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
            message = _EOL.sub(b"\r\n", message)
        if not message.endswith(b"\r\n"):
            message += b"\r\n"
        if message.startswith(b"\r\n"):
            head, body = b"", message[2:]
        else:
            end = message.find(b"\r\n\r\n")
            head, body = (message[:-2], b"") if end < 0 else (message[:end], message[end + 4 :])
        try:
            found = _signed_fields(head, self._wanted)
        except RenderError as exc:
            raise RenderError(f"DKIM signing for {domain} failed: {exc}") from None
        if b"from" not in found:
            raise RenderError(f"DKIM signing for {domain} failed: the message has no From")

        # RFC 6376 §5.4.2: instances are signed bottom-up, and the extra name in h=
        # stands for an instance that must not exist.
        signed: list[bytes] = []
        for name in self._names:
            for value in reversed(found.get(name, ())):
                signed.append(name + b":" + _relaxed_value(value) + b"\r\n")
        counts = tuple(len(found.get(name, ())) for name in self._names)
        with_h = key.with_h.get(counts)
        if with_h is None:
            with_h = self._fold_h(key, counts)
        body_hash = base64.b64encode(hashlib.sha256(_relaxed_body(body)).digest())
        tokens = (b" t=%d;" % int(self._clock()), b" bh=" + body_hash + b";")
        text, _ = _fold(tokens, *with_h)
        # b= starts its own line; the value is what the signature leaves empty.
        text += b"\r\n b="
        unsigned = b"dkim-signature:" + _relaxed_value(text[len(_SIGNATURE_FIELD) :])
        signature = base64.b64encode(key.sign(b"".join(signed) + unsigned))
        first = _LINE_MAX - 3
        lines = [signature[:first]]
        lines.extend(
            signature[i : i + _LINE_MAX - 1] for i in range(first, len(signature), _LINE_MAX - 1)
        )
        return text + b"\r\n ".join(lines) + b"\r\n" + message
