"""Every query of the coordinator, run against PostgreSQL by one class.

Queries are named in ``queries.sql`` (after procrastinate's ``sql/queries.sql``). Rows
become :mod:`coordinator.model` objects here; protos never come this far down.

**Fencing.** A :class:`Store` built with a leader's epoch ends every write transaction
with ``mailers_check_fence(epoch)``; once a newer leader has raised the fence
(:meth:`Store.raise_fence`) that check fails and the whole transaction rolls back with
:class:`LostLeadership`. The check is the last statement, so its share lock on the fence
row is held only while the transaction commits, and a new leader's raise never waits
behind a long upload.

**Failures.** PostgreSQL unreachable, shutting down, out of disk, read-only or too slow
raises :class:`StoreUnavailable` (nothing was written, or :class:`CommitUnknown` when a
commit's outcome could not be learnt): callers retry later or answer UNAVAILABLE.
Every call has a deadline (``statement_timeout`` on the server, the pool's command
timeout on the client).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

import asyncpg

from coordinator.db import migrate
from coordinator.db.settings import DatabaseConfig
from coordinator.model import (
    Counts,
    Event,
    EventType,
    JobRecord,
    JobSpec,
    JobState,
    JobStatus,
    OpenBatch,
    PendingRecipient,
    Recipient,
    RecipientOutcome,
    Result,
    Status,
    dump_spec,
    load_spec,
)
from coordinator.quotas import ACTIVE_JOBS_RETRY_S, window_retry_after
from coordinator.suppression import Reason, Suppression
from coordinator.webhooks import Failure as WebhookFailure
from coordinator.webhooks import Webhook
from mailers_runtime.errors import MailersError, PermanentError, TransientError

log = logging.getLogger(__name__)

QUERIES_FILE = Path(__file__).resolve().parent / "queries.sql"
COPY_ROWS = 10_000
"""Recipients per COPY statement of a submit. A statement's time is then bounded by the
server's speed (a fraction of a second), not by how fast the caller streams, so an
upload of 10,000,000 recipients never meets ``statement_timeout``; the transaction
around them stays one, and a buffer of this many rows is all a submit holds. At 50,000
that buffer put ~30 MiB on the leader's peak RSS (96 MiB after a 20,000-recipient
``bench.e2e``, 128-129 MiB after 200,000 and 500,000); at 10,000 the two sizes end at
97 and 102 MiB. A 200,000-recipient submit (``bench.upload``, three runs each,
interleaved) ran at 91,632-101,774 recipients/s, against 77,822-117,198 at 50,000."""
STALLED_AFTER_S = 2.0
"""How long a transaction begun before a fence raise may wait for its client while
holding locks a new leader needs, before the new leader ends it."""
FENCE_LOCK_WAIT = "1s"
"""``lock_timeout`` of one attempt to raise the fence."""
FENCE_RAISE_TRIES = 10
FENCED = "ML001"
"""SQLSTATE of mailers_check_fence's refusal."""

STATUS_CODE: dict[Status, int] = {
    Status.QUEUED: 0,
    Status.DELIVERED: 1,
    Status.FAILED: 2,
    Status.DEFERRED: 3,
    Status.CANCELLED: 4,
    Status.SUPPRESSED: 5,
}
STATUS_OF: dict[int, Status] = {v: k for k, v in STATUS_CODE.items()}

_MOVED_COLUMNS = (
    "job_no", "delivered", "failed", "deferred", "cancelled", "suppressed", "duplicates",
)  # fmt: skip
"""What apply_results returns per job, in the order move_counts takes it."""

# SQLSTATE classes and codes that mean "not now" rather than "wrong": connection
# trouble (08), insufficient resources such as a full disk (53), the server shutting
# down or cancelling on statement_timeout (57), read-only (25006), and a
# serialization failure or deadlock (40).
_TRANSIENT_CLASSES = ("08", "53", "57", "40")
_TRANSIENT_CODES = frozenset({"25006"})


class LostLeadership(MailersError):
    """The fence no longer holds: a newer leader exists. Stop acting as leader at once."""


class StoreUnavailable(TransientError, ConnectionError):
    """PostgreSQL cannot do it now (unreachable, full, read-only, too slow); nothing
    was written unless this is a :class:`CommitUnknown`."""


class CommitUnknown(StoreUnavailable):
    """The connection failed while committing: the transaction may or may not have
    applied. Settle it by reading back (:meth:`Store.settle_commit`), never by undoing
    blindly. ``server_pid`` is the server process that ran the transaction."""

    def __init__(self, message: str, server_pid: int = 0) -> None:
        super().__init__(message)
        self.server_pid = server_pid


class Duplicate(PermanentError):
    """A job with the same tenant and idempotency key already exists."""


def load_queries(path: Path = QUERIES_FILE) -> dict[str, str]:
    """The queries of ``queries.sql`` by name (each starts at a ``-- name:`` line)."""
    queries: dict[str, str] = {}
    name = ""
    lines: list[str] = []
    for line in path.read_text().splitlines():
        match = re.match(r"--\s*name:\s*(\w+)\s*$", line)
        if match:
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = match.group(1), []
        elif name and not line.lstrip().startswith("--"):
            lines.append(line)
    if name:
        queries[name] = "\n".join(lines).strip()
    return queries


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        state = str(getattr(exc, "sqlstate", "") or "")
        return state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_CODES
    # InternalClientError: the connection broke under an operation in progress (the
    # server went away mid-statement); its state is lost, the operation was not done.
    return isinstance(
        exc,
        OSError
        | TimeoutError
        | asyncpg.InterfaceError
        | asyncpg.PostgresConnectionError
        | asyncpg.exceptions.InternalClientError,
    )


def _fenced(exc: BaseException) -> bool:
    return isinstance(exc, asyncpg.PostgresError) and getattr(exc, "sqlstate", "") == FENCED


def ts(unix_s: float | None) -> datetime | None:
    return None if unix_s is None else datetime.fromtimestamp(unix_s, UTC)


def unix(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


class Database:
    """The connection pool and the schema. Owned by the coordinator process.

    :meth:`open` connects and brings the schema to head (under an advisory lock, see
    :mod:`coordinator.db.migrate`); :meth:`close` closes every connection.
    """

    def __init__(self, config: DatabaseConfig, pool: asyncpg.Pool) -> None:
        self.config = config
        self.pool = pool
        self.queries = load_queries()

    @classmethod
    async def open(cls, config: DatabaseConfig, *, migrate_schema: bool = True) -> Database:
        """Connect, migrate, and make the pool.

        Raises:
            StoreUnavailable: the server could not be reached or refused.
        """
        try:
            if migrate_schema:
                await migrate.upgrade(lambda: connect(config))
            pool = await asyncpg.create_pool(
                dsn=config.url,
                password=config.password,
                min_size=1,
                max_size=config.pool_size,
                timeout=config.connect_timeout_s,
                command_timeout=config.statement_timeout_s + 5,
                server_settings=_server_settings(config),
            )
        except Exception as exc:
            if _transient(exc) or isinstance(exc, asyncpg.PostgresError):
                raise StoreUnavailable(f"PostgreSQL at {config.redacted()}: {exc}") from exc
            raise
        return cls(config, pool)

    async def close(self) -> None:
        """Close the pool; connections in use are terminated after a short grace."""
        with contextlib.suppress(Exception):
            await self.pool.close()


def _server_settings(config: DatabaseConfig) -> dict[str, str]:
    return {
        "statement_timeout": str(int(config.statement_timeout_s * 1000)),
        # Every statement is a short indexed one; JIT compiling them (PostgreSQL does
        # when its estimate for an unnest() join is high) costs more than it runs.
        "jit": "off",
        "application_name": "mailers-coordinator",
    }


async def connect(config: DatabaseConfig) -> asyncpg.Connection:
    """One connection with the store's settings (TLS per the URL, password file)."""
    return await asyncpg.connect(
        dsn=config.url,
        password=config.password(),
        timeout=config.connect_timeout_s,
        server_settings=_server_settings(config),
    )


@dataclasses.dataclass(frozen=True)
class QuotaRequest:
    """Limits a submit is checked against inside its transaction (0: unlimited)."""

    messages_per_hour: int = 0
    max_active_jobs: int = 0


class QuotaRefused(MailersError):
    """A quota would be exceeded; ``retry_after_s`` is when it may fit (None: never)."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclasses.dataclass(frozen=True)
class InboundRow:
    """A message for the bounce domain, or an unsubscribe, as received."""

    row_id: int
    kind: str
    mail_from: str
    rcpt_to: str
    message: bytes | None


@dataclasses.dataclass(frozen=True)
class Reported:
    """A recipient named by a report or an unsubscribe."""

    job_no: int
    tenant: str
    index: int
    email: str


@dataclasses.dataclass(frozen=True)
class Feedback:
    """What to record about one recipient: its event, its mark, and the suppression."""

    recipient: Reported
    event: EventType
    mark: str
    """recipients.feedback: hard_bounce, soft_bounce, complaint or unsubscribe."""
    suppress: Reason | None = None
    code: int = 0
    enhanced_code: str = ""
    text: str = ""


@dataclasses.dataclass(frozen=True)
class BatchRelease:
    """A node gave a batch back (or lost it); settle it from its recipients' state."""

    job_no: int
    seq: int
    node_id: str
    attempt: int
    lo: int
    hi: int
    lost: bool = False
    """The node vanished holding it (counts towards giving the batch up)."""


@dataclasses.dataclass(frozen=True)
class BatchSettled:
    """How a released batch stands after its results were applied."""

    job_no: int
    seq: int
    done: bool
    retry_at: float | None
    lost: int
    queued: int
    deferred: int


@dataclasses.dataclass(frozen=True)
class ResultRow:
    """One recipient as ``ListJobResults`` shows it."""

    cursor: int
    """Its place in send order (paging goes by it)."""
    index: int
    """Its place in the submitted list (the same unless the job shares messages)."""
    email: str
    result: Result
    metadata: dict[str, str]
    """What the caller attached at submit."""
    feedback: str = ""
    """What came back later (hard_bounce, soft_bounce, complaint, unsubscribe)."""


@dataclasses.dataclass(frozen=True)
class StatusChange:
    """A leader's decision over a range of one job's recipients."""

    job_no: int
    lo: int
    hi: int
    from_statuses: tuple[Status, ...]
    to_status: Status
    reason: str
    batch_size: int
    skip_permanent: bool = False
    """Leave recipients whose last reply was a 5xx (retrying those cannot help)."""


@dataclasses.dataclass(frozen=True)
class JobCounts:
    """A job's counts as a write left them."""

    job_no: int
    delivered: int
    failed: int
    deferred: int
    cancelled: int
    suppressed: int
    duplicates: int
    updated_at: float


@dataclasses.dataclass
class WriteOutcome:
    """What one writer transaction changed."""

    jobs: dict[int, JobCounts] = dataclasses.field(default_factory=dict)
    """Jobs whose counts moved, with their new counts."""
    settled: list[BatchSettled] = dataclasses.field(default_factory=list)
    reopened: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    """Batches (by job) that have recipients to send again."""
    changed: list[int] = dataclasses.field(default_factory=list)
    """Recipients each status change moved, in the order given."""


class Store:
    """Reads, and (with an epoch) fenced writes, of the data plane.

    Args:
        db: The pool and queries.
        epoch: The leader's election revision; None for a store that only reads (a
            write then raises LostLeadership).
    """

    def __init__(self, db: Database, epoch: int | None = None) -> None:
        self._db = db
        self._q = db.queries
        self.epoch = epoch

    # ---- plumbing -------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._db.pool.acquire(timeout=self._db.config.connect_timeout_s) as conn:
                yield conn
        except (LostLeadership, StoreUnavailable, Duplicate, QuotaRefused):
            raise
        except Exception as exc:
            if _fenced(exc):
                raise LostLeadership(str(exc)) from exc
            if _transient(exc):
                raise StoreUnavailable(str(exc) or type(exc).__name__) from exc
            raise

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[asyncpg.Connection]:
        """A transaction that commits only while our fence holds."""
        if self.epoch is None:
            raise LostLeadership("this store does not lead")
        async with self._conn() as conn:
            server_pid = conn.get_server_pid()
            tx = conn.transaction()
            await tx.start()
            try:
                yield conn
                await conn.execute(self._q["check_fence"], self.epoch)
            except BaseException:
                with contextlib.suppress(Exception):
                    await tx.rollback()
                raise
            try:
                await tx.commit()
            except Exception as exc:
                if _fenced(exc):
                    raise
                if _transient(exc):
                    raise CommitUnknown(f"commit outcome unknown: {exc}", server_pid) from exc
                raise

    # ---- leadership -----------------------------------------------------------------

    async def raise_fence(self, leader: str, *, stalled_after_s: float = STALLED_AFTER_S) -> None:
        """Make our epoch the fence: writes of every older leader fail from now on.

        Waits for their transactions in flight to finish first (they hold share locks),
        but not for a deposed leader that stopped or was cut off inside one: its
        sessions stalled for ``stalled_after_s`` are ended (see ``end_stalled_writers``
        in queries.sql), before the raise if they hold the fence and after it if they
        hold rows we will write.

        Raises:
            LostLeadership: a newer epoch already holds the fence.
            StoreUnavailable: the fence stayed locked (tried ``FENCE_RAISE_TRIES`` times).
        """
        assert self.epoch is not None
        async with self._conn() as conn:
            for _ in range(FENCE_RAISE_TRIES):
                try:
                    async with conn.transaction():
                        await conn.execute(self._q["local_lock_timeout"], FENCE_LOCK_WAIT)
                        raised = await conn.fetchrow(self._q["raise_fence"], self.epoch, leader)
                    break
                except asyncpg.exceptions.LockNotAvailableError:
                    await self._end_stalled(conn, None, stalled_after_s)
            else:
                raise StoreUnavailable("the fence stayed locked by a leader's transaction")
            if raised is None:
                current = await conn.fetchrow(self._q["fence_epoch"])
                if current is None or int(current["epoch"]) != self.epoch:
                    raise LostLeadership(
                        f"fence is at epoch {current and current['epoch']}, ours is {self.epoch}"
                    )
                raised = current
            await self._end_stalled(conn, raised["raised_at"], stalled_after_s)

    async def _end_stalled(
        self, conn: asyncpg.Connection, before: datetime | None, stalled_after_s: float
    ) -> None:
        rows = await conn.fetch(self._q["end_stalled_writers"], before, stalled_after_s)
        if rows:
            log.warning(
                "ended %d database sessions of a deposed leader stalled in a transaction "
                "(server pids %s)",
                len(rows), ", ".join(str(r["pid"]) for r in rows),
            )  # fmt: skip

    # ---- submit ---------------------------------------------------------------------

    async def find_by_key(self, tenant: str, key: str) -> JobRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(self._q["job_by_key"], tenant, key)
        return _job(row) if row is not None else None

    async def settle_commit(self, job_id: str, server_pid: int, timeout_s: float) -> bool:
        """Whether a submit whose commit outcome was lost did store the job.

        The server process that ran it is waited for first (a commit in progress when its
        client vanished still finishes), so the answer read afterwards is final.

        Raises:
            CommitUnknown: no definite answer within ``timeout_s``.
        """
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            with contextlib.suppress(StoreUnavailable):
                async with self._conn() as conn:
                    running = await conn.fetchval(self._q["backend_running"], server_pid)
                    if not running:
                        return await conn.fetchval(self._q["job_exists"], job_id) is not None
            if asyncio.get_running_loop().time() > deadline:
                raise CommitUnknown(f"cannot tell whether job {job_id} was stored", server_pid)
            await asyncio.sleep(0.2)

    async def job_exists(self, job_id: str) -> bool:
        async with self._conn() as conn:
            return await conn.fetchval(self._q["job_exists"], job_id) is not None

    async def submit(
        self,
        spec: JobSpec,
        chunks: AsyncIterator[Sequence[Recipient]],
        quota: QuotaRequest,
        now: float,
    ) -> JobRecord:
        """Store a job, all its recipients and its idempotency key in one transaction.

        ``spec.total`` is ignored: the total is what ``chunks`` yields (it may raise
        to abort the job, e.g. on invalid input: then nothing is stored).

        Raises:
            Duplicate: the tenant already has a job with this idempotency key.
            QuotaRefused: the job does not fit the tenant's quotas.
            LostLeadership, StoreUnavailable, CommitUnknown: see the module docstring.
        """
        total = 0
        # A shared message takes recipients of one domain: store such a job in send
        # order, by domain, so that its batches (index ranges) hold few domains.
        by_domain = spec.content.recipients_per_message > 1
        async with self._write() as conn:
            job_no = int(await conn.fetchval(self._q["next_job_no"]))
            table = "recipients"
            if by_domain:
                await conn.execute(self._q["create_upload"])
                table = "upload"
            async for rows in _row_slices(chunks, job_no, COPY_ROWS):
                await conn.copy_records_to_table(table, records=rows, columns=RECIPIENT_COLUMNS)
                total += len(rows)
            if by_domain:
                await conn.execute(self._q["insert_by_domain"])
            spec = dataclasses.replace(spec, total=total)
            inserted = await conn.fetchval(
                self._q["insert_job"], job_no, spec.job_id, spec.tenant, spec.idempotency_key,
                _spec_json(spec), total, spec.batch_size, spec.options.priority, ts(now),
            )  # fmt: skip
            if inserted is None:
                raise Duplicate(spec.idempotency_key)
            await self._charge_quota(conn, spec.tenant, total, quota, now)
        status = JobStatus(state=JobState.QUEUED, counts=Counts(total=total), updated_at=now)
        return JobRecord(job_no=job_no, spec=spec, status=status)

    async def _charge_quota(
        self, conn: asyncpg.Connection, tenant: str, n: int, quota: QuotaRequest, now: float
    ) -> None:
        if not quota.messages_per_hour and not quota.max_active_jobs:
            return
        await conn.execute(self._q["tenant_lock"], tenant)
        if quota.max_active_jobs:
            # Our own job is already inserted (and counted) in this transaction.
            active = int(await conn.fetchval(self._q["active_jobs"], tenant))
            if active > quota.max_active_jobs:
                raise QuotaRefused(
                    f"quota: {quota.max_active_jobs} unfinished jobs already", ACTIVE_JOBS_RETRY_S
                )
        if quota.messages_per_hour:
            minute = ts(now - now % 60)
            since = ts(now - 3600)
            used = int(await conn.fetchval(self._q["quota_used"], tenant, since))
            limit = quota.messages_per_hour
            if used + n > limit:
                rows = await conn.fetch(self._q["quota_oldest"], tenant, since)
                minutes = [(float(r["minute"].timestamp()), int(r["recipients"])) for r in rows]
                raise QuotaRefused(
                    f"quota: {limit} recipients per hour; {used} used in the last hour",
                    window_retry_after(minutes, used + n - limit, now),
                )
            await conn.execute(self._q["quota_add"], tenant, minute, n)
            await conn.execute(self._q["quota_trim"], ts(now - 7200))

    # ---- a new leader's view --------------------------------------------------------

    async def unfinished_jobs(self, page: int = 500) -> AsyncIterator[JobRecord]:
        """Every job not completed or cancelled, oldest first, read in pages."""
        after = ""
        while True:
            async with self._conn() as conn:
                rows = await conn.fetch(self._q["unfinished_jobs"], after, page)
            for row in rows:
                yield _job(row)
            if len(rows) < page:
                return
            after = rows[-1]["job_id"]

    async def open_batches(self, job_no: int, page: int = 10_000) -> AsyncIterator[OpenBatch]:
        """A job's batches that were handed out and are not done, in pages."""
        after = -1
        while True:
            async with self._conn() as conn:
                rows = await conn.fetch(self._q["open_batches"], job_no, after, page)
            for row in rows:
                yield OpenBatch(
                    seq=row["seq"],
                    node_id=row["node_id"],
                    attempt=row["attempt"],
                    lost=row["lost"],
                    retry_at=unix(row["retry_at"]),
                )
            if len(rows) < page:
                return
            after = rows[-1]["seq"]

    # ---- dispatch -------------------------------------------------------------------

    async def pending(
        self, ranges: Sequence[tuple[int, int, int, str]]
    ) -> dict[int, list[PendingRecipient]]:
        """Recipients still to send in each (job_no, lo, hi, tenant) range, by job_no,
        in index order, with suppressions marked. Read in a transaction of its own, for
        ``index_ranges_only``."""
        async with self._conn() as conn, conn.transaction(readonly=True):
            await conn.execute(self._q["index_ranges_only"])
            rows = await conn.fetch(
                self._q["pending_recipients"],
                [r[0] for r in ranges], [r[1] for r in ranges],
                [r[2] for r in ranges], [r[3] for r in ranges],
            )  # fmt: skip
        found: dict[int, list[PendingRecipient]] = {}
        for row in rows:  # per recipient: positional arguments cost less
            variables = json.loads(row["variables"]) if row["variables"] is not None else {}
            recipient = Recipient(row["email"], row["name"], variables)
            found.setdefault(row["job_no"], []).append(
                PendingRecipient(row["idx"], recipient, row["attempts"], row["suppressed"])
            )
        return found

    async def assign(
        self,
        assignments: Sequence[tuple[int, int, str, int]],
        finished: Sequence[tuple[int, int]],
        cursors: dict[int, int],
        now: float,
    ) -> None:
        """Record, fenced, that each (job_no, seq) goes to node_id as dispatch
        ``attempt`` (call before sending them), that the ``finished`` batches have
        nothing left to send, and each job's new cursor."""
        async with self._write() as conn:
            if assignments:
                await conn.execute(self._q["index_ranges_only"])
                await conn.execute(self._q["events_lock"])
                await conn.execute(
                    self._q["assign_batches"],
                    [a[0] for a in assignments],
                    [a[1] for a in assignments],
                    [a[2] for a in assignments],
                    [a[3] for a in assignments],
                    ts(now),
                )
            if finished:
                await conn.execute(
                    self._q["finish_batches"], [f[0] for f in finished], [f[1] for f in finished]
                )
            if cursors:
                await conn.execute(
                    self._q["advance_jobs"], list(cursors), list(cursors.values()), ts(now)
                )

    async def job_by_no(self, job_no: int) -> JobRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(self._q["job_by_no"], job_no)
        return _job(row) if row is not None else None

    # ---- the result writer's transaction --------------------------------------------

    async def write(
        self,
        outcomes: Sequence[RecipientOutcome],
        changes: Sequence[StatusChange],
        suppressed: Sequence[tuple[int, int, str]],
        releases: Sequence[BatchRelease],
        retry_at: Any,
        now: float,
    ) -> WriteOutcome:
        """Apply, in one fenced transaction and in this order: node outcomes (with hard
        bounces added to suppression lists), leader decisions over ranges, suppressions
        found at dispatch, and released batches (settled from their recipients' state:
        ``retry_at(release, deferred)`` gives the time a batch with deferred recipients
        may go again).

        Idempotent: applying the same arguments twice changes nothing the second time
        (so a :class:`CommitUnknown` may simply be retried).
        """
        out = WriteOutcome()
        async with self._write() as conn:
            await conn.execute(self._q["index_ranges_only"])
            await conn.execute(self._q["recipients_lock"])
            await conn.execute(self._q["stage_events"])
            moved = await self._apply_outcomes(conn, outcomes, now) if outcomes else []
            # Only now the lock every event writer takes: applying outcomes, most of a
            # flush, does not keep the dispatcher from recording its accepted events.
            await conn.execute(self._q["events_lock"])
            if outcomes:
                await conn.execute(self._q["flush_staged_events"])
            if moved:
                await self._move_counts(conn, moved, now, out)
            for change in changes:
                await self._change(conn, change, now, out)
            if suppressed:
                await self._suppress(conn, suppressed, now, out)
            if releases:
                out.settled = await self._release(conn, releases, retry_at)
        return out

    async def _apply_outcomes(
        self, conn: asyncpg.Connection, outcomes: Sequence[RecipientOutcome], now: float
    ) -> list[Any]:
        """Apply outcomes to their recipients and stage their events; returns how each
        job's counts move (rows for :meth:`_move_counts`)."""
        return list(await conn.fetch(self._q["apply_results"], *outcome_arguments(outcomes, now)))

    async def _move_counts(
        self, conn: asyncpg.Connection, moved: Sequence[Any], now: float, out: WriteOutcome
    ) -> None:
        rows = await conn.fetch(
            self._q["move_counts"], *([m[c] for m in moved] for c in _MOVED_COLUMNS), ts(now)
        )
        for row in rows:
            out.jobs[row["job_no"]] = _counts(row)

    async def _change(
        self, conn: asyncpg.Connection, c: StatusChange, now: float, out: WriteOutcome
    ) -> None:
        row = await conn.fetchrow(
            self._q["set_status_range"], c.job_no, c.lo, c.hi,
            [STATUS_CODE[s] for s in c.from_statuses], STATUS_CODE[c.to_status], c.reason,
            ts(now), c.skip_permanent, c.batch_size,
        )  # fmt: skip
        out.changed.append(int(row["n"] or 0))
        if row["job_no"] is not None:
            out.jobs[c.job_no] = _counts(row)
            if c.to_status in (Status.QUEUED, Status.DEFERRED):
                seqs = sorted(int(s) for s in row["seqs"])
                await conn.execute(self._q["reopen_batches"], c.job_no, seqs)
                out.reopened.setdefault(c.job_no, []).extend(seqs)

    async def _suppress(
        self,
        conn: asyncpg.Connection,
        suppressed: Sequence[tuple[int, int, str]],
        now: float,
        out: WriteOutcome,
    ) -> None:
        rows = await conn.fetch(
            self._q["suppress_recipients"],
            [s[0] for s in suppressed],
            [s[1] for s in suppressed],
            [s[2] for s in suppressed],
            ts(now),
        )
        for row in rows:
            out.jobs[row["job_no"]] = _counts(row)

    async def _release(
        self, conn: asyncpg.Connection, releases: Sequence[BatchRelease], retry_at: Any
    ) -> list[BatchSettled]:
        # The same release can arrive twice (a hello and a hand-back): settle it once.
        releases = list({(r.job_no, r.seq, r.node_id, r.attempt): r for r in releases}.values())
        ranges = sorted({(r.job_no, r.seq, r.lo, r.hi) for r in releases})
        rows = await conn.fetch(
            self._q["batch_outcomes"],
            [r[0] for r in ranges],
            [r[1] for r in ranges],
            [r[2] for r in ranges],
            [r[3] for r in ranges],
        )
        standing = {(row["job_no"], row["seq"]): (row["queued"], row["deferred"]) for row in rows}
        plans = []
        for r in releases:
            queued, deferred = standing.get((r.job_no, r.seq), (0, 0))
            done = queued == 0 and deferred == 0
            when = retry_at(r, deferred) if deferred and not done else None
            plans.append((r, done, when, queued, deferred))
        settled = await conn.fetch(
            self._q["release_batches"],
            [p[0].job_no for p in plans], [p[0].seq for p in plans],
            [p[0].node_id for p in plans], [p[0].attempt for p in plans],
            [p[1] for p in plans], [ts(p[2]) for p in plans], [p[0].lost for p in plans],
        )  # fmt: skip
        applied = {
            (row["job_no"], row["seq"], row["node_id"], row["attempt"]): row["lost"]
            for row in settled
        }
        return [
            BatchSettled(r.job_no, r.seq, done, when, applied[key], q, d)
            for r, done, when, q, d in plans
            if (key := (r.job_no, r.seq, r.node_id, r.attempt)) in applied
        ]

    # ---- job state ------------------------------------------------------------------

    async def set_job_state(
        self, job_no: int, state: JobState, now: float, finished_at: float | None
    ) -> JobRecord | None:
        async with self._write() as conn:
            row = await conn.fetchrow(
                self._q["set_job_state"], job_no, state.value, ts(now), ts(finished_at)
            )
        return _job(row) if row is not None else None

    # ---- reads ----------------------------------------------------------------------

    async def job(self, job_id: str) -> JobRecord | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(self._q["job_by_id"], job_id)
        return _job(row) if row is not None else None

    async def list_jobs(
        self, tenant: str | None, states: Iterable[JobState], before: str, limit: int
    ) -> list[JobRecord]:
        """Newest first, jobs with ids below ``before`` ("" for the first page); all
        tenants when ``tenant`` is None."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                self._q["list_jobs"], tenant, before, [s.value for s in states], limit
            )
        return [_job(row) for row in rows]

    async def results(
        self, job_no: int, after: int, statuses: Iterable[Status], limit: int
    ) -> list[ResultRow]:
        """A job's recipients in send order, from cursor ``after`` on (-1: the first)."""
        wanted = [STATUS_CODE[s] for s in statuses]
        async with self._conn() as conn:
            if wanted:
                rows = await conn.fetch(
                    self._q["list_results_by_status"], job_no, wanted, after, limit
                )
            else:
                rows = await conn.fetch(self._q["list_results"], job_no, after, limit)
        return [
            ResultRow(
                row["idx"],
                row["position"],
                row["email"],
                _result(row),
                json.loads(row["metadata"]) if row["metadata"] else {},
                row["feedback"] or "",
            )
            for row in rows
        ]

    async def events(
        self,
        tenant: str,
        after: int,
        limit: int,
        job_ids: Sequence[str] = (),
        types: Sequence[EventType] = (),
        through: int | None = None,
    ) -> list[Event]:
        """A tenant's events with ids above ``after`` (and at most ``through``), in id
        order."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                self._q["list_events"], tenant, after, list(job_ids), [int(t) for t in types],
                limit, through,
            )  # fmt: skip
        return [_event(tenant, row) for row in rows]

    async def last_event(self) -> int:
        """The highest event id visible now: every event recorded later is above it."""
        async with self._conn() as conn:
            return int(await conn.fetchval(self._q["last_event"]))

    # ---- what comes back: bounces, complaints, unsubscribes --------------------------

    async def intake(
        self, kind: str, mail_from: str, rcpts: Sequence[str], message: bytes | None, now: float
    ) -> list[int]:
        """Keep what came back, unfenced (any coordinator takes it); returns row ids."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                self._q["insert_inbound"], ts(now), kind, mail_from, list(rcpts), message
            )
        return [int(r["id"]) for r in rows]

    async def pending_inbound(self, limit: int) -> list[InboundRow]:
        async with self._conn() as conn:
            rows = await conn.fetch(self._q["pending_inbound"], limit)
        return [
            InboundRow(r["id"], r["kind"], r["mail_from"], r["rcpt_to"], r["message"]) for r in rows
        ]

    async def inbound(self, limit: int) -> list[dict[str, Any]]:
        """The latest rows that came back, newest first, without their messages."""
        async with self._conn() as conn:
            return [dict(r) for r in await conn.fetch(self._q["inbound_rows"], limit)]

    async def reported_recipient(self, job_id: str, index: int, email: str = "") -> Reported | None:
        """The recipient a report names: by index, or (``email`` given and not the one at
        that index: a shared message) by address within the job."""
        async with self._conn() as conn:
            row = await conn.fetchrow(self._q["reported_recipient"], job_id, index)
            if row is not None and email and row["email"].lower() != email:
                row = await conn.fetchrow(self._q["recipient_by_email"], job_id, email)
        if row is None:
            return None
        return Reported(row["job_no"], row["tenant"], row["idx"], row["email"])

    async def apply_inbound(
        self, row_id: int, outcome: str, detail: str, feedback: Sequence[Feedback], now: float
    ) -> int:
        """Record ``feedback`` and mark the row processed, in one fenced transaction;
        returns the events recorded (0 when the row was processed already)."""
        recorded = 0
        async with self._write() as conn:
            await conn.execute(self._q["recipients_lock"])
            await conn.execute(self._q["events_lock"])
            done = await conn.fetchval(self._q["finish_inbound"], row_id, ts(now), outcome, detail)
            if done is None:
                return 0
            for f in feedback:
                r = f.recipient
                ids = await conn.fetch(
                    self._q["record_feedback"], r.job_no, r.tenant, r.index, r.email,
                    int(f.event), ts(now), f.code, f.enhanced_code, f.text[:1000], f.mark,
                    f.suppress.value if f.suppress is not None else None,
                )  # fmt: skip
                recorded += len(ids)
        return recorded

    # ---- webhooks -------------------------------------------------------------------

    async def create_webhook(self, hook: Webhook, secret: str, limit: int) -> Webhook:
        """Store a new endpoint (its cursor: the last event so far).

        Raises:
            QuotaRefused: the tenant has ``limit`` endpoints already.
        """
        async with self._write() as conn:
            await conn.execute(self._q["tenant_lock"], hook.tenant)
            if int(await conn.fetchval(self._q["count_webhooks"], hook.tenant)) >= limit:
                raise QuotaRefused(f"a tenant may have at most {limit} webhooks", None)
            row = await conn.fetchrow(
                self._q["insert_webhook"], hook.webhook_id, hook.tenant, hook.url, secret,
                [int(t) for t in hook.types], ts(hook.created_at),
            )  # fmt: skip
        return _webhook(row)

    async def webhooks(self, tenant: str | None = None) -> list[Webhook]:
        """A tenant's endpoints; None: every enabled endpoint, with its secret."""
        async with self._conn() as conn:
            if tenant is None:
                return [
                    _webhook(r, secret=True) for r in await conn.fetch(self._q["enabled_webhooks"])
                ]
            return [_webhook(r) for r in await conn.fetch(self._q["list_webhooks"], tenant)]

    async def delete_webhook(self, tenant: str, webhook_id: str) -> bool:
        async with self._write() as conn:
            return await conn.fetchval(self._q["delete_webhook"], tenant, webhook_id) is not None

    async def replay_webhook(self, tenant: str, webhook_id: str, from_event: int) -> Webhook | None:
        async with self._write() as conn:
            row = await conn.fetchrow(self._q["replay_webhook"], tenant, webhook_id, from_event)
        return _webhook(row) if row is not None else None

    async def webhook_pending(self, hook: Webhook, last_event: int) -> bool:
        """Fix the last event of the delivery about to start; False if the endpoint
        moved (a replay, a deletion) since it was read."""
        return await self._webhook_update("webhook_pending", hook, last_event)

    async def webhook_delivered(self, hook: Webhook, last_event: int) -> bool:
        return await self._webhook_update("webhook_delivered", hook, last_event)

    async def webhook_failed(self, hook: Webhook, f: WebhookFailure) -> bool:
        return await self._webhook_update(
            "webhook_failed", hook, f.attempts, ts(f.failing_since), ts(f.next_attempt_at),
            ts(f.disabled_at), f.error,
        )  # fmt: skip

    async def _webhook_update(self, query: str, hook: Webhook, *args: Any) -> bool:
        async with self._write() as conn:
            done = await conn.fetchval(self._q[query], hook.webhook_id, hook.cursor, *args)
        return done is not None

    async def suppressions(self, tenant: str, after: str, limit: int) -> list[Suppression]:
        async with self._conn() as conn:
            rows = await conn.fetch(self._q["list_suppressions"], tenant, after, limit)
        return [_suppression(row) for row in rows]

    async def put_suppression(self, tenant: str, s: Suppression) -> Suppression:
        async with self._write() as conn:
            row = await conn.fetchrow(
                self._q["put_suppression"], tenant, s.email, s.reason.value,
                ts(s.created_at), s.code, s.enhanced_code, s.text,
            )  # fmt: skip
        return _suppression(row)

    async def delete_suppression(self, tenant: str, email: str) -> bool:
        async with self._write() as conn:
            return await conn.fetchval(self._q["delete_suppression"], tenant, email) is not None

    # ---- retention ------------------------------------------------------------------

    async def jobs_to_purge(self, finished_before: float, limit: int) -> list[tuple[int, int]]:
        """(job_no, total) of finished jobs whose recipients are due to go."""
        async with self._conn() as conn:
            rows = await conn.fetch(self._q["jobs_to_purge"], ts(finished_before), limit)
        return [(row["job_no"], row["total"]) for row in rows]

    async def purge_slice(self, job_no: int, lo: int, hi: int) -> None:
        """Delete one slice of a finished job's recipients and their events (its own
        transaction)."""
        async with self._write() as conn:
            await conn.execute(self._q["purge_recipients"], job_no, lo, hi)
            await conn.execute(self._q["purge_events"], job_no, lo, hi)

    async def purge_inbound(self, processed_before: float) -> int:
        """Drop what came back and was applied before then; returns how many rows."""
        async with self._write() as conn:
            status = await conn.execute(self._q["purge_inbound"], ts(processed_before))
        return int(status.rpartition(" ")[2] or 0)

    async def mark_purged(self, job_no: int, now: float) -> None:
        async with self._write() as conn:
            await conn.execute(self._q["purge_batches"], job_no)
            await conn.execute(self._q["mark_purged"], job_no, ts(now))

    # ---- sizes (benchmarks, status) -------------------------------------------------

    async def sizes(self) -> dict[str, int]:
        """Bytes on disk per table (indexes and TOAST included), and ``database``."""
        async with self._conn() as conn:
            rows = await conn.fetch(self._q["relation_sizes"])
            total = await conn.fetchval(self._q["database_size"])
        sizes = {row["relname"]: int(row["bytes"]) for row in rows}
        sizes["database"] = int(total)
        return sizes


def outcome_arguments(outcomes: Iterable[RecipientOutcome], now: float) -> list[Any]:
    """The arguments of ``apply_results``: each result once, as a row of
    ``mailers_result`` (the recipients of a shared message share one result object);
    the recipients' indexes, grouped by result; where each result's recipients end in
    that list; then the time."""
    results: list[tuple[Any, ...]] = []
    ends: list[int] = []
    indexes: list[int] = []
    last: RecipientOutcome | None = None
    for o in _dedupe(outcomes):
        if (
            last is None
            or o.result is not last.result
            or o.job_id != last.job_id
            or o.hard_bounce != last.hard_bounce
        ):
            last, r = o, o.result
            results.append((
                o.job_id, STATUS_CODE[r.status], min(r.attempts, 32_767), r.code,
                r.enhanced_code or None, r.text or None, r.reason or None, r.node_id or None,
                r.ambiguous, ts(r.updated_at or now), r.message_id or None, r.relay or None,
                o.hard_bounce,
            ))  # fmt: skip
            ends.append(len(indexes))
        indexes.append(o.index)
        ends[-1] += 1
    return [results, indexes, ends, ts(now)]


def _dedupe(outcomes: Iterable[RecipientOutcome]) -> list[RecipientOutcome]:
    """One outcome per recipient: a delivery wins, then the latest attempt, then the
    latest report (a statement may update a row only once)."""
    best: dict[tuple[str, int], RecipientOutcome] = {}
    for o in outcomes:
        key = (o.job_id, o.index)
        kept = best.get(key)
        if kept is None or _rank(o.result) >= _rank(kept.result):
            best[key] = o
    return list(best.values())


def _rank(r: Result) -> tuple[bool, int, bool]:
    return (r.status is Status.DELIVERED, r.attempts, r.status.final)


def _spec_json(spec: JobSpec) -> str:
    return dump_spec(spec).decode()


def _job(row: Any) -> JobRecord:
    spec = load_spec(row["spec"].encode())
    spec = dataclasses.replace(spec, total=row["total"], batch_size=row["batch_size"])
    counts = Counts(
        total=row["total"],
        delivered=row["delivered"],
        failed=row["failed"],
        deferred=row["deferred"],
        cancelled=row["cancelled"],
        suppressed=row["suppressed"],
    )
    status = JobStatus(
        state=JobState(row["state"]),
        counts=counts,
        updated_at=unix(row["updated_at"]) or 0.0,
        finished_at=unix(row["finished_at"]),
    )
    return JobRecord(
        job_no=row["job_no"],
        spec=spec,
        status=status,
        cursor=row["cursor"],
        duplicates=row["duplicates"],
    )


def _counts(row: Any) -> JobCounts:
    return JobCounts(
        job_no=row["job_no"],
        delivered=row["delivered"],
        failed=row["failed"],
        deferred=row["deferred"],
        cancelled=row["cancelled"],
        suppressed=row["suppressed"],
        duplicates=row["duplicates"],
        updated_at=unix(row["updated_at"]) or 0.0,
    )


def _result(row: Any) -> Result:
    return Result(
        status=STATUS_OF[row["status"]],
        code=row["code"],
        enhanced_code=row["enhanced_code"] or "",
        text=row["reply"] or "",
        reason=row["reason"] or "",
        attempts=row["attempts"],
        node_id=row["node_id"] or "",
        ambiguous=row["ambiguous"],
        updated_at=unix(row["updated_at"]) or 0.0,
        message_id=row["message_id"] or "",
        relay=row["relay"] or "",
    )


def _event(tenant: str, row: Any) -> Event:
    return Event(
        event_id=row["id"],
        type=EventType(row["type"]),
        at=unix(row["at"]) or 0.0,
        tenant=tenant,
        job_id=row["job_id"],
        index=row["position"],
        email=row["email"] or "",
        attempt=row["attempt"],
        code=row["code"],
        enhanced_code=row["enhanced_code"] or "",
        text=row["reply"] or "",
        reason=row["reason"] or "",
        node_id=row["node_id"] or "",
        relay=row["relay"] or "",
        message_id=row["message_id"] or "",
        next_attempt_at=unix(row["next_attempt_at"]),
        metadata=json.loads(row["metadata"]) if row["metadata"] else {},
        tags=tuple(json.loads(row["tags"])) if row["tags"] else (),
    )


def _webhook(row: Any, secret: bool = False) -> Webhook:
    return Webhook(
        webhook_id=row["webhook_id"],
        tenant=row["tenant"],
        url=row["url"],
        types=tuple(EventType(t) for t in row["types"]),
        created_at=unix(row["created_at"]) or 0.0,
        cursor=row["cursor"],
        pending_last=row["pending_last"],
        attempts=row["attempts"],
        failing_since=unix(row["failing_since"]),
        next_attempt_at=unix(row["next_attempt_at"]),
        disabled_at=unix(row["disabled_at"]),
        last_error=row["last_error"],
        secret=row["secret"] if secret else "",
    )


def _suppression(row: Any) -> Suppression:
    return Suppression(
        email=row["email"],
        reason=Reason(row["reason"]),
        created_at=unix(row["created_at"]) or 0.0,
        code=row["code"],
        enhanced_code=row["enhanced_code"],
        text=row["reply"],
    )


RECIPIENT_COLUMNS = ("job_no", "idx", "email", "name", "variables", "metadata")


def json_object(strings: Mapping[str, str]) -> str:
    """``json.dumps(dict(strings))`` for a map of strings to strings (a recipient's
    variables or metadata), written directly: about a third of its cost, and the
    submit path writes one or two per recipient."""
    quote = encode_basestring_ascii  # the quoting json.dumps itself uses
    return "{" + ", ".join([f"{quote(k)}: {quote(v)}" for k, v in strings.items()]) + "}"


async def _row_slices(
    chunks: AsyncIterator[Sequence[Recipient]], job_no: int, size: int
) -> AsyncIterator[list[tuple[Any, ...]]]:
    """The recipients as COPY rows, ``size`` at a time (the last slice may be shorter)."""
    rows: list[tuple[Any, ...]] = []
    index = 0
    async for chunk in chunks:
        for r in chunk:
            variables = json_object(r.variables) if r.variables else None
            metadata = json_object(r.metadata) if r.metadata else None
            rows.append((job_no, index, r.email, r.name, variables, metadata))
            index += 1
            if len(rows) == size:
                yield rows
                rows = []
    if rows:
        yield rows
