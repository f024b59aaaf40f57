"""Splitting a job's recipients into batches. Pure.

A batch is identified by (job_id, seq); recipient i of a job is in batch
i // batch_size, so any recipient's batch is known without an index. Recipients are
numbered in send order: submitted order, or by domain for a job sharing its messages
(``Store.submit``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive lists of at most size items, in order; never an empty list."""
    if size < 1:
        raise ValueError("size must be at least 1")
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


SHARED_BATCHES_PER_MESSAGE = 5
"""A job sharing its messages gets batches of at least this many full messages: the
recipients of a domain rarely start at a batch's edge, and one batch should still fill
messages. bench/e2e.py, 200,000 recipients 100 per message: 15,643 recipients/s with 2,
17,307-17,558 with 5, 16,505 with 10."""


def job_batch_size(batch_size: int, recipients_per_message: int) -> int:
    """The batch size of a job: the configured one, raised for a job whose recipients
    share messages so that each batch fills several (capped at 1,000, the configured
    size's own bound)."""
    if recipients_per_message <= 1:
        return batch_size
    return max(batch_size, min(SHARED_BATCHES_PER_MESSAGE * recipients_per_message, 1000))


def batch_of(index: int, batch_size: int) -> int:
    """The batch seq holding recipient index."""
    return index // batch_size


def batch_range(seq: int, batch_size: int, total: int) -> range:
    """The recipient indexes of batch seq."""
    start = seq * batch_size
    return range(start, min(start + batch_size, total))


def batch_id(job_id: str, seq: int) -> str:
    return f"{job_id}/{seq}"


def parse_batch_id(value: str) -> tuple[str, int]:
    """Inverse of batch_id.

    Raises:
        ValueError: value is not of the form job_id/seq.
    """
    job_id, sep, seq = value.rpartition("/")
    if not sep or not job_id or not seq.isdigit():
        raise ValueError(f"bad batch id {value!r}")
    return job_id, int(seq)
