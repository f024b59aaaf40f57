"""DKIM signing: signatures made by DkimSigner verify with dkimpy against the public key
(no DNS: the key is handed to dkimpy through ``dnsfunc``)."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import dkim  # type: ignore[import-untyped]
import pytest

from sender_node.dkim import DkimKey, DkimSigner, parse_key_spec
from sender_node.errors import ConfigError, RenderError
from sender_node.render import Attachment, CompiledMessage, Content, Mailbox

DATE = datetime(2025, 3, 4, 5, 6, 7, tzinfo=UTC)
OPENSSL = shutil.which("openssl")
pytestmark = pytest.mark.skipif(OPENSSL is None, reason="openssl makes the test keys")


def make_key(directory: Path, bits: int) -> tuple[Path, str]:
    """A fresh RSA key file and its public key as a DKIM TXT ``p=`` value."""
    assert OPENSSL is not None
    path = directory / f"key{bits}.pem"
    subprocess.run(
        [OPENSSL, "genrsa", "-out", str(path), str(bits)], check=True, capture_output=True
    )
    der = subprocess.run(
        [OPENSSL, "rsa", "-in", str(path), "-pubout", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    return path, base64.b64encode(der).decode()


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return make_key(tmp_path_factory.mktemp("dkim"), 2048)


def dns_for(public: str, name: bytes = b"mail2025._domainkey.example.com.") -> Callable[..., bytes]:
    def lookup(qname: bytes, timeout: int = 5) -> bytes:
        return f"v=DKIM1; k=rsa; p={public}".encode() if qname == name else b""

    return lookup


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


def test_signed_message_verifies_with_the_public_key(key: tuple[Path, str]) -> None:
    # Given a signer for example.com
    path, public = key
    signer = DkimSigner.from_files({"example.com": ("mail2025", path)})

    # When a personalised message from example.com is rendered
    raw = rendered(signer)

    # Then it starts with a relaxed/relaxed rsa-sha256 signature for d=example.com that
    # dkimpy verifies, covering (and oversigning) the headers that matter
    assert raw.startswith(b"DKIM-Signature: ")
    signature = raw.split(b"\r\nDate: ", 1)[0]
    assert b"a=rsa-sha256" in signature and b"c=relaxed/relaxed" in signature
    assert b"d=example.com" in signature and b"s=mail2025" in signature
    h_tag = raw.split(b"h=", 1)[1].split(b";", 1)[0].replace(b"\r\n ", b"")
    signed = [name.strip() for name in h_tag.split(b":")]
    for name in (b"from", b"to", b"subject", b"date", b"message-id", b"mime-version",
                 b"content-type", b"list-unsubscribe", b"list-unsubscribe-post"):  # fmt: skip
        assert signed.count(name) == 2
    assert dkim.verify(raw, dnsfunc=dns_for(public))


def test_tampering_or_adding_a_header_breaks_the_signature(key: tuple[Path, str]) -> None:
    path, public = key
    signer = DkimSigner.from_files({"example.com": ("mail2025", path)})
    raw = rendered(signer)
    # A changed body
    assert not dkim.verify(raw.replace(b"Hallo", b"Hello"), dnsfunc=dns_for(public))
    # A second From or List-Unsubscribe added in transit (oversigned)
    head, body = raw.split(b"\r\n\r\n", 1)
    for extra in (b"From: evil@attacker.test", b"List-Unsubscribe: <https://evil.test/>"):
        forged = head + b"\r\n" + extra + b"\r\n\r\n" + body
        assert not dkim.verify(forged, dnsfunc=dns_for(public))
    # A header not signed may be added (e.g. by a relay) without breaking it
    relayed = b"Received: from relay\r\n" + raw
    assert dkim.verify(relayed, dnsfunc=dns_for(public))


def test_text_only_message_with_attachment_verifies(key: tuple[Path, str]) -> None:
    path, public = key
    signer = DkimSigner({"example.com": DkimKey("mail2025", path.read_bytes())})
    raw = rendered(
        signer,
        html_body="",
        unsubscribe_url="",
        attachments=(Attachment("b.pdf", "application/pdf", b"%PDF-1.4 x"),),
    )
    assert dkim.verify(raw, dnsfunc=dns_for(public))


def test_other_domains_are_not_signed(key: tuple[Path, str]) -> None:
    path, _ = key
    signer = DkimSigner.from_files({"Example.com": ("mail2025", str(path))})
    assert signer.can_sign("EXAMPLE.com") and signer.domains == {"example.com"}
    assert not signer.can_sign("other.test")
    raw = rendered(signer, sender=Mailbox("news@other.test"))
    assert not raw.startswith(b"DKIM-Signature")
    assert signer.sign(b"x", "other.test") == b"x"


def test_a_message_dkimpy_refuses_is_a_render_error(key: tuple[Path, str]) -> None:
    path, _ = key
    signer = DkimSigner.from_files({"example.com": ("mail2025", path)})
    with pytest.raises(RenderError, match="DKIM"):
        signer.sign(b"not a header\r\n\r\nbody\r\n", "example.com")


def test_configuration_errors(tmp_path: Path, key: tuple[Path, str]) -> None:
    path, _ = key
    pem = path.read_bytes()
    with pytest.raises(ConfigError, match="cannot be read"):
        DkimSigner.from_files({"example.com": ("s", tmp_path / "missing.pem")})
    with pytest.raises(ConfigError, match="cannot be parsed"):
        DkimSigner({"example.com": DkimKey("s", b"-----BEGIN RSA PRIVATE KEY-----\nxx\n")})
    with pytest.raises(ConfigError, match="not a domain"):
        DkimSigner({"exa mple.com": DkimKey("s", pem)})
    with pytest.raises(ConfigError, match="selector"):
        DkimSigner({"example.com": DkimKey("bad selector", pem)})
    with pytest.raises(ConfigError, match="From"):
        DkimSigner({}, headers=("To",))
    short, _ = make_key(tmp_path, 768)
    with pytest.raises(ConfigError, match="1024"):
        DkimSigner.from_files({"example.com": ("s", short)})


def test_parse_key_spec() -> None:
    assert parse_key_spec(" Example.com:sel1:/k/a.pem , b.org:s2:/k/b.pem,") == {
        "example.com": ("sel1", "/k/a.pem"),
        "b.org": ("s2", "/k/b.pem"),
    }
    with pytest.raises(ConfigError, match="domain:selector:path"):
        parse_key_spec("example.com:/k/a.pem")
    with pytest.raises(ConfigError, match="twice"):
        parse_key_spec("a.org:s:/x,A.org:t:/y")
