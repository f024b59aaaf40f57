"""The inbound SMTP endpoint: mail for the bounce domains, kept as received.

Every coordinator (leader or standby) listens on ``MAILER_INBOUND_LISTEN`` with
aiosmtpd: it accepts recipients of its bounce domains only (anything else gets 550: it
is not a relay), messages up to ``max_bytes``, ``max_connections`` sessions at once,
STARTTLS with the coordinator's certificate when it has one. Each accepted message is
written to the store's ``inbound`` table (one row per envelope recipient) before the
``250``; the leader applies it later (:mod:`coordinator.feedback`). A message the
store cannot take now gets ``451`` and comes again: a bounce is never bounced.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from coordinator.db.store import Store, StoreUnavailable
from mailers_runtime import settings
from mailers_runtime.errors import ConfigError

log = logging.getLogger(__name__)


def _domains(raw: str) -> frozenset[str]:
    return frozenset(d.strip().lower() for d in raw.split(",") if d.strip())


@settings.config
class InboundConfig:
    listen: str = settings.setting("MAILER_INBOUND_LISTEN", default="")
    """host:port of the inbound SMTP endpoint (bounces, complaints, mailto: unsubscribes);
    empty: none."""
    domains: frozenset[str] = settings.setting(
        "MAILER_BOUNCE_DOMAINS", default=frozenset(), parse=_domains, quote=False
    )
    """The bounce domains (comma-separated) nodes write VERP envelope senders with; the
    endpoint accepts mail for these only."""
    token_key_file: str = settings.setting("MAILER_TOKEN_KEY_FILE", default="")
    """The key file of the nodes' VERP and unsubscribe tokens (the same file)."""
    max_bytes: int = settings.setting(
        "MAILER_INBOUND_MAX_BYTES", default=10 * 1024 * 1024, parse=settings.integer
    )
    """Largest message accepted (advertised as SIZE)."""
    max_connections: int = settings.setting(
        "MAILER_INBOUND_MAX_CONNECTIONS", default=100, parse=settings.integer
    )
    """Sessions at once; more are answered 421 and closed."""

    def __post_init__(self) -> None:
        if self.listen and (not self.domains or not self.token_key_file):
            raise ConfigError(
                "MAILER_INBOUND_LISTEN needs MAILER_BOUNCE_DOMAINS and MAILER_TOKEN_KEY_FILE"
            )
        if self.max_bytes < 1024 or self.max_connections < 1:
            raise ConfigError("MAILER_INBOUND_MAX_BYTES and _MAX_CONNECTIONS are too small")


class InboundHandler:
    """aiosmtpd handler: recipients of the bounce domains only; DATA goes to the store."""

    def __init__(
        self, store: Store, domains: frozenset[str], clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._domains = domains
        self._clock = clock

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        domain = address.rpartition("@")[2].lower()
        if domain not in self._domains:
            return "550 5.7.1 Relaying denied: not a bounce domain of this server"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        try:
            await self._store.intake(
                "mail", envelope.mail_from or "", envelope.rcpt_tos, raw, self._clock()
            )
        except StoreUnavailable as exc:
            log.warning("inbound: cannot keep a message now (%s); it will come again", exc)
            return "451 4.3.0 Try again later"
        return "250 2.0.0 OK: kept"


class _LimitedSMTP(SMTP):
    """One session; refused with 421 past the connection limit."""

    def __init__(self, sessions: set[_LimitedSMTP], limit: int, **kw: Any) -> None:
        super().__init__(**kw)
        self._sessions = sessions
        self._limit = limit

    def connection_made(self, transport: Any) -> None:
        if len(self._sessions) >= self._limit:
            transport.write(b"421 4.7.0 Too many connections, try again later\r\n")
            transport.close()
            return
        self._sessions.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._sessions.discard(self)
        super().connection_lost(exc)


async def start_inbound(
    config: InboundConfig,
    store: Store,
    tls: ssl.SSLContext | None,
    tenant_domains: frozenset[str] = frozenset(),
) -> asyncio.Server | None:
    """Listen on ``config.listen`` (None when it is empty), for the configured bounce
    domains and the tenants' own (``tenant_domains``, from the auth file)."""
    if not config.listen:
        return None
    domains = config.domains | tenant_domains
    handler = InboundHandler(store, domains)
    sessions: set[_LimitedSMTP] = set()

    def factory() -> SMTP:
        return _LimitedSMTP(
            sessions, config.max_connections, handler=handler, hostname="mailers-inbound",
            ident="mailers-inbound", data_size_limit=config.max_bytes, enable_SMTPUTF8=True,
            tls_context=tls, auth_require_tls=False,
        )  # fmt: skip

    host, _, port = config.listen.rpartition(":")
    server = await asyncio.get_running_loop().create_server(
        factory, host or "0.0.0.0", int(port), reuse_address=True
    )
    log.info("inbound SMTP for %s on %s", ", ".join(sorted(domains)), config.listen)
    return server
