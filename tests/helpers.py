"""Shared test helpers: waiting for conditions instead of sleeping."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import NoReturn

import pytest

from client_sdk import MailerClient, MailerError, NodeState
from mailers_dev.procs import pg_bin_dir


def unavailable(reason: str, on_ci: str) -> NoReturn:
    """Something a test needs is missing: skip with ``reason`` on a developer's machine;
    fail with ``on_ci`` on CI (``CI`` set), where the README's test command installs
    everything, so a missing piece is a broken install, not a reason to skip."""
    if os.environ.get("CI"):
        pytest.fail(on_ci)
    pytest.skip(reason)


def require_etcd() -> None:
    if shutil.which("etcd") is None:
        unavailable(
            "etcd is not installed (apt-get install etcd-server)",
            "etcd is not installed on this CI machine",
        )


def require_postgres() -> None:
    if pg_bin_dir() is None:
        unavailable(
            "PostgreSQL is not installed (apt-get install postgresql)",
            "PostgreSQL is not installed on this CI machine",
        )


async def assert_eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout_s: float = 30.0,
    interval_s: float = 0.05,
    message: str = "condition",
) -> None:
    """Poll check until it returns true; fail with message after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout_s}s")
        await asyncio.sleep(interval_s)


def wait_until(
    check: Callable[[], bool], timeout_s: float = 30.0, message: str = "condition"
) -> None:
    """Blocking twin of assert_eventually for synchronous tests."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout_s}s")
        time.sleep(0.05)


async def assert_stays(
    check: Callable[[], bool], for_s: float, interval_s: float = 0.05, message: str = "condition"
) -> None:
    """Poll check for for_s seconds; fail as soon as it is false (something that must
    not happen, e.g. mail after a pause, did)."""
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        if not check():
            raise AssertionError(f"{message} stopped holding")
        await asyncio.sleep(interval_s)


async def wait_nodes_active(client: MailerClient, count: int, timeout_s: float = 60) -> None:
    """Wait until the leader has an open stream to at least count active nodes."""

    async def ready() -> bool:
        try:
            nodes = await client.list_nodes(timeout=timedelta(seconds=3))
        except MailerError:
            return False
        return sum(1 for n in nodes if n.state is NodeState.ACTIVE) >= count

    await assert_eventually(ready, timeout_s=timeout_s, message=f"{count} nodes active")


async def wait_new_leader(client: MailerClient, old_address: str, timeout_s: float = 30) -> float:
    """Wait until a coordinator other than old_address leads; returns the seconds waited."""
    started = time.monotonic()

    async def new_leader() -> bool:
        try:
            status = await client.cluster_status(timeout=timedelta(seconds=2))
        except MailerError:
            return False
        return status.leader is not None and status.leader.address != old_address

    await assert_eventually(new_leader, timeout_s=timeout_s, message="a standby leads")
    return time.monotonic() - started
