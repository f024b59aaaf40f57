"""DKIM signing: signatures made by DkimSigner verify with dkimpy against the public key
(no DNS: the key is handed to dkimpy through ``dnsfunc``), for RSA and Ed25519 keys.

dkimpy verifies ``ed25519-sha256`` only through PyNaCl, which is not installed; the
``dkimpy_ed25519`` fixture hands it the one Ed25519 call it makes, done by
``cryptography``, so the rest of its verifier (tag parsing, header selection,
canonicalization, hashing) runs unchanged on our Ed25519 signatures too.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import string
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from mailers_runtime.message import Attachment, CompiledMessage, Content, Mailbox, RenderError
from sender_node.dkim import DkimKey, DkimSigner, parse_key_spec
from sender_node.errors import ConfigError

DATE = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
NOW_S = 1_741_064_767.5
SELECTOR = "mail2025"
KINDS = ("rsa-pkcs1", "rsa-pkcs8", "ed25519")


@dataclasses.dataclass(frozen=True)
class Key:
    """A private key as the signer reads it and its public half as DNS publishes it."""

    kind: str
    pem: bytes
    record: bytes
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def make_key(kind: str) -> Key:
    """A fresh key: RSA-2048 in PKCS#1 PEM, RSA-1024 (the minimum) in PKCS#8, or Ed25519."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
        raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        record = b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)
        pem_format = serialization.PrivateFormat.PKCS8
    else:
        private = rsa.generate_private_key(65537, 2048 if kind == "rsa-pkcs1" else 1024)
        der = private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
        pem_format = (
            serialization.PrivateFormat.TraditionalOpenSSL
            if kind == "rsa-pkcs1"
            else serialization.PrivateFormat.PKCS8
        )
    pem = private.private_bytes(
        serialization.Encoding.PEM, pem_format, serialization.NoEncryption()
    )
    return Key(kind, pem, record, private)


@pytest.fixture(scope="module")
def keys() -> dict[str, Key]:
    return {kind: make_key(kind) for kind in KINDS}


@pytest.fixture(params=KINDS)
def key(request: pytest.FixtureRequest, keys: dict[str, Key]) -> Key:
    return keys[request.param]


class _BadSignatureError(Exception):
    """Stands for ``nacl.exceptions.BadSignatureError``."""


class _VerifyKey:
    """What dkimpy uses of ``nacl.signing.VerifyKey``, done by cryptography."""

    def __init__(self, key: bytes, encoder: object) -> None:
        self._key = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(key))

    def verify(self, smessage: bytes, signature: bytes) -> bytes:
        try:
            self._key.verify(signature, smessage)
        except InvalidSignature:
            raise _BadSignatureError from None
        return smessage


@pytest.fixture(scope="module", autouse=True)
def dkimpy_ed25519() -> Iterator[None]:
    if hasattr(dkim, "nacl"):  # PyNaCl is installed: dkimpy needs no help
        yield
        return
    nacl = SimpleNamespace(
        signing=SimpleNamespace(VerifyKey=_VerifyKey),
        encoding=SimpleNamespace(Base64Encoder=None),
        exceptions=SimpleNamespace(ValueError=ValueError, BadSignatureError=_BadSignatureError),
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dkim, "nacl", nacl, raising=False)
        yield


def dns_for(key: Key, name: bytes = b"mail2025._domainkey.example.com.") -> Callable[..., bytes]:
    def lookup(qname: bytes, timeout: int = 5) -> bytes:
        return key.record if qname == name else b""

    return lookup


def verifies(raw: bytes, key: Key) -> bool:
    return bool(dkim.verify(raw, dnsfunc=dns_for(key)))


def signer_for(key: Key, **options: object) -> DkimSigner:
    return DkimSigner({"example.com": DkimKey(SELECTOR, key.pem)}, **options)  # type: ignore[arg-type]


def rendered(signer: DkimSigner, **overrides: object) -> bytes:
    fields: dict[str, object] = {
        "sender": Mailbox("news@Example.COM", "Café News"),
        "subject": "Grüße {{ name }}",
        "text_body": "Hallo {{ name }}\n",
        "html_body": "<p>Hallo {{ name }}</p>",
        "headers": (("X-Campaign", "c1"),),
        "unsubscribe_url": "https://example.com/u?e={{ email }}",
    }
    fields.update(overrides)
    compiled = CompiledMessage("job", Content(**fields), signer=signer)  # type: ignore[arg-type]
    return compiled.render(index=3, email="zoe@example.org", name="Zoë", variables={}, date=DATE)


def signature_lines(raw: bytes) -> list[bytes]:
    """The lines of the DKIM-Signature header at the top of ``raw``."""
    lines = raw.split(b"\r\n")
    assert lines[0].startswith(b"DKIM-Signature: ")
    end = next(i for i in range(1, len(lines)) if not lines[i].startswith((b" ", b"\t")))
    return lines[:end]


def tags(raw: bytes) -> dict[bytes, bytes]:
    """The tags of the signature at the top of ``raw``, whitespace removed from values."""
    value = b"".join(signature_lines(raw)).split(b":", 1)[1]
    pairs = (tag.partition(b"=") for tag in value.split(b";") if tag.strip())
    return {name.strip(): re.sub(rb"\s+", b"", v) for name, _, v in pairs}


def with_header(raw: bytes, header: bytes, *, top: bool) -> bytes:
    """``raw`` with ``header`` added first (after the signature) or last in its header."""
    if top:
        signature = b"\r\n".join(signature_lines(raw)) + b"\r\n"
        return signature + header + b"\r\n" + raw[len(signature) :]
    head, body = raw.split(b"\r\n\r\n", 1)
    return head + b"\r\n" + header + b"\r\n\r\n" + body


def test_signed_message_verifies_with_the_public_key(key: Key) -> None:
    # Given a signer for example.com
    # When a personalised message from example.com is rendered
    raw = rendered(signer_for(key))

    # Then it starts with a relaxed/relaxed signature for d=example.com, with the
    # algorithm of the key, that dkimpy verifies, covering (and oversigning) the headers
    # that matter, and signing the absent Reply-To as absent
    signature = tags(raw)
    algorithm = b"ed25519-sha256" if key.kind == "ed25519" else b"rsa-sha256"
    assert signature[b"a"] == algorithm and signature[b"c"] == b"relaxed/relaxed"
    assert signature[b"d"] == b"example.com" and signature[b"s"] == SELECTOR.encode()
    assert signature[b"v"] == b"1" and signature[b"t"].isdigit()
    signed = signature[b"h"].split(b":")
    for name in (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                 b"content-type", b"list-unsubscribe", b"list-unsubscribe-post"):  # fmt: skip
        assert signed.count(name) == 2
    assert signed.count(b"reply-to") == 1
    assert verifies(raw, key)


def test_signature_header_is_folded_within_78_columns(key: Key) -> None:
    # Given a signature over many headers (duplicates make h= long)
    signer = signer_for(key, clock=lambda: NOW_S)
    message = b"From: a@example.com\r\n" + b"To: b@example.org\r\n" * 12 + b"\r\nHi\r\n"

    # When it is signed
    raw = signer.sign(message, "example.com")

    # Then each line is at most 78 characters, continuation lines start with a space,
    # t= is the clock's second, and each To is listed once, plus once more
    lines = signature_lines(raw)
    assert len(lines) > 3 and all(len(line) <= 78 for line in lines)
    assert all(line.startswith(b" ") for line in lines[1:])
    assert raw.endswith(message)
    assert tags(raw)[b"t"] == b"1741064767"
    assert tags(raw)[b"h"].split(b":").count(b"to") == 13
    assert verifies(raw, key)


def test_tampering_or_adding_a_header_breaks_the_signature(key: Key) -> None:
    # Given a signed, rendered message
    raw = rendered(signer_for(key))
    assert verifies(raw, key)

    # Then a changed body or signed header fails
    assert not verifies(raw.replace(b"Hallo", b"Hello"), key)
    assert not verifies(raw.replace(b"\r\nTo: ", b"\r\nTo: x", 1), key)
    assert not verifies(raw.replace(b"\r\nDate: Tue", b"\r\nDate: Wed", 1), key)
    # And so does a second From, List-Unsubscribe or Reply-To added in transit, above or
    # below the signed ones (oversigned)
    for extra in (b"From: evil@attacker.test", b"List-Unsubscribe: <https://evil.test/>",
                  b"Reply-To: evil@attacker.test"):  # fmt: skip
        for top in (True, False):
            assert not verifies(with_header(raw, extra, top=top), key)
    # But a header not signed may be added (e.g. by a relay), and signed headers may be
    # refolded or respaced, without breaking it (relaxed canonicalization)
    assert verifies(b"Received: from relay\r\n" + raw, key)
    assert verifies(with_header(raw, b"X-Relay: yes", top=False), key)
    assert verifies(raw.replace(b"\r\nMIME-Version: 1.0", b"\r\nMIME-Version:\r\n\t 1.0  "), key)


def test_text_only_message_with_attachment_verifies(key: Key) -> None:
    signer = signer_for(key)
    raw = rendered(
        signer,
        html_body="",
        unsubscribe_url="",
        attachments=(Attachment("b.pdf", "application/pdf", b"%PDF-1.4 x"),),
    )
    assert b"multipart/mixed" in raw
    assert verifies(raw, key)


def test_long_non_ascii_subject_verifies(key: Key) -> None:
    # Given a subject that renders as several folded encoded-words
    raw = rendered(signer_for(key), subject="Grüße und schöne Tage, {{ name }}! " * 6)
    subject = raw.split(b"\r\nSubject: ", 1)[1].split(b"\r\n", 3)
    assert subject[0].startswith(b"=?utf-8?") and subject[1].startswith(b" ")
    assert verifies(raw, key)


HEAD = b"From: News <news@example.com>\r\nTo: ann@example.org\r\nSubject: Hi\r\n"
EDGE_CASES = {
    "plain": HEAD + b"\r\nHello Ann,\r\nbye.\r\n",
    "trailing blank lines": HEAD + b"\r\nHello\r\n\r\n\r\n\r\n",
    "whitespace-only lines": HEAD + b"\r\n \t \r\nHello\r\n\t\r\n  \r\nBye\r\n \r\n\t\r\n",
    "trailing spaces and tabs": HEAD + b"\r\na  \t\r\nb\t\r\n c \t d \r\n\t e\t\r\n",
    "empty body": HEAD + b"\r\n",
    "no body": HEAD,
    "no final CRLF": HEAD + b"\r\nthe end  ",
    "bare LF and CR": HEAD.replace(b"\r\n", b"\n") + b"\nline\r\rnext\n\n",
    "8-bit body": HEAD + b"\r\nGr\xc3\xbc\xc3\x9fe \xff\x00\r\n",
    "folded headers": (
        b"From:\r\n News <news@example.com>\r\n"
        b"To: a@example.org,\r\n\tb@example.org,  \r\n     c@example.org\r\n"
        b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n =?utf-8?q?_und_mehr?=\r\n"
        b"X-Long: " + b"word " * 40 + b"\r\n\r\nbody\r\n"
    ),
    "duplicate headers": (
        b"Received: one\r\nReceived: two\r\nFrom: news@example.com\r\n"
        b"To: a@example.org\r\nTo: b@example.org\r\nSUBJECT: upper-case name\r\n"
        b"subject: second\r\n\r\nbody\r\n"
    ),
}


@pytest.mark.parametrize("message", list(EDGE_CASES.values()), ids=list(EDGE_CASES))
def test_edge_cases_verify(key: Key, message: bytes) -> None:
    # When a hand-made message is signed
    raw = signer_for(key).sign(message, "example.com")

    # Then dkimpy verifies it; the message is the one given, in CRLF and ending with one
    assert verifies(raw, key)
    crlf = re.sub(rb"\r\n|\n|\r", b"\r\n", message)
    assert raw.endswith(crlf if crlf.endswith(b"\r\n") else crlf + b"\r\n")
    # And a changed body fails (nothing to change when there is none)
    if raw.endswith(b"\r\n\r\n"):
        assert not verifies(raw + b"x\r\n", key)
    else:
        assert not verifies(raw[:-2] + b"!\r\n", key)


def relaxed_signature_header(raw: bytes) -> bytes:
    """RFC 6376 §3.7: the signature header, b= emptied, relaxed, without its CRLF."""
    header = b"\r\n".join(signature_lines(raw))
    header = re.sub(rb"(?<=[;\s])b=[\s0-9A-Za-z+/=]*\Z", b"b=", header)
    value = re.sub(rb"[ \t]+", b" ", header.split(b":", 1)[1].replace(b"\r\n", b""))
    return b"dkim-signature:" + value.strip(b" ")


def test_rfc_6376_relaxed_example_known_answer(key: Key) -> None:
    # Given the example of RFC 6376 §3.4.5 (a name with WSP before its colon, a folded
    # value with tabs, trailing WSP and blank lines), which dkimpy cannot parse
    message = b"A: X\r\nB : Y\t\r\n\tZ  \r\nFrom: a@example.com\r\n\r\n C \r\nD \t E\r\n\r\n\r\n"
    signer = signer_for(key, headers=("From", "A", "B"))

    # When it is signed
    raw = signer.sign(message, "example.com")

    # Then bh= is the hash of the RFC's canonical body, and b= signs the RFC's canonical
    # headers followed by the signature header (checked with the public key directly)
    canonical_body = b" C\r\nD E\r\n"
    assert tags(raw)[b"bh"] == base64.b64encode(hashlib.sha256(canonical_body).digest())
    assert tags(raw)[b"h"] == b"from:from:a:a:b:b"
    data = b"from:a@example.com\r\na:X\r\nb:Y Z\r\n" + relaxed_signature_header(raw)
    signature = base64.b64decode(tags(raw)[b"b"])
    public = key.private.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        public.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        public.verify(signature, hashlib.sha256(data).digest())


def test_empty_body_hash_is_rfc_6376s() -> None:
    # RFC 6376 §3.4.4: the relaxed empty body is empty (bh of ""), not a lone CRLF
    raw = DkimSigner({"example.com": DkimKey(SELECTOR, make_key("ed25519").pem)}).sign(
        HEAD + b"\r\n\r\n \r\n", "example.com"
    )
    assert tags(raw)[b"bh"] == b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="


# -- properties -------------------------------------------------------------------------

HEADER_TEXT = st.text(
    alphabet=string.ascii_letters + string.digits + string.punctuation + " \t", min_size=1
)
FOLD = st.sampled_from([" ", "\t", "  ", " \t ", "\r\n ", "\r\n\t", "\r\n  \t"])


@st.composite
def header_values(draw: st.DrawFn) -> bytes:
    """A header value: words separated by WSP runs and folds."""
    words = draw(st.lists(HEADER_TEXT, min_size=1, max_size=6))
    value = words[0]
    for word in words[1:]:
        value += draw(FOLD) + word
    return value.encode()


BODY_LINE = st.one_of(
    st.binary(max_size=40),
    st.text(alphabet=" \tab", max_size=12).map(str.encode),
    st.just(b""),
)


@given(
    kind=st.sampled_from(KINDS),
    subject=header_values(),
    extra=st.lists(header_values(), max_size=3),
    lines=st.lists(BODY_LINE, max_size=12),
)
@settings(max_examples=80, deadline=None)
def test_random_messages_sign_and_verify(
    keys: dict[str, Key], kind: str, subject: bytes, extra: list[bytes], lines: list[bytes]
) -> None:
    # Given a message with random header values (some repeated, folded, tabbed) and a
    # random body (any bytes, bare CR and LF included)
    key = keys[kind]
    head = b"From: a@example.com\r\nSubject: " + subject + b"\r\n"
    head += b"".join(
        b"Reply-To: x@example.com (" + v + b")\r\nX-Extra: " + v + b"\r\n" for v in extra
    )
    message = head + b"\r\n" + b"\r\n".join(lines)

    # When it is signed, then dkimpy verifies it
    assert verifies(signer_for(key).sign(message, "example.com"), key)


WSP_RUN = st.sampled_from([b" ", b"\t", b"  ", b" \t ", b"\t\t"])


@given(
    kind=st.sampled_from(KINDS),
    words=st.lists(st.lists(st.sampled_from([b"a", b"b", b"\xc3\xa9", b"."]), max_size=5)),
    data=st.data(),
)
@settings(max_examples=50, deadline=None)
def test_what_relaxed_ignores_leaves_the_signature_unchanged(
    keys: dict[str, Key], kind: str, words: list[list[bytes]], data: st.DataObject
) -> None:
    # Given a body, and a copy with every WSP run replaced by another, trailing WSP on
    # lines, more blank lines at the end, and a refolded, upper-cased header
    def body(noisy: bool) -> bytes:
        lines = []
        for line in words:
            runs = [data.draw(WSP_RUN) if noisy else b" " for _ in line]
            text = b"".join(word + run for word, run in zip(line, runs, strict=True))
            lines.append(text + (data.draw(WSP_RUN) if noisy else b""))
        return b"\r\n".join(lines) + b"\r\n" * (data.draw(st.integers(1, 3)) if noisy else 1)

    plain = b"From: a@example.com\r\nSubject: a b\r\n\r\n" + body(noisy=False)
    noisy = b"FROM:  a@example.com \r\nsubject:\r\n\ta \t b\t\r\n\r\n" + body(noisy=True)

    # When both are signed at the same second (RSA PKCS#1 v1.5 and Ed25519 are deterministic)
    signer = signer_for(keys[kind], clock=lambda: NOW_S)
    signatures = [signature_lines(signer.sign(m, "example.com")) for m in (plain, noisy)]

    # Then the signatures are the same
    assert signatures[0] == signatures[1]


# -- API and configuration --------------------------------------------------------------


def test_other_domains_are_not_signed(tmp_path: Path, keys: dict[str, Key]) -> None:
    path = tmp_path / "k.pem"
    path.write_bytes(keys["rsa-pkcs1"].pem)
    signer = DkimSigner.from_files({"Example.com": ("mail2025", str(path))})
    assert signer.can_sign("EXAMPLE.com") and signer.domains == {"example.com"}
    assert not signer.can_sign("other.test")
    raw = rendered(signer, sender=Mailbox("news@other.test"))
    assert not raw.startswith(b"DKIM-Signature")
    assert signer.sign(b"x\n", "other.test") == b"x\n"
    assert verifies(signer.sign(HEAD, "Example.COM"), keys["rsa-pkcs1"])


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (b"not a header\r\n\r\nbody\r\n", "not a field"),
        (b" continued\r\nFrom: a@example.com\r\n\r\nbody\r\n", "not a field"),
        (b"From: a@example.com\r\nbad name: x\r\n\r\n", "not a field"),
        (b"To: a@example.com\r\n\r\nbody\r\n", "no From"),
        (b"\r\nFrom: a@example.com\r\n", "no From"),
        (b"", "no From"),
    ],
)
def test_a_message_that_cannot_be_signed_is_a_render_error(
    keys: dict[str, Key], message: bytes, reason: str
) -> None:
    signer = signer_for(keys["ed25519"])
    with pytest.raises(RenderError, match=f"DKIM signing for example.com failed: .*{reason}"):
        signer.sign(message, "example.com")


def short_rsa_key() -> bytes:
    """A 768-bit RSA key (cryptography refuses to generate one; these are two primes)."""
    p = int(
        "FF294D0571568E36500DE4794ED8F297941C5782E32E8F5CBF48BD8E74B1C11F"
        "E152CA33F92B9217F2C5B8A39F1C71F5",
        16,
    )
    q = int(
        "EED26AFC32B40B47628F4FAD41E6739BF45873AE400FDBA8A04785A857BC5B0E"
        "7E78FFFB2AD56E237539AD2CC324F283",
        16,
    )
    d = pow(65537, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(65537, p * q),
    )  # fmt: skip
    return numbers.private_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def test_configuration_errors(tmp_path: Path, keys: dict[str, Key]) -> None:
    pem = keys["rsa-pkcs1"].pem
    with pytest.raises(ConfigError, match="cannot be read"):
        DkimSigner.from_files({"example.com": ("s", tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="cannot be parsed"):
        DkimSigner({"example.com": DkimKey("s", b"-----BEGIN RSA PRIVATE KEY-----\nxx\n")})
    encrypted = keys["rsa-pkcs8"].private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    with pytest.raises(ConfigError, match="cannot be parsed.*encrypted"):
        DkimSigner({"example.com": DkimKey("s", encrypted)})
    p256 = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(ConfigError, match="neither RSA nor Ed25519"):
        DkimSigner({"example.com": DkimKey("s", p256)})
    with pytest.raises(ConfigError, match="1024"):
        DkimSigner({"example.com": DkimKey("s", short_rsa_key())})
    with pytest.raises(ConfigError, match="not a domain"):
        DkimSigner({"exa mple.com": DkimKey("s", pem)})
    with pytest.raises(ConfigError, match="selector"):
        DkimSigner({"example.com": DkimKey("bad selector", pem)})
    with pytest.raises(ConfigError, match="From"):
        DkimSigner({}, headers=("To",))
    with pytest.raises(ConfigError, match="header name"):
        DkimSigner({}, headers=("From", "Bad Name"))


def test_parse_key_spec() -> None:
    assert parse_key_spec(" Example.com:sel1:/k/a.pem , b.org:s2:/k/b.pem,") == {
        "example.com": ("sel1", "/k/a.pem"),
        "b.org": ("s2", "/k/b.pem"),
    }
    with pytest.raises(ConfigError, match="domain:selector:path"):
        parse_key_spec("example.com:/k/a.pem")
    with pytest.raises(ConfigError, match="twice"):
        parse_key_spec("a.org:s:/x,A.org:t:/y")
