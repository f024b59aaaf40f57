"""The node's result journal: every result on local disk before any leader hears of it.

Why: a result is the only record that a relay took a message. If it lived only in
memory, a node killed after a relay's ``250`` would leave the leader believing the
recipient was never attempted, and it would be sent again. So every result is written
here first, and leaves the node only once it is on disk (see ``outbox.py``).

How (format and retention in ``journal_format.py``):

- :meth:`Journal.append` writes a record with ``os.write`` synchronously, on the event
  loop, and returns: the caller appends right after reading the SMTP reply and before
  the connection can carry another transaction, so a node killed after the relay's
  reply either has the record in the page cache or never spoke on that connection
  again. Records get a node-wide increasing ``seq``.
- A background task owned by the journal (:meth:`start`, :meth:`close`) ``fsync``\\ s
  the segments written to (and the directory after a new segment) in a worker thread,
  at most once per ``sync_interval_s`` while there is something to sync (group
  commit). After each fsync the *durable* mark advances and the listeners hear of it
  (:meth:`on_durable`); nothing below the mark can be lost by a crash.
- :meth:`ack` forgets records a leader has stored. The same task then writes the
  ``acked`` mark and deletes segments whose records are all acknowledged (the mark is
  fsynced first, so a restarted node never reuses a sequence number).
- :meth:`open` reads what an earlier process left: it drops a torn tail record,
  continues the sequence after the highest seq found, and treats every record above
  the mark as unacknowledged. A lock file keeps a second process out.

Disk errors: the journal cannot keep its promise any more. It logs once, stops
writing, keeps the records in memory and lets them count as durable (holding them
back would only keep them from a leader); :attr:`failed` says why, and the node
refuses new work from then on (see ``servicer.py``).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import fcntl
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from mailers_runtime.errors import PermanentError
from sender_node.journal_format import (
    ACKED_FILE,
    LOCK_FILE,
    Record,
    Span,
    decode_mark,
    encode,
    encode_mark,
    next_seq,
    retired,
    scan,
    segment_first_seq,
    segment_name,
)

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_BYTES = 4 * 1024 * 1024
DEFAULT_SYNC_INTERVAL_S = 0.02


class JournalError(PermanentError):
    """The journal cannot be opened or used (its directory, its lock)."""


@dataclasses.dataclass(eq=False)
class _Segment:
    first_seq: int
    path: Path
    last_seq: int = 0
    size: int = 0
    fd: int | None = None
    synced: bool = True


@dataclasses.dataclass(frozen=True)
class _Recovered:
    segments: list[_Segment]
    records: list[Record]
    next_seq: int
    mark: int


class Journal:
    """An append-only, fsync-batched log of result records in one directory.

    Build it with :meth:`open`. Not thread-safe: every method runs on the event loop;
    only the blocking fsync, mark and delete calls go to worker threads.

    Args:
        directory: The state directory (created if missing).
        segment_bytes: A segment is closed once it reaches this size.
        sync_interval_s: Group-commit period of the fsync task.
        sleep: Waits between fsyncs (injected in tests).
    """

    def __init__(
        self,
        directory: Path,
        lock_fd: int,
        recovered: _Recovered,
        *,
        segment_bytes: int,
        sync_interval_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._dir = directory
        self._lock_fd = lock_fd
        self._segments = recovered.segments
        self._active: _Segment | None = None
        self._records = recovered.records
        self._head = 0
        self._unacked_results = sum(r.results for r in recovered.records)
        self._next = recovered.next_seq
        self._last = recovered.next_seq - 1
        self._durable = self._last
        self._acked = recovered.mark
        self._mark_written = recovered.mark
        self._segment_bytes = segment_bytes
        self._sync_interval_s = sync_interval_s
        self._sleep = sleep
        self._dir_dirty = False
        self._wake = asyncio.Event()
        self._listeners: list[Callable[[int], None]] = []
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.failed: str | None = None
        """Why the journal stopped writing to disk; None while it works."""

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: Path,
        *,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        sync_interval_s: float = DEFAULT_SYNC_INTERVAL_S,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> Journal:
        """Open (or create) the journal in ``directory`` and read what is there.

        Blocking file I/O: call it at startup, before the node serves.

        Raises:
            JournalError: the directory cannot be created or read, or another process
                holds its lock.
        """
        if segment_bytes < 1 or sync_interval_s < 0:
            raise ValueError("segment_bytes must be positive, sync_interval_s not negative")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            lock_fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot use state directory {directory}: {exc}") from exc
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(lock_fd)
            raise JournalError(
                f"state directory {directory} is in use by another node process"
            ) from exc
        try:
            recovered = _recover(directory)
        except OSError as exc:
            os.close(lock_fd)
            raise JournalError(f"cannot read the journal in {directory}: {exc}") from exc
        log.info(
            "journal %s: %d unacknowledged records, next seq %d",
            directory,
            len(recovered.records),
            recovered.next_seq,
        )
        return cls(
            directory,
            lock_fd,
            recovered,
            segment_bytes=segment_bytes,
            sync_interval_s=sync_interval_s,
            sleep=sleep,
        )

    # -- state -----------------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def last_seq(self) -> int:
        """The seq of the newest record (0 before the first)."""
        return self._last

    @property
    def durable_seq(self) -> int:
        """Every record up to this seq is on disk (fsynced)."""
        return self._durable

    @property
    def acked_through(self) -> int:
        """Records up to this seq are acknowledged and forgotten."""
        return self._acked

    @property
    def unacked_results(self) -> int:
        """Results (not records) held for lack of an acknowledgement."""
        return self._unacked_results

    def unacked(self) -> Sequence[Record]:
        """Every unacknowledged record, oldest first (durable or not)."""
        return self._records[self._head :]

    def between(self, after_seq: int, through_seq: int) -> Sequence[Record]:
        """Unacknowledged records with ``after_seq < seq <= through_seq``, oldest first."""
        start = bisect.bisect_right(self._records, after_seq, lo=self._head, key=_seq)
        end = bisect.bisect_right(self._records, through_seq, lo=start, key=_seq)
        return self._records[start:end]

    def on_durable(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(durable_seq)`` on the event loop each time the mark advances."""
        self._listeners.append(listener)

    # -- writing ---------------------------------------------------------------------

    def append(self, results: int, key: str, payload_for: Callable[[int], bytes]) -> Record:
        """Write one record now (``os.write``, no await) and return it.

        Args:
            results: Recipient results the payload holds.
            key: Groups the records of one batch attempt.
            payload_for: Makes the payload for the seq given (it embeds the seq).

        Raises:
            JournalError: the journal is closed.
        """
        if self._closing:
            raise JournalError("the journal is closed")
        seq = self._next
        record = Record(seq, results, key, payload_for(seq))
        frame = encode(record)
        self._next += 1
        if self.failed is None:
            try:
                self._write(frame, seq)
            except OSError as exc:
                self._fail(exc)
        self._records.append(record)
        self._unacked_results += results
        self._last = seq
        self._wake.set()
        return record

    def ack(self, through_seq: int) -> int:
        """Forget the records up to ``through_seq`` (at most the durable mark); the
        segments they empty are deleted in the background. Idempotent.

        Returns:
            How many records were forgotten.
        """
        through = min(through_seq, self._durable)
        if through <= self._acked:
            return 0
        self._acked = through
        dropped = 0
        while self._head < len(self._records) and self._records[self._head].seq <= through:
            self._unacked_results -= self._records[self._head].results
            self._head += 1
            dropped += 1
        if self._head > 1024 and self._head * 2 > len(self._records):
            del self._records[: self._head]
            self._head = 0
        self._wake.set()
        return dropped

    async def wait_durable(self, seq: int) -> None:
        """Wait until every record up to ``seq`` is on disk. The caller bounds it."""
        if seq <= self._durable:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((seq, waiter))
        self._wake.set()
        await waiter

    def _write(self, frame: bytes, seq: int) -> None:
        segment = self._active
        if segment is None or segment.size >= self._segment_bytes:
            segment = self._new_segment(seq)
        assert segment.fd is not None
        view = memoryview(frame)
        while view:
            written = os.write(segment.fd, view)
            view = view[written:]
        segment.size += len(frame)
        segment.last_seq = seq
        segment.synced = False

    def _new_segment(self, first_seq: int) -> _Segment:
        # The one being filled stays open until the fsync task has synced it.
        path = self._dir / segment_name(first_seq)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        segment = _Segment(first_seq, path, fd=os.open(path, flags, 0o600), synced=False)
        self._segments.append(segment)
        self._active = segment
        self._dir_dirty = True
        return segment

    def _fail(self, exc: OSError) -> None:
        if self.failed is None:
            self.failed = f"{type(exc).__name__}: {exc}"
            log.critical(
                "journal %s failed (%s): results are kept in memory only from now on",
                self._dir,
                self.failed,
            )

    # -- the fsync task --------------------------------------------------------------

    def start(self) -> None:
        """Start the fsync task (owned by the journal; :meth:`close` ends it)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"journal-{self._dir.name}")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Sync what was written, stop the task, close files and release the lock.

        Waits up to ``timeout_s`` for the last fsync; after that the task is cancelled
        and the files are left to the process exit. Idempotent.
        """
        if self._closing:
            return
        self._closing = True
        task, self._task = self._task, None
        self._wake.set()
        if task is not None:
            try:
                async with asyncio.timeout(timeout_s):
                    await asyncio.gather(asyncio.shield(task), return_exceptions=True)
            except TimeoutError:
                log.error("journal %s: the last fsync did not finish in %gs", self._dir, timeout_s)
                task.cancel()
                return
        else:
            await self._sync_once()
        for segment in self._segments:
            if segment.fd is not None:
                os.close(segment.fd)
                segment.fd = None
        os.close(self._lock_fd)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._sync_once()
            except Exception as exc:
                # Never let the task die silently: nothing would ever become durable.
                log.exception("journal %s: the fsync task failed", self._dir)
                self._fail(OSError(str(exc)))
                self._wake.set()
            if self._closing:
                return
            # Group commit: appends during this pause share the next fsync.
            await self._sleep(self._sync_interval_s)

    async def _sync_once(self) -> None:
        target = self._last
        if target > self._durable:
            if self.failed is None:
                await self._fsync(target)
            self._durable = target
            self._notify(target)
        if self._acked > self._mark_written and self.failed is None:
            await self._retire(self._acked)

    async def _fsync(self, target: int) -> None:
        pending = [s for s in self._segments if not s.synced and s.fd is not None]
        fds = [s.fd for s in pending if s.fd is not None]
        sync_dir = self._dir_dirty
        self._dir_dirty = False
        try:
            await asyncio.to_thread(_fsync_all, fds, self._dir if sync_dir else None)
        except OSError as exc:
            self._fail(exc)
            return
        for segment in pending:
            if segment.last_seq <= target:
                segment.synced = True
                if segment is not self._active and segment.fd is not None:
                    os.close(segment.fd)
                    segment.fd = None

    async def _retire(self, through: int) -> None:
        spans = {s.first_seq: s for s in self._segments}
        victims = [spans[span.first_seq] for span in retired(_spans(self._segments), through)]
        for victim in victims:
            if victim is self._active:
                self._active = None  # the next append opens a new segment
            if victim.fd is not None:
                os.close(victim.fd)
                victim.fd = None
            self._segments.remove(victim)
        try:
            await asyncio.to_thread(_persist_mark, self._dir, through, [v.path for v in victims])
        except OSError as exc:
            # Not fatal: a restarted node replays what it cannot tell was acknowledged.
            log.warning("journal %s: cannot record acknowledgements: %s", self._dir, exc)
        self._mark_written = through

    def _notify(self, durable: int) -> None:
        for listener in list(self._listeners):
            try:
                listener(durable)
            except Exception:
                log.exception("journal listener failed")
        still = []
        for seq, waiter in self._waiters:
            if seq <= durable:
                if not waiter.done():
                    waiter.set_result(None)
            else:
                still.append((seq, waiter))
        self._waiters = still


def _seq(record: Record) -> int:
    return record.seq


def _spans(segments: Sequence[_Segment]) -> list[Span]:
    return [Span(s.first_seq, s.last_seq) for s in segments]


def _fsync_all(fds: Sequence[int], directory: Path | None) -> None:
    for fd in fds:
        os.fsync(fd)
    if directory is not None:
        _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _persist_mark(directory: Path, through: int, deletions: Sequence[Path]) -> None:
    """Write the ``acked`` mark, then delete segments. The mark is fsynced only when
    segments go: then it is what keeps the sequence from restarting."""
    durable = bool(deletions)
    tmp = directory / (ACKED_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, encode_mark(through))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / ACKED_FILE)
    if durable:
        _fsync_dir(directory)
    for path in deletions:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _recover(directory: Path) -> _Recovered:
    """Read the mark and every segment; truncate torn tails; delete acknowledged
    segments."""
    mark_path = directory / ACKED_FILE
    mark = decode_mark(mark_path.read_bytes()) if mark_path.exists() else 0
    named = []
    for entry in os.listdir(directory):
        first = segment_first_seq(entry)
        if first is not None:
            named.append((first, directory / entry))
    found: list[int] = []
    segments: list[_Segment] = []
    records: list[Record] = []
    for index, (first, path) in enumerate(sorted(named)):
        data = path.read_bytes()
        result = scan(data)
        if result.damaged(len(data)):
            last = index == len(named) - 1
            (log.warning if last else log.error)(
                "journal %s: dropped %d unreadable bytes at the end (%s)",
                path,
                len(data) - result.valid_bytes,
                "a torn tail" if last else "damage",
            )
            os.truncate(path, result.valid_bytes)
        found.extend(r.seq for r in result.records)
        kept = [r for r in result.records if r.seq > mark]
        if not kept:
            path.unlink()
            continue
        segments.append(_Segment(first, path, result.records[-1].seq, result.valid_bytes))
        records.extend(kept)
    return _Recovered(segments, records, next_seq(found, mark), mark)
