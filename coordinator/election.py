"""Leader election on etcd, after etcd's concurrency.Election recipe.

Each coordinator puts a key under ``election/`` bound to its own lease. The key with
the lowest create revision leads; its create revision is the leader's epoch and the
fence for every write it makes. A candidate that is not first waits for a change under
the prefix (a watch, or a poll at most every ``poll_s`` seconds if the watch fails) and
looks again. Losing the lease is losing leadership: ``session.done`` fires.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

import aetcd

from mailers.etcd import Keys, Session, first_created, read_prefix

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
        """Put our key (once per lease) and remember its create revision."""
        value = json.dumps({"id": self._id, "address": self._address}).encode()
        await self._client.transaction(
            compare=[self._client.transactions.create(self.key) == 0],
            success=[self._client.transactions.put(self.key, value, lease=self._session.lease)],
            failure=[],
        )
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
        """
        if not self.revision:
            await self.enter()
        while not self._session.done.is_set():
            # Two one-key reads, however many candidates there are: the one just ahead
            # of us (created last before our key), as etcd's election recipe does.
            ahead = await first_created(self._client, self._keys.election, below=self.revision)
            if ahead is None:
                ours = await self._client.get(self.key)
                if ours is None or ours.create_revision != self.revision:
                    raise LeadershipUnavailable("our election key is gone (lease expired)")
                log.info("won the election with epoch %d", self.revision)
                return Fence(self.key, self.revision)
            # Wait for the candidate just ahead of us to go (or the poll to come round).
            try:
                await self._client.watch_once(
                    ahead.key, timeout=self._poll_s, start_revision=ahead.mod_revision + 1
                )
            except aetcd.exceptions.WatchTimeoutError:
                pass
            except aetcd.ClientError as exc:
                log.warning("election watch failed: %s", exc)
                await asyncio.sleep(self._poll_s)
        raise LeadershipUnavailable("session ended while campaigning")


class LeadershipUnavailable(Exception):
    """The campaign cannot go on under this session."""
