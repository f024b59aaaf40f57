"""A local SMTP sink: accepts mail, stores it as Maildir files, logs every recipient as JSON.

Run it as ``python -m mailers.sink --host 127.0.0.1 --port 2525 --maildir DIR --log FILE``,
or in-process with :class:`SinkServer` (``port=0`` picks a free port).

* Every accepted message is written once to ``DIR/new/<unique>.eml`` (written in
  ``DIR/tmp`` and renamed, as Maildir requires, so a reader never sees half a file).
* Every accepted recipient appends one line to the log, flushed at once:
  ``{"message_id", "rcpt", "mail_from", "size", "ts", "file"}``. The log is the
  ground truth of tests counting deliveries and duplicate Message-IDs.
* Faults for tests: recipients matching ``--reject-pattern`` get ``550``, those
  matching ``--tempfail-pattern`` get ``451``, and ``--delay-ms`` holds every DATA
  reply back.

Nothing is fsynced: the sink is for tests and demos, and must take large volumes
quickly; a crash can lose the last messages, never corrupt earlier lines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email.parser
import email.policy
import itertools
import json
import os
import re
import signal
import socket
import sys
import time
import weakref
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

from aiosmtpd.smtp import SMTP, Envelope, Session

_HEADER_END = re.compile(rb"\r?\n\r?\n")


@dataclasses.dataclass(frozen=True)
class SinkConfig:
    """Where the sink listens and stores, and which faults it injects."""

    maildir: Path
    """Maildir root; ``tmp``, ``new`` and ``cur`` are created inside."""
    log_path: Path
    """JSON-lines log of accepted recipients (appended to)."""
    host: str = "127.0.0.1"
    port: int = 0
    """0 picks a free port; read it from :attr:`SinkServer.port`."""
    delay: timedelta = timedelta(0)
    """Held before every DATA reply, to imitate a slow relay."""
    reject_pattern: str | None = None
    """Recipients matching this regular expression get ``550 5.1.1``."""
    tempfail_pattern: str | None = None
    """Recipients matching this regular expression get ``451 4.3.0``."""
    hostname: str = "mailers-sink"
    """Name in the greeting (set, so no slow FQDN lookup per connection)."""
    data_size_limit: int = 32 * 1024 * 1024

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if self.delay < timedelta(0):
            raise ValueError("delay must not be negative")
        for pattern in (self.reject_pattern, self.tempfail_pattern):
            if pattern is not None:
                re.compile(pattern)


@dataclasses.dataclass
class SinkStats:
    """Counters since start."""

    messages: int = 0
    recipients: int = 0
    rejected: int = 0
    tempfailed: int = 0


def message_id_of(data: bytes) -> str:
    """The Message-ID header of a raw message, stripped; ``""`` when absent."""
    match = _HEADER_END.search(data)
    head = data[: match.start()] if match else data
    headers = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    value = headers.get("Message-ID")
    return " ".join(str(value).split()) if value is not None else ""


class MaildirWriter:
    """Writes messages as Maildir files named ``<time>.M<usec>P<pid>Q<n>.<host>.eml``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("tmp", "new", "cur"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "_").replace(":", "_") or "localhost"
        self._pid = os.getpid()
        self._counter = itertools.count(1)

    def write(self, data: bytes) -> Path:
        """Store one message and return its path under ``new``."""
        now_ns = time.time_ns()
        name = (
            f"{now_ns // 1_000_000_000}.M{now_ns // 1000 % 1_000_000}"
            f"P{self._pid}Q{next(self._counter)}.{self._host}.eml"
        )
        tmp = self.root / "tmp" / name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        final = self.root / "new" / name
        os.rename(tmp, final)
        return final


class SinkHandler:
    """aiosmtpd handler: applies the fault patterns, stores and logs accepted mail."""

    def __init__(self, config: SinkConfig, maildir: MaildirWriter, log: IO[str]) -> None:
        self._config = config
        self._maildir = maildir
        self._log = log
        self._reject = re.compile(config.reject_pattern) if config.reject_pattern else None
        self._tempfail = re.compile(config.tempfail_pattern) if config.tempfail_pattern else None
        self.stats = SinkStats()

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if self._reject is not None and self._reject.search(address):
            self.stats.rejected += 1
            return f"550 5.1.1 <{address}>: Recipient address rejected"
        if self._tempfail is not None and self._tempfail.search(address):
            self.stats.tempfailed += 1
            return f"451 4.3.0 <{address}>: Temporary failure, try again later"
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self._config.delay > timedelta(0):
            await asyncio.sleep(self._config.delay.total_seconds())
        data = envelope.original_content
        if data is None:
            raw = envelope.content
            data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw or b""
        path = self._maildir.write(data)
        message_id = message_id_of(data)
        ts = time.time()
        lines = [
            json.dumps(
                {
                    "message_id": message_id,
                    "rcpt": rcpt,
                    "mail_from": envelope.mail_from,
                    "size": len(data),
                    "ts": ts,
                    "file": path.name,
                },
                ensure_ascii=False,
            )
            + "\n"
            for rcpt in envelope.rcpt_tos
        ]
        self._log.write("".join(lines))
        self._log.flush()
        self.stats.messages += 1
        self.stats.recipients += len(envelope.rcpt_tos)
        return "250 2.0.0 OK queued"


class SinkServer:
    """The sink on the running event loop; ``start`` binds, ``stop`` closes everything.

    Usable as ``async with SinkServer(config) as sink:``.
    """

    def __init__(self, config: SinkConfig) -> None:
        self.config = config
        self._server: asyncio.Server | None = None
        self._log: IO[str] | None = None
        self._handler: SinkHandler | None = None
        self._sessions: weakref.WeakSet[SMTP] = weakref.WeakSet()
        self.port = config.port

    @property
    def stats(self) -> SinkStats:
        """Counters since start."""
        if self._handler is None:
            return SinkStats()
        return self._handler.stats

    @property
    def address(self) -> str:
        """``host:port`` the sink listens on."""
        return f"{self.config.host}:{self.port}"

    async def start(self) -> None:
        """Create the Maildir and log, and start listening."""
        maildir = MaildirWriter(self.config.maildir)
        self.config.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.config.log_path.open("a", encoding="utf-8")
        self._handler = SinkHandler(self.config, maildir, self._log)

        def factory() -> SMTP:
            smtp = SMTP(
                self._handler,
                hostname=self.config.hostname,
                enable_SMTPUTF8=True,
                data_size_limit=self.config.data_size_limit,
                ident="mailers-sink",
            )
            self._sessions.add(smtp)
            return smtp

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            factory, self.config.host, self.config.port, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, drop open sessions and close the log. Idempotent."""
        if self._server is not None:
            self._server.close()
            for session in list(self._sessions):
                transport: Any = getattr(session, "transport", None)
                if transport is not None:
                    transport.close()
            await self._server.wait_closed()
            self._server = None
        if self._log is not None:
            self._log.close()
            self._log = None

    async def __aenter__(self) -> SinkServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a sink log (a torn last line is skipped)."""
    if not path.exists():
        return []
    entries: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                entries.append(json.loads(line))
    return entries


def _parse_args(argv: Sequence[str] | None) -> SinkConfig:
    parser = argparse.ArgumentParser(
        prog="python -m mailers.sink", description="Local SMTP sink for tests and demos."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525, help="0 picks a free port")
    parser.add_argument("--maildir", type=Path, required=True)
    parser.add_argument("--log", type=Path, required=True, help="JSON-lines recipient log")
    parser.add_argument("--delay-ms", type=int, default=0, help="hold each DATA reply this long")
    parser.add_argument("--reject-pattern", help="regex: matching recipients get 550")
    parser.add_argument("--tempfail-pattern", help="regex: matching recipients get 451")
    ns = parser.parse_args(argv)
    try:
        return SinkConfig(
            maildir=ns.maildir,
            log_path=ns.log,
            host=ns.host,
            port=ns.port,
            delay=timedelta(milliseconds=ns.delay_ms),
            reject_pattern=ns.reject_pattern,
            tempfail_pattern=ns.tempfail_pattern,
        )
    except (ValueError, re.error) as exc:
        parser.error(str(exc))


async def _serve(config: SinkConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with SinkServer(config) as sink:
        print(f"mailers-sink listening on {sink.address}", flush=True)
        await stop.wait()
        print(
            f"mailers-sink stopping: {sink.stats.messages} messages, "
            f"{sink.stats.recipients} recipients",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mailers.sink``; runs until SIGTERM or SIGINT."""
    config = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
