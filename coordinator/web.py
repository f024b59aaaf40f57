"""The coordinators' HTTPS endpoint (aiohttp): one-click unsubscribe (RFC 8058), and
the operators' console under ``/console/`` when it is on (:mod:`coordinator.console`).

``POST /unsubscribe/<token>`` (what Gmail and Yahoo send for ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click``, and what the confirmation page's button sends) keeps the
request in the store's ``inbound`` table at once, on any coordinator, and answers 200;
the leader then records the ``unsubscribed`` event and the suppression
(:mod:`coordinator.feedback`), once per address however often it comes. ``GET`` only
shows a page with that button: link scanners that follow URLs change nothing. A token
that does not verify gets 404 and changes nothing.
"""

from __future__ import annotations

import html
import logging
import ssl
import time
from collections.abc import Callable

from aiohttp import web

from coordinator.console import Console
from coordinator.db.store import Store, StoreUnavailable
from mailers_runtime.verp import Purpose, TokenKey

log = logging.getLogger(__name__)

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>body{{font:1.1rem/1.5 system-ui,sans-serif;max-width:34rem;margin:3rem auto;
padding:0 1rem;color:#1a1a1a;background:#fff}}button{{font:inherit;padding:.6rem 1.2rem;
color:#fff;background:#0b57d0;border:0;border-radius:.3rem;cursor:pointer}}
button:focus{{outline:3px solid #f9ab00;outline-offset:2px}}</style></head>
<body><main><h1>{title}</h1>{body}</main></body></html>
"""


def page(title: str, body: str, status: int = 200) -> web.Response:
    text = _PAGE.format(title=html.escape(title), body=body)
    return web.Response(status=status, text=text, content_type="text/html")


class UnsubscribeEndpoint:
    def __init__(self, store: Store, key: TokenKey, clock: Callable[[], float] = time.time):
        self._store = store
        self._key = key
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/unsubscribe/{token}", self.confirm),
            web.post("/unsubscribe/{token}", self.unsubscribe),
        ]

    async def confirm(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if self._key.verify(Purpose.UNSUBSCRIBE, token) is None:
            return _unknown()
        form = (
            f'<form method="post" action="/unsubscribe/{html.escape(token)}">'
            '<input type="hidden" name="List-Unsubscribe" value="One-Click">'
            "<p>Stop receiving these emails at this address?</p>"
            '<button type="submit">Unsubscribe</button></form>'
        )
        return page("Unsubscribe", form)

    async def unsubscribe(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        if self._key.verify(Purpose.UNSUBSCRIBE, token) is None:
            return _unknown()
        await request.read()  # List-Unsubscribe=One-Click; any POST means the same
        try:
            await self._store.intake("unsubscribe", "", [token], None, self._clock())
        except StoreUnavailable as exc:
            log.warning("unsubscribe not kept now (%s)", exc)
            return page("Try again", "<p>Please try again in a minute.</p>", status=503)
        return page("Unsubscribed", "<p>You will not receive these emails any more.</p>")


def _unknown() -> web.Response:
    return page("Not found", "<p>This unsubscribe link is not valid.</p>", status=404)


async def start_web(
    listen: str,
    store: Store,
    key: TokenKey | None,
    tls: ssl.SSLContext | None,
    console: Console | None = None,
) -> web.AppRunner | None:
    """Serve on ``listen`` (host:port) the unsubscribe endpoint (with a token key) and
    the console (when given); None when ``listen`` is empty or there is nothing to serve.
    The runner's cleanup also closes the console's API clients."""
    if not listen or (key is None and console is None):
        return None
    app = web.Application(client_max_size=64 * 1024)
    if key is not None:
        app.add_routes(UnsubscribeEndpoint(store, key).routes())
    if console is not None:
        app.add_subapp("/console", console.app())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, _, port = listen.rpartition(":")
    await web.TCPSite(runner, host or "0.0.0.0", int(port), ssl_context=tls).start()
    log.info("HTTP%s endpoint on %s", "S" if tls else "", listen)
    return runner
