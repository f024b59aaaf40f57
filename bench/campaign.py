"""The benchmark campaign: a personalised ~2 KB HTML+text newsletter and its recipients.

Shared by ``bench.render`` (rendering alone) and ``bench.e2e`` (the whole cluster), so
both measure the same message.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from client_sdk import MessageContent, Recipient

SENDER = "news@example.com"
SENDER_NAME = "Example News"
SUBJECT = "{{ name }}, your November digest is ready"
# No spaces inside the braces: the coordinator still rejects spaces anywhere in the URL.
UNSUBSCRIBE_URL = "https://example.com/unsubscribe?e={{email}}&c={{code}}"
HEADERS = (("X-Campaign", "bench-2026-11"),)

_LOREM = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor."

TEXT = (
    "Hello {{ name }},\n\n"
    "Your November digest is ready. Your member code is {{ code }}.\n"
    "We picked these stories for readers in {{ city }}:\n\n"
    + "".join(f"- {_LOREM}\n" for _ in range(4))
    + "\nYou are receiving this because you signed up at example.com.\n"
)

HTML = (
    "<html><head><style>p { font-family: sans-serif; }</style></head><body>\n"
    "<h1>Hello {{ name }}!</h1>\n"
    "<p>Your November digest is ready. Your member code is <b>{{ code }}</b>.</p>\n"
    "<p>We picked these stories for readers in {{ city }}:</p>\n<ul>\n"
    + "".join(f"<li>{_LOREM}</li>\n" for _ in range(4))
    + "</ul>\n<p>You are receiving this because you signed up at example.com.</p>\n"
    '<p><a href="https://example.com/unsubscribe?e={{ email }}">Unsubscribe</a></p>\n'
    "</body></html>\n"
)

CITIES = ("Paris", "Zürich", "Kraków", "Lisboa", "Tōkyō", "Austin", "Nairobi", "Oslo")


def recipient(i: int) -> tuple[str, str, dict[str, str]]:
    """Recipient ``i``: address, display name and variables."""
    return (
        f"user{i}@example.org",
        f"User {i}",
        {"code": f"M{i:07d}", "city": CITIES[i % len(CITIES)]},
    )


def recipients(count: int) -> Iterator[tuple[str, str, dict[str, str]]]:
    """The first ``count`` recipients."""
    return (recipient(i) for i in range(count))


def mixed_recipient(i: int, domains: int) -> str:
    """Recipient ``i`` of a list whose domains mix like a real one: 40% at one big
    provider, the rest spread evenly over ``domains`` others (0: all at the provider)."""
    if domains == 0 or i % 5 < 2:
        return f"user{i}@example.org"
    return f"user{i}@d{i % domains}.example.net"


SHARED_TEXT = (
    "Hello,\n\nThe service is down for maintenance tonight from 22:00 to 23:00 UTC.\n\n"
    + "".join(f"- {_LOREM}\n" for _ in range(8))
    + "\nYou are receiving this because you have an account at example.com.\n"
)


def shared_content(recipients_per_message: int) -> MessageContent:
    """The same ~1 KB notice for everyone, ``recipients_per_message`` per transaction."""
    from client_sdk import Address, Header, MessageContent

    return MessageContent(
        sender=Address(SENDER, SENDER_NAME),
        subject="Maintenance tonight",
        text_body=SHARED_TEXT,
        headers=tuple(Header(name, value) for name, value in HEADERS),
        recipients_per_message=recipients_per_message,
    )


def message_content() -> MessageContent:
    """The campaign as the SDK submits it (``bench.e2e``, ``bench.scale``)."""
    from client_sdk import Address, Header, MessageContent

    return MessageContent(
        sender=Address(SENDER, SENDER_NAME),
        subject=SUBJECT,
        text_body=TEXT,
        html_body=HTML,
        headers=tuple(Header(name, value) for name, value in HEADERS),
        unsubscribe_url=UNSUBSCRIBE_URL,
    )


def sdk_job(
    count: int, shared: int = 0, domains: int = 0
) -> tuple[MessageContent, Callable[[], Iterator[Recipient]]]:
    """The content and a recipients factory (re-readable, as ``mailers send`` passes
    them) of the campaign to ``count`` recipients, or with ``shared`` > 0 of the
    identical-body notice, ``shared`` per message, addressed as :func:`mixed_recipient`
    over ``domains``."""
    from client_sdk import Recipient

    content = shared_content(shared) if shared else message_content()

    def factory() -> Iterator[Recipient]:
        if shared:
            return (Recipient(mixed_recipient(i, domains)) for i in range(count))
        return (Recipient(e, n, v) for e, n, v in recipients(count))

    return content, factory
