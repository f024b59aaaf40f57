"""Leader election on etcd, after etcd's concurrency.Election recipe.

Each coordinator puts a key under ``election/`` bound to its own lease. The key with
the lowest create revision leads; its create revision is the leader's epoch and the
fence for every write it makes. A candidate that is not first waits for a change under
the prefix (a watch, or a poll at most every ``poll_s`` seconds if the watch fails) and
looks again. Losing the lease is losing leadership: ``session.done`` fires.

The lease is a ``mailers_runtime.etcd.Session``, the same one a sender node registers
under. Every etcd call here has the session's call deadline (``call_timeout_s``); a
watch that ends (etcd restarted, a member died) is not an event but a prompt to look
again after ``poll_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import aetcd

from mailers_runtime.errors import TransientError
from mailers_runtime.etcd import Item, Keys, Session, describe_error, first_created, read_prefix

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Fence:
    """The leader's election key and the create revision it won with (its epoch)."""

    key: bytes
    revision: int


@dataclasses.dataclass(frozen=True)
class Candidate:
    coordinator_id: str
    address: str
    epoch: int
    """Create revision of the candidate's election key."""


class Election:
    """One campaign under one lease. Build a new one after the session ends."""

    def __init__(
        self,
        client: aetcd.Client,
        keys: Keys,
        session: Session,
        coordinator_id: str,
        address: str,
        poll_s: float = 1.0,
    ) -> None:
        self._client = client
        self._keys = keys
        self._session = session
        self._id = coordinator_id
        self._address = address
        self._poll_s = poll_s
        self.key = keys.election_key(session.lease_id)
        self.revision = 0

    async def enter(self) -> None:
        """Put our key (once per lease) and remember its create revision.

        Raises:
            aetcd.ClientError: etcd failed the write or the read.
            TimeoutError: a call took longer than the session's ``call_timeout_s``.
        """
        value = json.dumps({"id": self._id, "address": self._address}).encode()
        tx = self._client.transactions
        async with asyncio.timeout(self._session.call_timeout_s):
            await self._client.transaction(
                compare=[tx.create(self.key) == 0],
                success=[tx.put(self.key, value, lease=self._session.lease)],
                failure=[],
            )
        async with asyncio.timeout(self._session.call_timeout_s):
            kv = await self._client.get(self.key)
        if kv is None:
            raise aetcd.ClientError("election key vanished right after it was written")
        self.revision = kv.create_revision

    async def candidates(self) -> list[Candidate]:
        """Every candidate, leader first (a paged read)."""
        items, _ = await read_prefix(self._client, self._keys.election)
        result = []
        for item in sorted(items, key=lambda i: i.create_revision):
            info = json.loads(item.value)
            result.append(Candidate(info["id"], info["address"], item.create_revision))
        return result

    async def campaign(self) -> Fence:
        """Block until we lead; returns the fence to guard our writes with.

        Cancellation: safe at any point (the key stays until the session closes).

        Raises:
            LeadershipUnavailable: the session ended before we won.
            aetcd.ClientError: etcd failed a read.
            TimeoutError: a read took longer than the session's ``call_timeout_s``.
        """
        if not self.revision:
            await self.enter()
        call_timeout_s = self._session.call_timeout_s
        while not self._session.done.is_set():
            # Two one-key reads, however many candidates there are: the one just ahead
            # of us (created last before our key), as etcd's election recipe does.
            async with asyncio.timeout(call_timeout_s):
                ahead = await first_created(self._client, self._keys.election, below=self.revision)
            if ahead is None:
                async with asyncio.timeout(call_timeout_s):
                    ours = await self._client.get(self.key)
                if ours is None or ours.create_revision != self.revision:
                    raise LeadershipUnavailable("our election key is gone (lease expired)")
                log.info("won the election with epoch %d", self.revision)
                return Fence(self.key, self.revision)
            await self._wait_for(ahead)
        raise LeadershipUnavailable("session ended while campaigning")

    async def _wait_for(self, ahead: Item) -> None:
        """Wait for a change to the candidate just ahead of us, at most ``poll_s`` (plus
        the call deadline for setting up the watch); a failed or ended watch waits
        ``poll_s``."""
        try:
            async with asyncio.timeout(self._poll_s + self._session.call_timeout_s):
                event = await self._client.watch_once(
                    ahead.key, timeout=self._poll_s, start_revision=ahead.mod_revision + 1
                )
        except aetcd.exceptions.WatchTimeoutError:
            return
        except (aetcd.ClientError, TimeoutError) as exc:
            event = exc
        if isinstance(event, Exception):
            # aetcd hands a watch's end (etcd restarted) back as the "event".
            log.warning(
                "election watch on %s at %s ended: %s; looking again in %.1f s",
                ahead.key.decode(), self._session.endpoint,
                describe_error(event, self._poll_s + self._session.call_timeout_s),
                self._poll_s,
            )  # fmt: skip
            await asyncio.sleep(self._poll_s)


class LeadershipUnavailable(TransientError):
    """The campaign cannot go on under this session."""
