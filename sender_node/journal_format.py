"""The on-disk format of the result journal, and its retention rule. Pure.

A journal is a directory of *segments*, files named after the sequence number of
their first record (``00000000000000000042.seg``), plus an ``acked`` file. A segment
is a run of records, each framed as::

    u32 body length | u32 CRC-32 of the body | body
    body = u64 seq | u32 results | u16 key length | key (UTF-8) | payload

all little-endian. ``seq`` is node-wide and increasing; ``results`` is how many
recipient results the payload holds (the capacity bound counts them without parsing
it); ``key`` groups the records of one batch attempt; the payload is opaque here (a
serialized ``BatchResults``).

Reading stops at the first frame that is incomplete or fails its CRC: that is a torn
tail (the process died in the middle of a write) or damage; nothing after it can be
framed again, so it is dropped.

``acked`` holds the highest sequence number a leader acknowledged (u64 + CRC-32).
Records at or below it are forgotten; a segment whose records all are is deleted
(:func:`retired`). Losing the file only makes a restarted node replay results a
leader already has, which leaders apply idempotently.
"""

from __future__ import annotations

import dataclasses
import re
import struct
import zlib
from collections.abc import Iterable
from typing import NamedTuple

_FRAME = struct.Struct("<II")
_HEAD = struct.Struct("<QIH")
_MARK = struct.Struct("<QI")
_SEGMENT = re.compile(r"\A(\d{20})\.seg\Z")

MAX_BODY_BYTES = 64 * 1024 * 1024
"""A frame claiming a longer body is damage, not a record."""

ACKED_FILE = "acked"
LOCK_FILE = "lock"


class Record(NamedTuple):
    """One journal record (a named tuple: one is made per transaction's results)."""

    seq: int
    results: int
    key: str
    payload: bytes


def encode(record: Record) -> bytes:
    """The framed bytes of ``record``.

    Raises:
        ValueError: a field does not fit its width.
    """
    key = record.key.encode()
    if len(key) > 0xFFFF:
        raise ValueError("journal key longer than 65535 bytes")
    if not 0 <= record.seq < 2**64 or not 0 <= record.results < 2**32:
        raise ValueError("seq or results out of range")
    body = _HEAD.pack(record.seq, record.results, len(key)) + key + record.payload
    if len(body) > MAX_BODY_BYTES:
        raise ValueError(f"journal record of {len(body)} bytes is too large")
    return _FRAME.pack(len(body), zlib.crc32(body)) + body


@dataclasses.dataclass(frozen=True)
class Scan:
    """What :func:`scan` read from a segment's bytes."""

    records: list[Record]
    valid_bytes: int
    """Length of the intact prefix: the records end there."""

    def damaged(self, total_bytes: int) -> bool:
        """Whether bytes after the intact prefix were dropped (a torn tail)."""
        return self.valid_bytes < total_bytes


def scan(data: bytes) -> Scan:
    """Every intact record at the start of ``data``, up to the first bad frame."""
    records: list[Record] = []
    offset = 0
    view = memoryview(data)
    while offset + _FRAME.size <= len(data):
        length, crc = _FRAME.unpack_from(data, offset)
        start = offset + _FRAME.size
        end = start + length
        if length < _HEAD.size or length > MAX_BODY_BYTES or end > len(data):
            break
        body = view[start:end]
        if zlib.crc32(body) != crc:
            break
        seq, results, key_len = _HEAD.unpack_from(body)
        key_end = _HEAD.size + key_len
        if key_end > length:
            break
        try:
            key = bytes(body[_HEAD.size : key_end]).decode()
        except UnicodeDecodeError:
            break
        records.append(Record(seq, results, key, bytes(body[key_end:])))
        offset = end
    return Scan(records, offset)


def segment_name(first_seq: int) -> str:
    """The file name of a segment starting at ``first_seq``."""
    return f"{first_seq:020d}.seg"


def segment_first_seq(name: str) -> int | None:
    """The first seq a segment file name stands for; None for any other file."""
    match = _SEGMENT.match(name)
    return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class Span:
    """The sequence numbers a segment holds; ``last_seq`` 0 when it holds none."""

    first_seq: int
    last_seq: int


def retired(spans: Iterable[Span], acked_through: int) -> list[Span]:
    """Segments whose every record is acknowledged (empty ones too): delete them.

    The caller decides about the segment it is appending to (it closes it first).
    """
    return [s for s in spans if s.last_seq <= acked_through]


def encode_mark(acked_through: int) -> bytes:
    """The content of the ``acked`` file."""
    head = struct.pack("<Q", acked_through)
    return _MARK.pack(acked_through, zlib.crc32(head))


def decode_mark(data: bytes) -> int:
    """The acknowledged seq an ``acked`` file holds; 0 when it is missing or damaged."""
    if len(data) != _MARK.size:
        return 0
    through, crc = _MARK.unpack(data)
    return int(through) if zlib.crc32(struct.pack("<Q", through)) == crc else 0


def next_seq(found: Iterable[int], acked_through: int) -> int:
    """The seq after every one found on disk and the acknowledged mark.

    A node whose segments were all deleted still continues after its mark, so a
    sequence number is never reused while the state directory lives.
    """
    return max([acked_through, *found]) + 1
