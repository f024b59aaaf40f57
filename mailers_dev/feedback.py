"""Playing a mailbox provider against a local cluster: bounces, complaints and one-click
unsubscribes sent back the way real ones arrive (for the demo and the tests).

- :func:`stored` reads what the sink received: each recipient's envelope sender (the
  VERP address a bounce goes back to) and message (its Message-ID and
  ``List-Unsubscribe``).
- :func:`dsn` and :func:`arf` write a delivery status notification (RFC 3464) and an
  abuse report (RFC 5965); :func:`send_back` delivers one to a coordinator's inbound
  SMTP endpoint with the null reverse-path, as an MTA does.
- :func:`one_click` POSTs ``List-Unsubscribe=One-Click`` (RFC 8058) to the message's
  HTTPS link, as Gmail and Yahoo do.
"""

from __future__ import annotations

import email
import email.policy
import ssl
from email.message import EmailMessage
from pathlib import Path

import aiohttp
import aiosmtplib

from mailers_dev.sink import read_log


def stored(log_path: Path, maildir: Path) -> dict[str, tuple[str, EmailMessage]]:
    """Per recipient: the envelope sender and the message the sink stored."""
    out = {}
    for line in read_log(log_path):
        raw = (maildir / "new" / str(line["file"])).read_bytes()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        out[str(line["rcpt"])] = (str(line["mail_from"]), message)
    return out


def unsubscribe_link(message: EmailMessage) -> str:
    """The https:// URL of a message's List-Unsubscribe ("" without one)."""
    value = str(message.get("List-Unsubscribe", ""))
    links = [part.strip().strip("<>") for part in value.split(",")]
    return next((link for link in links if link.startswith("https://")), "")


def dsn(failed: str, status: str, message_id: str, diagnostic: str = "no such user") -> bytes:
    """A delivery status notification for one recipient (``Action: failed``)."""
    return _report(
        "delivery-status",
        "Your message could not be delivered.",
        "message/delivery-status",
        f"Reporting-MTA: dns; mx.provider.example\n\nFinal-Recipient: rfc822; {failed}\n"
        f"Action: failed\nStatus: {status}\nDiagnostic-Code: smtp; 550 {status} {diagnostic}\n",
        f"Message-ID: {message_id}\nTo: {failed}\nSubject: (original)\n",
    )


def arf(complainer: str, message_id: str, feedback_type: str = "abuse") -> bytes:
    """An abuse report about one recipient's message."""
    return _report(
        "feedback-report",
        "This is an email abuse report.",
        "message/feedback-report",
        f"Feedback-Type: {feedback_type}\nUser-Agent: provider-fbl/1.0\nVersion: 1\n"
        f"Original-Rcpt-To: {complainer}\n",
        f"Message-ID: {message_id}\nTo: {complainer}\nSubject: (original)\n",
    )


def _report(report_type: str, human: str, part_type: str, fields: str, original: str) -> bytes:
    text = (
        "From: MAILER-DAEMON@mx.provider.example\nTo: postmaster@provider.example\n"
        "Subject: Report\nMIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type={report_type}; boundary="B"\n\n'
        f"--B\nContent-Type: text/plain\n\n{human}\n\n"
        f"--B\nContent-Type: {part_type}\n\n{fields}\n"
        f"--B\nContent-Type: text/rfc822-headers\n\n{original}\n--B--\n"
    )
    return text.replace("\n", "\r\n").encode()


async def send_back(port: int, rcpt: str, raw: bytes) -> None:
    """Deliver ``raw`` to ``rcpt`` at the inbound endpoint on 127.0.0.1:``port``, with
    the null reverse-path (RFC 5321 4.5.5) of a bounce.

    Raises:
        aiosmtplib.SMTPRecipientRefused: the endpoint refused the recipient.
    """
    async with aiosmtplib.SMTP(
        hostname="127.0.0.1", port=port, timeout=10, start_tls=False
    ) as smtp:
        await smtp.mail("")
        await smtp.rcpt(rcpt)
        await smtp.data(raw)


async def one_click(url: str, ca_file: Path, method: str = "POST") -> tuple[int, str]:
    """Request the unsubscribe link as a mailbox provider does; (status, body)."""
    context = ssl.create_default_context(cafile=str(ca_file))
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(ssl=context), timeout=aiohttp.ClientTimeout(total=15)
    ) as http:
        data = "List-Unsubscribe=One-Click" if method == "POST" else None
        async with http.request(method, url, data=data) as response:
            return response.status, await response.text()
