"""The console's HTTP shell (aiohttp): sessions, CSRF, and calls to the cluster's API.

Every page acts on the cluster through the project's own gRPC API with the operator's
token (a :class:`client_sdk.MailerClient` per session, dialing this coordinator's
advertised address; it follows the API's redirects to the leader), so what an operator
may see and do is exactly what the API allows that token. The one exception is the
throughput chart, read from the store (:mod:`coordinator.console.reads`) under the same
rule: a tenant sees its own events, an admin every tenant's.

Every API call has a deadline (:data:`CALL_TIMEOUT`), and so does reading a form
(:data:`FORM_TIMEOUT_S`). Each session's client is closed when the session ends (log-out,
expiry seen by the next request, eviction) and every remaining one when the app is
cleaned up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from urllib.parse import urlencode

import grpc
from aiohttp import web

from client_sdk import ClientConfig, ClientTls, MailerClient
from client_sdk.errors import (
    AuthError,
    FailedPreconditionError,
    InvalidArgumentError,
    MailerError,
    NotFoundError,
    TransientError,
)
from coordinator.auth import AUTH_METADATA_KEY, AuthConfig, Principal
from coordinator.console import query, views
from coordinator.console.assets import CSS, JS
from coordinator.console.reads import throughput
from coordinator.console.session import Session, SessionPolicy, Sessions, random_id, same_secret
from coordinator.console.throughput import window_start_s
from coordinator.db.store import Database, StoreUnavailable

log = logging.getLogger(__name__)

CALL_TIMEOUT = timedelta(seconds=5)
"""Deadline of each API call a page makes (a page makes at most a few)."""
FORM_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 2.0
COOKIE = "mailers_console"
LOGIN_COOKIE = "mailers_console_login"
"""Holds the log-in form's CSRF secret until log-in (a double-submit cookie: a session
does not exist yet)."""
MAX_TOKEN_CHARS = 200
SUPPRESSION_SCAN = 5_000
"""Suppressions read at most per search (the API lists by address, without search)."""
SUPPRESSION_MATCHES = 200
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

Connect = Callable[[str | None], MailerClient]
"""Makes an API client calling with the given token (None: no token, auth off)."""
Handler = Callable[[web.Request, Session, MailerClient], Awaitable[web.StreamResponse]]


def html_page(text: str, status: int = 200) -> web.Response:
    return web.Response(status=status, text=text, content_type="text/html")


def see_other(location: str) -> web.Response:
    """303: after a POST the browser GETs the result, so reloading repeats nothing."""
    return web.Response(status=303, headers={"Location": location})


def principal_of(auth: AuthConfig | None, token: str) -> Principal | None:
    """Who ``token`` is, by the API's own rule; everyone is an admin when auth is off."""
    if auth is None:
        return Principal(tenant="", admin=True)
    return auth.identify([(AUTH_METADATA_KEY, f"Bearer {token}")])


@web.middleware
async def _headers(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers.update(HEADERS)
    return response


class Console:
    """The console's routes and sessions; mount :meth:`app` under ``/console``."""

    def __init__(
        self,
        connect: Connect,
        auth: AuthConfig | None,
        db: Database | None,
        *,
        secure: bool,
        policy: SessionPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Make the console; nothing is dialed until someone logs in.

        Args:
            connect: Makes each session's API client.
            auth: The coordinator's auth file (None: auth off, any token logs in).
            db: For the throughput chart; None shows none.
            secure: Served over HTTPS: cookies get ``Secure``.
            policy: Session lifetimes; the defaults of :class:`SessionPolicy` when None.
            clock: Seconds since the epoch (tests pass a fake one).
        """
        self._connect = connect
        self._auth = auth
        self._db = db
        self._secure = secure
        self._sessions = Sessions(policy or SessionPolicy())
        self._clients: dict[str, MailerClient] = {}
        self._clock = clock

    def app(self) -> web.Application:
        app = web.Application(middlewares=[_headers], client_max_size=64 * 1024)
        guard = self._guarded
        app.add_routes(
            [
                web.get("", self.root),
                web.get("/", self.root),
                web.get("/static/console.css", self.css),
                web.get("/static/console.js", self.js),
                web.get("/login", self.login_form),
                web.post("/login", self.login),
                web.post("/logout", guard(self.logout)),
                web.get("/jobs", guard(self.jobs)),
                web.get("/api/jobs", guard(self.jobs_progress, api=True)),
                web.get("/api/jobs/{job_id}", guard(self.job_progress, api=True)),
                web.get("/jobs/{job_id}", guard(self.job)),
                web.get("/jobs/{job_id}/{action}", guard(self.confirm)),
                web.post("/jobs/{job_id}/{action}", guard(self.act)),
                web.get("/nodes", guard(self.nodes)),
                web.get("/throughput", guard(self.throughput)),
                web.get("/suppressions", guard(self.suppressions)),
                web.post("/suppressions", guard(self.suppress)),
                web.post("/suppressions/remove", guard(self.unsuppress)),
            ]
        )
        app.on_cleanup.append(self._close_all)
        return app

    # ---- sessions -----------------------------------------------------------------------

    async def _close_clients(self, sessions: list[Session]) -> None:
        for session in sessions:
            client = self._clients.pop(session.session_id, None)
            if client is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await client.close()

    async def _close_all(self, _app: web.Application) -> None:
        await self._close_clients(self._sessions.sweep(float("inf")))

    def _viewer(self, session: Session) -> views.Viewer:
        if self._auth is None:
            label = "everyone (authentication is off)"
        else:
            label = "an admin" if session.admin else f"tenant {session.tenant}"
        return views.Viewer(label=label, csrf=session.csrf, admin=session.admin)

    def _guarded(
        self, handler: Handler, *, api: bool = False
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        """``handler`` behind a session (and, for POST, its CSRF token), with API
        errors shown as pages (or JSON statuses for ``api`` routes)."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            now_s = self._clock()
            await self._close_clients(self._sessions.sweep(now_s))
            session = self._sessions.touch(request.cookies.get(COOKIE), now_s)
            client = self._clients.get(session.session_id) if session else None
            if session is None or client is None:
                if api:
                    return web.json_response({"error": "log in first"}, status=401)
                return see_other("/console/login")  # a POST did nothing: log in again
            try:
                if request.method == "POST":
                    await self._check_csrf(request, session)
                return await handler(request, session, client)
            except (MailerError, StoreUnavailable, query.BadQuery) as exc:
                return await self._failure(session, exc, api)

        return guarded

    async def _check_csrf(self, request: web.Request, session: Session) -> None:
        form = await _form(request)
        if not session.csrf_ok(form.get("csrf")):
            raise web.HTTPForbidden(
                text=views.message_page(
                    self._viewer(session),
                    "Refused",
                    "This form was not sent by the console (no valid CSRF token). "
                    "Reload the page and try again.",
                ),
                content_type="text/html",
            )

    async def _failure(self, session: Session, exc: Exception, api: bool) -> web.Response:
        status, title, text = _describe(exc)
        if isinstance(exc, AuthError) and exc.code is grpc.StatusCode.UNAUTHENTICATED:
            # The token was revoked since log-in: this session can do nothing any more.
            closed = self._sessions.close(session.session_id)
            await self._close_clients([closed] if closed else [])
        if api:
            return web.json_response({"error": text}, status=status)
        return html_page(views.message_page(self._viewer(session), title, text), status)

    # ---- log-in and log-out -------------------------------------------------------------

    async def root(self, request: web.Request) -> web.Response:
        return see_other("/console/jobs")

    async def css(self, request: web.Request) -> web.Response:
        return web.Response(text=CSS, content_type="text/css")

    async def js(self, request: web.Request) -> web.Response:
        return web.Response(text=JS, content_type="text/javascript")

    def _cookie(self, response: web.Response, name: str, value: str) -> None:
        response.set_cookie(
            name, value, path="/console", httponly=True, secure=self._secure, samesite="Strict"
        )

    async def login_form(
        self, request: web.Request, error: str = "", status: int = 200
    ) -> web.Response:
        secret = request.cookies.get(LOGIN_COOKIE) or random_id()
        page = views.login_page(secret, error, auth_off=self._auth is None)
        response = html_page(page, status)
        self._cookie(response, LOGIN_COOKIE, secret)
        return response

    async def login(self, request: web.Request) -> web.Response:
        form = await _form(request)
        if not same_secret(form.get("csrf"), request.cookies.get(LOGIN_COOKIE)):
            return await self.login_form(request, "The form expired; log in again.", 403)
        token = form.get("token", "").strip()
        principal = principal_of(self._auth, token) if token else None
        if principal is None or len(token) > MAX_TOKEN_CHARS:
            return await self.login_form(request, "That token is not accepted.", 401)
        client = self._connect(token if self._auth is not None else None)
        try:
            # The API decides: a token it refuses logs nobody in.
            await client.list_jobs_page(page_size=1, timeout=CALL_TIMEOUT)
        except MailerError as exc:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await client.close()
            status, _, text = _describe(exc)
            return await self.login_form(request, text, status)
        opened = self._sessions.open(
            token, admin=principal.admin, tenant=principal.tenant, now_s=self._clock()
        )
        # A new id at every log-in (an id known before log-in is worth nothing after),
        # and the browser's previous session, if any, ends.
        previous = self._sessions.close(request.cookies.get(COOKIE) or "")
        await self._close_clients(opened[1:] + ([previous] if previous else []))
        self._clients[opened[0].session_id] = client
        response = see_other("/console/jobs")
        self._cookie(response, COOKIE, opened[0].session_id)
        response.del_cookie(LOGIN_COOKIE, path="/console")
        return response

    async def logout(self, request: web.Request, session: Session, _: MailerClient) -> web.Response:
        closed = self._sessions.close(session.session_id)
        await self._close_clients([closed] if closed else [])
        response = see_other("/console/login")
        response.del_cookie(COOKIE, path="/console")
        return response

    # ---- jobs ---------------------------------------------------------------------------

    async def jobs(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        token = query.page_token(request.query)
        page = await client.list_jobs_page(
            page_size=query.JOBS_PAGE_SIZE, page_token=token, timeout=CALL_TIMEOUT
        )
        text = views.jobs_page(self._viewer(session), page.items, page.next_page_token, token)
        return html_page(text)

    async def jobs_progress(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        page = await client.list_jobs_page(
            page_size=query.JOBS_PAGE_SIZE,
            page_token=query.page_token(request.query),
            timeout=CALL_TIMEOUT,
        )
        return web.json_response({"jobs": [views.progress_data(j.progress) for j in page.items]})

    async def job_progress(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        job = await client.get(request.match_info["job_id"], timeout=CALL_TIMEOUT)
        return web.json_response({"jobs": [views.progress_data(job.progress)]})

    async def job(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        job_id = request.match_info["job_id"]
        wanted = query.ResultsQuery.parse(request.query)
        job = await client.get(job_id, timeout=CALL_TIMEOUT)
        page = await client.results_page(
            job_id,
            statuses=[wanted.status] if wanted.status else [],
            page_size=query.RESULTS_PAGE_SIZE,
            page_token=wanted.page,
            timeout=CALL_TIMEOUT,
        )
        done = request.query.get("done", "")
        notice = f"Job {query.action(done).done}." if done else ""
        text = views.job_page(
            self._viewer(session), job, page.items, page.next_page_token, wanted, notice
        )
        return html_page(text)

    async def confirm(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        action = query.action(request.match_info["action"])
        job = await client.get(request.match_info["job_id"], timeout=CALL_TIMEOUT)
        return html_page(views.confirm_page(self._viewer(session), job, action))

    async def act(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        action = query.action(request.match_info["action"])
        job_id = request.match_info["job_id"]
        form = await _form(request)
        if form.get("confirm") != "yes":
            job = await client.get(job_id, timeout=CALL_TIMEOUT)
            error = "Tick the box to confirm."
            page = views.confirm_page(self._viewer(session), job, action, error)
            return html_page(page, 400)
        calls = {
            query.Action.PAUSE: client.pause,
            query.Action.RESUME: client.resume,
            query.Action.CANCEL: client.cancel,
        }
        await calls[action](job_id, timeout=CALL_TIMEOUT)
        return see_other(f"{query.job_url(job_id)}?done={action.value}")

    # ---- nodes and throughput -----------------------------------------------------------

    async def nodes(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        nodes = await client.list_nodes(timeout=CALL_TIMEOUT)
        status = await client.cluster_status(timeout=CALL_TIMEOUT)
        return html_page(views.nodes_page(self._viewer(session), nodes, status))

    async def throughput(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        viewer = self._viewer(session)
        if self._db is None:
            return html_page(views.message_page(viewer, "Throughput", "No store here."), 503)
        now_s = self._clock()
        tenant = None if session.admin else session.tenant
        chart = await throughput(self._db, tenant, now_s, window_start_s(now_s))
        return html_page(views.throughput_page(viewer, chart))

    # ---- suppressions -------------------------------------------------------------------

    async def suppressions(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        search = query.search_text(request.query)
        tenant = query.tenant_field(request.query, session.admin)
        matches, truncated, read = [], False, 0
        async for item in client.suppressions(tenant=tenant, page_size=500, timeout=CALL_TIMEOUT):
            read += 1
            if search in item.email:
                matches.append(item)
            if len(matches) >= SUPPRESSION_MATCHES or read >= SUPPRESSION_SCAN:
                truncated = True
                break
        done = {"added": "Address suppressed.", "removed": "Address removed."}.get(
            request.query.get("done", ""), ""
        )
        view = views.SuppressionView(matches, search, tenant, truncated, done)
        return html_page(views.suppressions_page(self._viewer(session), view))

    async def suppress(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        form = await _form(request)
        email = query.email_field(form)
        tenant = query.tenant_field(form, session.admin)
        added = await client.suppress(email, tenant=tenant, timeout=CALL_TIMEOUT)
        return see_other(_suppressions_url(added.email, tenant, "added"))

    async def unsuppress(
        self, request: web.Request, session: Session, client: MailerClient
    ) -> web.Response:
        form = await _form(request)
        email = query.email_field(form)
        tenant = query.tenant_field(form, session.admin)
        await client.unsuppress(email, tenant=tenant, timeout=CALL_TIMEOUT)
        return see_other(_suppressions_url("", tenant, "removed"))


def _suppressions_url(search: str, tenant: str, done: str) -> str:
    params = {"q": search, "tenant": tenant, "done": done}
    return "/console/suppressions?" + urlencode({k: v for k, v in params.items() if v})


async def _form(request: web.Request) -> Mapping[str, str]:
    """The request's urlencoded form (cached by aiohttp, so reading it twice is free),
    text fields only."""
    async with asyncio.timeout(FORM_TIMEOUT_S):
        data = await request.post()
    return {k: v for k, v in data.items() if isinstance(v, str)}


def _describe(exc: Exception) -> tuple[int, str, str]:
    """HTTP status, title and text of a failure (the API's details are shown: they
    name what was wrong, never a secret)."""
    if isinstance(exc, query.BadQuery):
        return 400, "Bad request", str(exc)
    if isinstance(exc, NotFoundError):
        return 404, "Not found", "No such job (or not one this token may see)."
    if isinstance(exc, AuthError):
        if exc.code is grpc.StatusCode.UNAUTHENTICATED:
            return 401, "Not accepted", "That token is not accepted."
        return 403, "Not allowed", f"This token may not do that: {exc.details}"
    if isinstance(exc, FailedPreconditionError):
        return 409, "Not now", exc.details
    if isinstance(exc, InvalidArgumentError):
        return 400, "Not valid", exc.details
    if isinstance(exc, TransientError | StoreUnavailable):
        return 503, "Try again", f"The cluster did not answer in time ({exc}). Try again."
    return 502, "Error", f"The cluster answered with an error: {exc}"


def dial_address(advertised: str) -> str:
    """Where this coordinator's own API is dialed: its advertised address, with a
    wildcard host (0.0.0.0, ::) read as loopback."""
    host, _, port = advertised.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        return f"127.0.0.1:{port}"
    return advertised


def connector(address: str, tls: ClientTls | None) -> Connect:
    """API clients of ``address``, over TLS with ``tls`` (the coordinator's own client
    certificate) or plaintext."""
    config = ClientConfig(default_timeout=CALL_TIMEOUT)

    def connect(token: str | None) -> MailerClient:
        return MailerClient([address], config, token=token, tls=tls)

    return connect
