"""etcd users and roles for a Mailers cluster, scoped by key prefix.

etcd started with ``--client-cert-auth`` takes a client certificate's common name as
the user name once auth is enabled, so each process acts as the user named by its
certificate (``mailers_dev.certs.cluster_specs`` issues them with these CNs) and no
passwords exist: users are created with ``no_password``.

The permission table (keys relative to the cluster prefix, ``/mailers`` by default):

=========================  ============================  ===========================
user (certificate CN)      role                          permission
=========================  ============================  ===========================
``root``                   ``root``                      everything (etcd's own);
                                                         needed to enable auth and
                                                         to change users and roles
``mailers-coordinator``    ``mailers-coordinator``       readwrite ``<prefix>/`` and
                                                         every key under it
``mailers-node-<id>``      ``mailers-node-<id>``         readwrite the single keys
                                                         ``<prefix>/nodes/<id>`` and
                                                         ``<prefix>/handback/<id>``;
                                                         read ``<prefix>/election/``
                                                         and every key under it
=========================  ============================  ===========================

A sender node touches nothing else in etcd: it grants a lease, puts its registration
in a transaction comparing that key's create revision and value, refreshes the lease
and revokes it (``sender_node/registration.py``); it reads the election keys to learn
the leader's epoch (``sender_node/leader_watch.py``), and writes its hand-back key when
it cannot reach the leader (``sender_node/handback.py``). Batches and results travel
over gRPC and the coordinator stores them. etcd 3.4 lets any authenticated user grant and
keep alive a lease; revoking one, or putting a key with one, needs write permission on
every key attached to that lease. So a node can neither read nor write another node's
registration, jobs, batches or results, nor revoke a lease that holds them.

Not covered by etcd 3.4's permissions: any authenticated user may keep alive or ask
the TTL of *any* lease whose id it knows (LeaseKeepAlive and LeaseTimeToLive are not
checked). A node cannot read other keys to learn lease ids, but one that guessed an id
could keep a dead peer's registration alive. Any certificate the CA signed also opens
a TLS connection; one whose CN is no etcd user is refused every key.

Everything here is idempotent: :func:`setup_auth` reconciles users, roles and
permissions to the table above (adding what is missing, revoking permissions no
longer in it) and enables auth if it is off. Run it as ``root`` (certificate
``etcd-root``) against a cluster whose clients must present certificates; before auth
is enabled any such client may do anything, so run it right after etcd first starts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aetcd
import grpc
from aetcd import rpc, utils

from mailers_runtime.etcd import DEFAULT_TIMEOUT_S, EtcdTls, Keys, connect

ROOT = "root"
"""etcd's superuser and role; auth cannot be enabled without them."""

ROOT_CERT = "etcd-root"
"""The file stem of root's certificate (CN ``root``) in a PKI directory (``--pki``)."""

COORDINATOR_USER = "mailers-coordinator"
"""User and role of every coordinator (the CN of ``coordinator.crt``)."""


def node_user(node_id: str) -> str:
    """User and role of one sender node (the CN of ``node-<id>.crt``)."""
    return f"mailers-node-{node_id}"


class Access(enum.IntEnum):
    """etcd's ``authpb.Permission.Type``."""

    READ = 0
    WRITE = 1
    READWRITE = 2


@dataclasses.dataclass(frozen=True, order=True)
class Grant:
    """One key permission of a role: ``key`` alone when ``range_end`` is empty, else
    the range [key, range_end)."""

    key: bytes
    range_end: bytes
    access: Access


def _prefix_grant(prefix: bytes, access: Access) -> Grant:
    return Grant(prefix, utils.prefix_range_end(prefix), access)


def coordinator_grants(prefix: str) -> frozenset[Grant]:
    """Readwrite on every key under the cluster prefix (``<prefix>/...``)."""
    # The trailing "/" keeps a neighbouring "/mailers2" out of reach.
    return frozenset({_prefix_grant(prefix.encode() + b"/", Access.READWRITE)})


def node_grants(prefix: str, node_id: str) -> frozenset[Grant]:
    """Readwrite on the node's own registration and hand-back keys; read on the
    election keys (the leader's epoch fences deposed leaders off)."""
    keys = Keys(prefix)
    return frozenset(
        {
            Grant(keys.node(node_id), b"", Access.READWRITE),
            Grant(keys.handback(node_id), b"", Access.READWRITE),
            _prefix_grant(keys.election, Access.READ),
        }
    )


def role_table(prefix: str, node_ids: Sequence[str]) -> dict[str, frozenset[Grant]]:
    """Role name -> its permissions, for the cluster under ``prefix`` (pure).

    ``root`` is left out: etcd gives it everything without key permissions.

    Raises:
        ValueError: a node id is empty or holds '/' (its key would not be its own).
    """
    table = {COORDINATOR_USER: coordinator_grants(prefix)}
    for node_id in node_ids:
        _check_node_id(node_id)
        table[node_user(node_id)] = node_grants(prefix, node_id)
    return table


def _check_node_id(node_id: str) -> None:
    if not node_id or "/" in node_id:
        raise ValueError(f"node id {node_id!r} must be non-empty and hold no '/'")


class _Auth:
    """etcd's Auth service through an aetcd client's channel, each call with a deadline.

    gRPC errors become aetcd's: ``ConnectionFailedError`` (UNAVAILABLE: unreachable,
    no raft leader yet), ``ConnectionTimeoutError`` (DEADLINE_EXCEEDED), else a plain
    ``ClientError`` naming the method and code; each caused by the
    ``grpc.aio.AioRpcError``, as aetcd raises them.
    """

    def __init__(self, client: aetcd.Client, timeout_s: float) -> None:
        self._client = client
        self._timeout_s = timeout_s
        self._stub: Any = None

    async def call(self, method: str, request: Any) -> Any:
        if self._stub is None:
            await self._client.connect()
            self._stub = rpc.AuthStub(self._client.channel)
        try:
            return await getattr(self._stub, method)(
                request, timeout=self._timeout_s, metadata=self._client.metadata
            )
        except grpc.aio.AioRpcError as exc:
            error = _ERRORS.get(exc.code(), aetcd.ClientError)
            raise error(f"{method}: {exc.code().name}: {exc.details()}") from exc


_ERRORS: dict[grpc.StatusCode, type[aetcd.ClientError]] = {
    grpc.StatusCode.UNAVAILABLE: aetcd.exceptions.ConnectionFailedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: aetcd.exceptions.ConnectionTimeoutError,
}
_TRANSIENT = (aetcd.exceptions.ConnectionFailedError, aetcd.exceptions.ConnectionTimeoutError)


async def _ensure_user(auth: _Auth, users: set[str], name: str, role: str) -> None:
    if name not in users:
        await auth.call(
            "UserAdd",
            rpc.AuthUserAddRequest(name=name, options=rpc.UserAddOptions(no_password=True)),
        )
        users.add(name)
    # Granting a role the user has is a no-op in etcd.
    await auth.call("UserGrantRole", rpc.AuthUserGrantRoleRequest(user=name, role=role))


async def _ensure_role(
    auth: _Auth, roles: set[str], name: str, grants: frozenset[Grant] | None
) -> None:
    """Create role ``name`` if missing and make its permissions exactly ``grants``
    (None: leave them, for ``root``)."""
    if name not in roles:
        await auth.call("RoleAdd", rpc.AuthRoleAddRequest(name=name))
        roles.add(name)
    if grants is None:
        return
    reply = await auth.call("RoleGet", rpc.AuthRoleGetRequest(role=name))
    current = {Grant(p.key, p.range_end, Access(p.permType)) for p in reply.perm}
    for grant in current - grants:
        await auth.call(
            "RoleRevokePermission",
            rpc.AuthRoleRevokePermissionRequest(
                role=name, key=grant.key, range_end=grant.range_end
            ),
        )
    for grant in sorted(grants - current):
        perm = rpc.Permission(permType=int(grant.access), key=grant.key, range_end=grant.range_end)
        await auth.call(
            "RoleGrantPermission", rpc.AuthRoleGrantPermissionRequest(name=name, perm=perm)
        )


async def _apply(
    client: aetcd.Client,
    table: Mapping[str, frozenset[Grant]],
    *,
    enable: bool,
    timeout_s: float,
) -> None:
    auth = _Auth(client, timeout_s)
    users = set((await auth.call("UserList", rpc.AuthUserListRequest())).users)
    roles = set((await auth.call("RoleList", rpc.AuthRoleListRequest())).roles)
    await _ensure_role(auth, roles, ROOT, None)
    await _ensure_user(auth, users, ROOT, ROOT)
    for name, grants in table.items():
        await _ensure_role(auth, roles, name, grants)
        await _ensure_user(auth, users, name, name)
    if enable:
        # Enabling auth that is already on is a no-op in etcd.
        await auth.call("AuthEnable", rpc.AuthEnableRequest())


async def setup_auth(
    client: aetcd.Client,
    prefix: str,
    node_ids: Sequence[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Create or reconcile the users and roles of :func:`role_table`, then enable auth.

    Idempotent: re-running it (also with more node ids) only adds what is missing and
    revokes permissions of these roles that the table no longer has. Nodes not named are
    left as they are (see :func:`remove_node`). Not atomic: if it fails half-way, run it
    again; auth is enabled only as the last step.

    Args:
        client: Connected as ``root`` (certificate CN ``root``) once auth is on; before
            that any client the cluster accepts.
        prefix: The cluster's key prefix (``Keys.prefix``).
        node_ids: The sender nodes to create identities for.
        timeout_s: Deadline of each etcd call (a dozen or so calls per node).

    Raises:
        aetcd.ClientError: etcd refused or failed a call (e.g. PERMISSION_DENIED when
            auth is on and the client is not root); see ``mailers_runtime.etcd.permission_denied``.
        ValueError: a node id is empty or holds '/'.
    """
    await _apply(client, role_table(prefix, node_ids), enable=True, timeout_s=timeout_s)


async def add_node(
    client: aetcd.Client, prefix: str, node_id: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Create or reconcile one node's user and role (auth may already be on).

    Idempotent. Does not enable auth. The node's certificate must carry CN
    ``mailers-node-<node_id>``.

    Raises:
        aetcd.ClientError: etcd refused or failed a call (the client must be root).
        ValueError: the node id is empty or holds '/'.
    """
    _check_node_id(node_id)
    table = {node_user(node_id): node_grants(prefix, node_id)}
    await _apply(client, table, enable=False, timeout_s=timeout_s)


async def remove_node(
    client: aetcd.Client, node_id: str, *, timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Delete one node's user and role, so its certificate opens nothing any more.

    Idempotent: a missing user or role is skipped. The node's registration key is left
    to expire with its lease.

    Raises:
        aetcd.ClientError: etcd refused or failed a call (the client must be root).
    """
    auth = _Auth(client, timeout_s)
    name = node_user(node_id)
    if name in (await auth.call("UserList", rpc.AuthUserListRequest())).users:
        await auth.call("UserDelete", rpc.AuthUserDeleteRequest(name=name))
    if name in (await auth.call("RoleList", rpc.AuthRoleListRequest())).roles:
        await auth.call("RoleDelete", rpc.AuthRoleDeleteRequest(role=name))


async def bootstrap(
    endpoints: Sequence[str],
    root_tls: EtcdTls,
    prefix: str,
    node_ids: Sequence[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ready_timeout_s: float = 30.0,
) -> None:
    """Connect as root with ``root_tls``, run :func:`setup_auth`, and close the client.

    For ``mailers etcd-auth`` and ``LocalCluster``, right after etcd starts: while etcd
    is unreachable or still electing a leader it tries again (setup_auth is idempotent)
    for up to ``ready_timeout_s``. E.g.
    ``asyncio.run(bootstrap(etcd.endpoints, EtcdTls.from_dir(pki, "etcd-root"), ...))``.

    Raises:
        aetcd.ClientError: etcd refused a call, or was still unavailable at the deadline.
        OSError: a TLS file cannot be read.
        ValueError: a node id is empty or holds '/'.
    """
    deadline = time.monotonic() + ready_timeout_s
    client = connect(endpoints, timeout_s=max(1, round(timeout_s)), tls=root_tls)
    try:
        while True:
            try:
                await setup_auth(client, prefix, node_ids, timeout_s=timeout_s)
                return
            except _TRANSIENT:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await client.close()
