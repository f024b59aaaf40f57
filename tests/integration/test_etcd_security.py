"""etcd over TLS with client-certificate auth and users scoped by key prefix.

A real 3-member etcd cluster serves clients and peers over TLS only and requires a
client certificate from the dev CA; ``setup_auth`` has made users and roles from the
certificates' common names and enabled auth (``mailers.etcd_auth`` has the table).
The module shares that cluster; tests that change users or roles use node ids of
their own, and each test writes keys no other test reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aetcd
import grpc
import pytest
from aetcd import rpc

from coordinator.election import Election
from mailers.etcd_auth import (
    COORDINATOR_USER,
    Access,
    Grant,
    add_node,
    bootstrap,
    node_grants,
    node_user,
    remove_node,
    role_table,
    setup_auth,
)
from mailers_dev.certs import CertSpec, DevCA, make_dev_pki
from mailers_dev.procs import EtcdCluster
from mailers_runtime.etcd import EtcdTls, Keys, Session, connect, permission_denied, watch_prefix
from sender_node.registration import Registration
from tests.helpers import assert_eventually, require_etcd

pytestmark = pytest.mark.integration

PREFIX = "/mailers"
KEYS = Keys(PREFIX)
NODES = ("n1", "n2", "n3")

ClientFactory = Callable[[str], Awaitable[aetcd.Client]]


@dataclasses.dataclass(frozen=True)
class Secured:
    etcd: EtcdCluster
    pki: Path

    def tls(self, name: str) -> EtcdTls:
        """The identity of ``<name>.crt`` in the dev PKI (e.g. ``node-n1``)."""
        return EtcdTls.from_dir(self.pki, name)


def start_secured(base: Path) -> Secured:
    require_etcd()
    pki = base / "pki"
    make_dev_pki(pki, NODES)
    etcd = EtcdCluster(base / "etcd", size=3, tls=EtcdTls.from_dir(pki, "etcd"))
    try:
        etcd.start()
        # Right after start the members may still be electing a leader: bootstrap
        # retries until then (bounded), as setup_auth is idempotent.
        root = EtcdTls.from_dir(pki, "etcd-root")
        asyncio.run(bootstrap(etcd.endpoints, root, PREFIX, NODES, ready_timeout_s=30))
    except BaseException:
        etcd.stop()
        raise
    return Secured(etcd, pki)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    cluster = start_secured(tmp_path_factory.mktemp("secured"))
    yield cluster
    cluster.etcd.stop()


@pytest.fixture
async def as_user(secured: Secured) -> AsyncIterator[ClientFactory]:
    """``await as_user("node-n1")``: a connected client presenting that certificate;
    all are closed after the test."""
    made: list[aetcd.Client] = []

    async def make(name: str) -> aetcd.Client:
        client = connect(secured.etcd.endpoints, tls=secured.tls(name))
        made.append(client)
        await client.connect()
        return client

    yield make
    for client in made:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.close(), 5)


async def assert_denied(call: Awaitable[object]) -> None:
    """The call fails with etcd's PERMISSION_DENIED, as aetcd reports it: a plain
    ClientError (aetcd has no subclass for the code) caused by the gRPC error."""
    with pytest.raises(aetcd.ClientError) as info:
        await call
    assert type(info.value) is aetcd.ClientError
    cause = info.value.__cause__
    assert isinstance(cause, grpc.aio.AioRpcError)
    assert cause.code() is grpc.StatusCode.PERMISSION_DENIED
    assert cause.details() == "etcdserver: permission denied"
    assert permission_denied(info.value)


async def assert_refused(call: Awaitable[object]) -> None:
    """The call fails because no connection could be made: UNAVAILABLE."""
    with pytest.raises(aetcd.exceptions.ConnectionFailedError) as info:
        await asyncio.wait_for(call, 15)
    cause = info.value.__cause__
    assert isinstance(cause, grpc.aio.AioRpcError)
    assert cause.code() is grpc.StatusCode.UNAVAILABLE
    assert not permission_denied(info.value)


# ---- the coordinator's identity ----------------------------------------------------


async def test_coordinator_reads_and_writes_anywhere_under_the_prefix(
    as_user: ClientFactory,
) -> None:
    # Given the coordinator's certificate (CN mailers-coordinator)
    coordinator = await as_user("coordinator")
    keys = [
        KEYS.election_key(7),
        KEYS.cordon("coord-node"),
        KEYS.handback("coord-node"),
        KEYS.node("coord-node"),
        PREFIX.encode() + b"/anything/else",
    ]

    # When it writes, reads, transacts on and deletes keys all over the layout
    for key in keys:
        await coordinator.put(key, b"v")
    listing = await coordinator.get_prefix(PREFIX.encode() + b"/")
    tx = coordinator.transactions
    ok, _ = await coordinator.transaction(
        compare=[tx.value(KEYS.cordon("coord-node")) == b"v"],
        success=[tx.put(KEYS.handback("coord-node"), b"w")],
        failure=[],
    )
    deleted = [await coordinator.delete(key) for key in keys]

    # Then all of it is allowed
    assert set(keys) <= {kv.key for kv in listing}
    assert ok
    assert all(deleted)

    # But nothing outside the prefix, not even a neighbour sharing its first letters
    await assert_denied(coordinator.put(b"/elsewhere/x", b"v"))
    await assert_denied(coordinator.put(PREFIX.encode() + b"2/x", b"v"))
    await assert_denied(coordinator.get(b"/elsewhere/x"))


async def test_election_and_fenced_store_work_as_the_coordinator(
    as_user: ClientFactory,
) -> None:
    # Given the coordinator's identity with a session (a leased key) and a campaign
    client = await as_user("coordinator")
    session = Session(client, ttl_s=5)
    await session.open()
    try:
        election = Election(client, KEYS, session, "c-secure", "127.0.0.1:1", poll_s=0.2)

        # When it campaigns alone, it leads
        fence = await asyncio.wait_for(election.campaign(), 15)
        assert fence.key == KEYS.election_key(session.lease_id)

        # And its writes fenced by its election key (as cordons are) go through
        tx = client.transactions
        fenced = [tx.create(fence.key) == fence.revision]
        ok, _ = await client.transaction(
            compare=fenced, success=[tx.put(KEYS.cordon("secure-node"), b"1")], failure=[]
        )
        assert ok and await client.get(KEYS.cordon("secure-node")) is not None
    finally:
        # Then closing the session revokes the lease: a permission it has as well
        await session.close(revoke=True)
    assert await client.get(fence.key) is None
    # And once its key is gone its fenced writes are refused
    ok, _ = await client.transaction(
        compare=fenced, success=[tx.delete(KEYS.cordon("secure-node"))], failure=[]
    )
    assert not ok
    await client.delete(KEYS.cordon("secure-node"))


# ---- a node's identity ---------------------------------------------------------------


async def test_node_registers_its_own_key_under_a_lease(as_user: ClientFactory) -> None:
    # Given node n1's certificate
    node = await as_user("node-n1")
    coordinator = await as_user("coordinator")
    tx = node.transactions

    # When it grants a lease, creates its registration bound to it (as registration.py
    # does: a transaction comparing its own key), refreshes and reads it back
    lease = await node.lease(5)
    ok, _ = await node.transaction(
        compare=[tx.create(KEYS.node("n1")) == 0],
        success=[tx.put(KEYS.node("n1"), b'{"node_id": "n1"}', lease=lease)],
        failure=[],
    )
    refreshed = await lease.refresh()
    own = await node.get(KEYS.node("n1"))

    # Then all of that is allowed, and the coordinator sees the key bound to the lease
    assert ok
    assert refreshed is not None and refreshed.TTL > 0
    assert own is not None and own.lease == lease.id
    seen = await coordinator.get(KEYS.node("n1"))
    assert seen is not None and seen.value == b'{"node_id": "n1"}'

    # And revoking its lease (write permission on the attached key) removes the key
    await lease.revoke()
    assert await coordinator.get(KEYS.node("n1")) is None


@pytest.fixture
async def coordinator_lease(as_user: ClientFactory) -> AsyncIterator[Any]:
    """A lease of the coordinator's holding a key no node may write."""
    coordinator = await as_user("coordinator")
    lease = await coordinator.lease(30)
    await coordinator.put(KEYS.cordon("held-by-lease"), b"v", lease=lease)
    yield lease
    with contextlib.suppress(Exception):
        await asyncio.wait_for(lease.revoke(), 5)


Denied = Callable[[aetcd.Client, Any], Awaitable[object]]

DENIED: dict[str, Denied] = {
    "put another node's registration": lambda c, _: c.put(KEYS.node("n2"), b"{}"),
    "read another node's registration": lambda c, _: c.get(KEYS.node("n2")),
    "delete another node's registration": lambda c, _: c.delete(KEYS.node("n2")),
    "list registrations": lambda c, _: c.get_prefix(KEYS.nodes),
    "put a key extending its own": lambda c, _: c.put(KEYS.node("n1") + b"x", b"{}"),
    "write another node's hand-back": lambda c, _: c.put(KEYS.handback("n2"), b"{}"),
    "read another node's hand-back": lambda c, _: c.get(KEYS.handback("n2")),
    "write anything else under the prefix": lambda c, _: c.put(KEYS.prefix.encode() + b"/x", b""),
    "enter the election": lambda c, _: c.put(KEYS.election_key(1), b"{}"),
    "cordon a node": lambda c, _: c.put(KEYS.cordon("n2"), b"1"),
    "write outside the prefix": lambda c, _: c.put(b"/elsewhere", b"x"),
    # A compare reads its key, so it needs read permission too
    "compare another node's key": lambda c, _: c.transaction(
        compare=[c.transactions.create(KEYS.node("n2")) == 0],
        success=[c.transactions.put(KEYS.node("n1"), b"{}")],
        failure=[],
    ),
    "revoke a lease holding others' keys": lambda c, lease: c.revoke_lease(lease.id),
    "bind its key to another's lease": lambda c, lease: c.put(KEYS.node("n1"), b"{}", lease=lease),
    "change users and roles": lambda c, _: setup_auth(c, PREFIX, ["n1"]),
}


@pytest.mark.parametrize("operation", list(DENIED), ids=list(DENIED))
async def test_node_cannot_touch_anything_else(
    as_user: ClientFactory, coordinator_lease: Any, operation: str
) -> None:
    # Given node n1's certificate
    node = await as_user("node-n1")

    # When it does anything but its own registration, etcd refuses
    await assert_denied(DENIED[operation](node, coordinator_lease))


async def test_a_ca_signed_certificate_without_an_etcd_user_opens_nothing(
    as_user: ClientFactory,
) -> None:
    # Given the SDK client's certificate: signed by the CA, CN mailers-client, no user
    client = await as_user("client")

    # Then TLS is accepted but every key is refused
    await assert_denied(client.get(KEYS.node("n1")))
    await assert_denied(client.put(KEYS.cordon("client-node"), b"{}"))


async def test_registration_runs_with_the_nodes_restricted_identity(
    as_user: ClientFactory,
) -> None:
    # Given the coordinator watching registrations as the registry does
    coordinator = await as_user("coordinator")
    node = await as_user("node-n2")
    events: list[tuple[str, bytes]] = []
    snapshots: list[list[tuple[bytes, bytes]]] = []

    async def on_snapshot(items: list[tuple[bytes, bytes]]) -> None:
        snapshots.append(items)

    async def on_change(kind: str, key: bytes, value: bytes) -> None:
        events.append((kind, key))

    watch = asyncio.create_task(watch_prefix(coordinator, KEYS.nodes, on_snapshot, on_change))
    registration = Registration(
        node, KEYS, "n2", capacity=10, ttl_s=2, margin_s=0.5, retry_delay_s=0.1
    )
    try:
        await assert_eventually(lambda: bool(snapshots), timeout_s=10, message="watch started")

        # When the real Registration runs as node n2 (its certificate, its key only)
        registration.start("127.0.0.1:7002")
        await registration.wait_registered(15)
        lease_id = registration.lease_id

        # Then it is registered under its lease, and the coordinator sees the PUT
        got = await coordinator.get(KEYS.node("n2"))
        assert got is not None and got.lease == lease_id
        assert json.loads(got.value)["node_id"] == "n2"
        await assert_eventually(
            lambda: ("PUT", KEYS.node("n2")) in events, timeout_s=10, message="PUT seen"
        )

        # And keepalives over TLS carry it past its TTL (2 s) on the same lease
        since = time.monotonic()
        await assert_eventually(
            lambda: time.monotonic() - since > 3, timeout_s=10, message="3 s elapsed"
        )
        assert registration.healthy()
        assert registration.lease_id == lease_id

        # And stopping revokes the lease, removing the key
        await registration.stop()
        assert await coordinator.get(KEYS.node("n2")) is None
        await assert_eventually(
            lambda: ("DELETE", KEYS.node("n2")) in events, timeout_s=10, message="DELETE seen"
        )
    finally:
        await registration.stop()
        watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch


async def test_registration_under_another_nodes_id_never_succeeds(
    as_user: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    # Given node n1's certificate used for node n3's registration
    node = await as_user("node-n1")
    registration = Registration(node, KEYS, "n3", capacity=10, ttl_s=2, retry_delay_s=0.1)
    try:
        # When it tries to register
        with caplog.at_level(logging.WARNING, logger="sender_node.registration"):
            registration.start("127.0.0.1:7003")
            with pytest.raises(TimeoutError):
                await registration.wait_registered(1.5)
    finally:
        await registration.stop()

    # Then every attempt was refused by etcd, and the log says what to do about it
    assert not registration.healthy()
    errors = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and r.name == "sender_node.registration"
    ]
    assert errors and all("etcd refused to register /mailers/nodes/n3" in e for e in errors)
    assert "mailers etcd-auth --add-node n3" in errors[0]


# ---- who may connect ---------------------------------------------------------------


async def test_plaintext_client_is_refused(secured: Secured) -> None:
    client = connect(secured.etcd.endpoints, timeout_s=3)
    try:
        await assert_refused(client.get(KEYS.node("n1")))
    finally:
        await client.close()


async def test_client_without_a_certificate_is_refused(secured: Secured) -> None:
    # Given a TLS client that trusts the CA but presents no certificate
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(secured.pki / "ca.crt").read_bytes()
    )
    channel = grpc.aio.secure_channel(secured.etcd.endpoints[0], credentials)
    try:
        # Then the handshake fails and no call gets through
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc.KVStub(channel).Range(rpc.RangeRequest(key=KEYS.node("n1")), timeout=10)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()


async def test_certificate_from_another_ca_is_refused(secured: Secured, tmp_path: Path) -> None:
    # Given a certificate with the coordinator's CN, signed by a CA etcd does not trust
    rogue = DevCA.create(tmp_path / "rogue").issue(
        CertSpec("rogue", COORDINATOR_USER, server=False)
    )
    client = connect(
        secured.etcd.endpoints,
        timeout_s=3,
        tls=EtcdTls(secured.pki / "ca.crt", rogue.cert, rogue.key),
    )
    try:
        # Then etcd rejects the handshake
        await assert_refused(client.get(KEYS.node("n1")))
    finally:
        await client.close()


async def test_client_does_not_trust_a_server_of_another_ca(
    secured: Secured, tmp_path: Path
) -> None:
    # Given a client whose trusted CA did not sign the etcd members' certificate
    other = DevCA.create(tmp_path / "other")
    mine = other.issue(CertSpec("mine", COORDINATOR_USER, server=False))
    client = connect(
        secured.etcd.endpoints, timeout_s=3, tls=EtcdTls(other.cert_path, mine.cert, mine.key)
    )
    try:
        # Then the client refuses the server
        await assert_refused(client.get(KEYS.node("n1")))
    finally:
        await client.close()


# ---- managing users and roles ------------------------------------------------------


async def role_grants(root: aetcd.Client, role: str) -> set[Grant]:
    reply = await rpc.AuthStub(root.channel).RoleGet(rpc.AuthRoleGetRequest(role=role), timeout=5)
    return {Grant(p.key, p.range_end, Access(p.permType)) for p in reply.perm}


async def test_setup_auth_is_idempotent_and_converges(as_user: ClientFactory) -> None:
    root = await as_user("etcd-root")

    # When setup runs again on the secured cluster
    await setup_auth(root, PREFIX, NODES)

    # Then every role holds exactly the table's permissions
    for role, grants in role_table(PREFIX, NODES).items():
        assert await role_grants(root, role) == set(grants), role
    assert await role_grants(root, COORDINATOR_USER) == {
        Grant(b"/mailers/", b"/mailers0", Access.READWRITE)
    }
    assert await role_grants(root, node_user("n3")) == set(node_grants(PREFIX, "n3"))

    # Given an extra permission granted by hand to node n3's role
    stray = rpc.Permission(
        permType=int(Access.READ), key=KEYS.cordons, range_end=b"/mailers/cordon0"
    )
    await rpc.AuthStub(root.channel).RoleGrantPermission(
        rpc.AuthRoleGrantPermissionRequest(name=node_user("n3"), perm=stray), timeout=5
    )
    node = await as_user("node-n3")
    assert await node.get(KEYS.cordon("stray-node")) is None  # allowed now

    # When the node is set up again, the stray permission is revoked
    await add_node(root, PREFIX, "n3")
    assert await role_grants(root, node_user("n3")) == set(node_grants(PREFIX, "n3"))
    await assert_denied(node.get(KEYS.cordon("stray-node")))


async def test_add_and_remove_a_node_later(secured: Secured, as_user: ClientFactory) -> None:
    # Given a new node's certificate from the cluster's CA, before it has an etcd user
    paths = DevCA.load(secured.pki).issue(CertSpec("node-late", node_user("late")))
    root = await as_user("etcd-root")
    node = connect(
        secured.etcd.endpoints, tls=EtcdTls(secured.pki / "ca.crt", paths.cert, paths.key)
    )
    try:
        await assert_denied(node.put(KEYS.node("late"), b"{}"))

        # When root adds the node (twice: idempotent)
        await add_node(root, PREFIX, "late")
        await add_node(root, PREFIX, "late")

        # Then it may write its registration, and only that
        await node.put(KEYS.node("late"), b"{}")
        await assert_denied(node.put(KEYS.node("n1"), b"{}"))
        await node.delete(KEYS.node("late"))

        # When root removes it (twice: idempotent), its certificate opens nothing
        await remove_node(root, "late")
        await remove_node(root, "late")
        await assert_denied(node.put(KEYS.node("late"), b"{}"))
    finally:
        await node.close()


# ---- failover over TLS ---------------------------------------------------------------


async def test_client_fails_over_between_tls_members(tmp_path: Path) -> None:
    # Given a secured cluster of its own and the coordinator connected to all three
    # members (it starts with etcd0), verifying each against one name
    secured = await asyncio.to_thread(start_secured, tmp_path)
    client = connect(secured.etcd.endpoints, tls=secured.tls("coordinator"))
    try:
        await client.put(KEYS.cordon("failover"), b"before")
        first = secured.etcd.members[0]
        assert first.proc is not None

        # When the member it talks to dies
        first.proc.signal(signal.SIGKILL)
        await asyncio.to_thread(first.proc.stop)

        # Then the same client carries on through another member
        async def written() -> bool:
            try:
                await client.put(KEYS.cordon("failover"), b"after")
            except aetcd.ClientError:
                return False
            return True

        await assert_eventually(written, timeout_s=30, interval_s=0.2, message="put after kill")
        got = await client.get(KEYS.cordon("failover"))
        assert got is not None and got.value == b"after"
    finally:
        await client.close()
        await asyncio.to_thread(secured.etcd.stop)
