"""A webhook receiver for tests: a real HTTPS server (aiohttp) on 127.0.0.1 that
verifies each delivery with the ``standardwebhooks`` package and records it.

Faults are attributes the test sets: ``refuse`` (answer the next N deliveries with
``status``), ``down`` (answer every delivery with ``status`` until cleared).
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook as Verifier

from mailers_dev.certs import CertSpec, DevCA


@dataclasses.dataclass(frozen=True)
class Delivery:
    webhook_id: str
    """The ``webhook-id`` header."""
    events: list[dict[str, Any]]
    accepted: bool


class Receiver:
    def __init__(self, secret: str = "") -> None:
        self.secret = secret
        """Set once the endpoint is created; every delivery must verify with it."""
        self.deliveries: list[Delivery] = []
        self.refuse = 0
        self.down = False
        self.status = 503
        self.bad_signatures = 0
        self.url = ""

    @property
    def accepted_events(self) -> list[dict[str, Any]]:
        return [e for d in self.deliveries if d.accepted for e in d.events]

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            payload = Verifier(self.secret).verify(raw, dict(request.headers))
        except Exception:
            self.bad_signatures += 1
            return web.Response(status=400, text="bad signature")
        accepted = not self.down and self.refuse <= 0
        if not accepted and not self.down:
            self.refuse -= 1
        events = payload["data"]["events"]
        self.deliveries.append(Delivery(request.headers["webhook-id"], events, accepted))
        return web.Response(status=204 if accepted else self.status)


@asynccontextmanager
async def serving(directory: Path) -> AsyncIterator[tuple[Receiver, Path]]:
    """A receiver over HTTPS with a certificate of a new CA; yields it and the CA file
    (for ``MAILER_WEBHOOK_CA_FILE``)."""
    ca = DevCA.create(directory / "webhook-ca", name="Webhook test CA")
    paths = ca.issue(CertSpec("receiver", "receiver", hosts=("127.0.0.1", "localhost")))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(paths.cert, paths.key)
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/hooks", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1]
    receiver.url = f"https://127.0.0.1:{port}/hooks"
    try:
        yield receiver, ca.cert_path
    finally:
        await runner.cleanup()
