"""A TLS cluster secures etcd too, and ``mailers etcd-auth`` sets up etcd's users.

``ClusterSpec(tls=True)`` starts etcd with client and peer TLS and
``--client-cert-auth``, creates the users and roles of ``mailers.etcd_auth`` as root
and enables auth before any coordinator or node connects; each process then reaches
etcd as the user its certificate names. ``test_etcd_security.py`` covers the whole
permission matrix against a bare etcd; here a few checks show the local cluster really
runs that way, and that the CLI sets up a cluster operators start themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aetcd
import grpc
import pytest
from aetcd import rpc

from client_sdk import Address, JobState, MailerClient, MessageContent, Recipient
from mailers.cli import main as cli_main
from mailers_dev.certs import make_dev_pki
from mailers_dev.cluster import ClusterSpec, LocalCluster
from mailers_dev.procs import EtcdCluster
from mailers_runtime.etcd import EtcdTls, Keys, connect
from tests.helpers import require_etcd, wait_nodes_active
from tests.integration.conftest import start_cluster
from tests.integration.test_etcd_security import assert_denied, assert_refused

pytestmark = pytest.mark.integration

CONTENT = MessageContent(
    sender=Address("news@example.com", "News"), subject="Hi {{ name }}", text_body="Hello"
)
KEYS = Keys("/mailers")
CALL_TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("secure"), ClusterSpec(tls=True, nodes=2))
    yield c
    c.stop()


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[MailerClient]:
    async with cluster.client() as c:
        await wait_nodes_active(c, 2, timeout_s=90)
        yield c


@contextlib.asynccontextmanager
async def etcd_as(cluster: LocalCluster, name: str = "etcd-root") -> AsyncIterator[aetcd.Client]:
    """A connected client of the cluster's etcd presenting certificate ``name``."""
    etcd = cluster.etcd_client(name)
    try:
        await etcd.connect()
        yield etcd
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(etcd.close(), 5)


def _environ(pid: int) -> dict[str, str]:
    """The environment a process of ours was started with (Linux)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (item.decode(errors="replace").partition("=") for item in raw if item)
    return {name: value for name, _, value in pairs}


async def test_a_job_runs_end_to_end_with_etcd_secured(
    cluster: LocalCluster, client: MailerClient
) -> None:
    # Given a TLS cluster whose 2 nodes registered in etcd as their own users
    # When a job is sent
    job = await client.submit(CONTENT, [Recipient(f"sec{i}@example.org") for i in range(30)])
    final = await client.wait(job.job_id)
    # Then it completes, every recipient in the sink
    assert final.state is JobState.COMPLETED
    assert final.delivered == 30
    rcpts = {str(line["rcpt"]) for line in cluster.delivered()}
    assert {f"sec{i}@example.org" for i in range(30)} <= rcpts
    # And etcd holds what the coordinator (mailers-coordinator) and the nodes
    # (mailers-node-node<i>) wrote, as root sees it: the election and registrations
    async with etcd_as(cluster) as root:
        assert await root.get_prefix(KEYS.election)
        for node_id in cluster.node_ids:
            assert await root.get(KEYS.node(node_id)) is not None, node_id
    # And each process reached etcd with its own certificate (no other could have
    # registered or stored anything: plaintext and unknown users are refused below)
    for proc in cluster.coordinators.values():
        assert _environ(proc.pid)["MAILER_ETCD_CERT"] == str(cluster.pki_dir / "coordinator.crt")
    for node_id, proc in cluster.nodes.items():
        cert = cluster.pki_dir / f"node-{node_id}.crt"
        assert _environ(proc.pid)["MAILER_ETCD_CERT"] == str(cert)


async def test_etcd_accepts_only_client_certificates_of_the_ca(cluster: LocalCluster) -> None:
    # Given a plaintext client: etcd serves TLS only
    plain = connect(cluster.etcd.endpoints, timeout_s=3)
    try:
        await assert_refused(plain.get(KEYS.node("node0")))
    finally:
        await plain.close()
    # Given a TLS client that trusts the CA but presents no certificate: no handshake
    ca = (cluster.pki_dir / "ca.crt").read_bytes()
    async with grpc.aio.secure_channel(
        cluster.etcd.endpoints[0], grpc.ssl_channel_credentials(ca)
    ) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await rpc.KVStub(channel).Range(
                rpc.RangeRequest(key=KEYS.node("node0")), timeout=CALL_TIMEOUT_S
            )
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    # Given the SDK client's certificate (CN mailers-client, no etcd user): auth is on,
    # so TLS is accepted but every key refused
    async with etcd_as(cluster, "client") as nobody:
        await assert_denied(nobody.get(KEYS.election))


async def test_a_node_identity_reaches_only_its_own_key(
    cluster: LocalCluster, client: MailerClient
) -> None:
    # Given node0's certificate, which node0 registers with
    async with etcd_as(cluster, "node-node0") as node0:
        # Then it reads its own registration
        own = await node0.get(KEYS.node("node0"))
        assert own is not None
        # But not node1's, nor any cordon, and it cannot write node1's
        await assert_denied(node0.get(KEYS.node("node1")))
        await assert_denied(node0.put(KEYS.node("node1"), b"{}"))
        await assert_denied(node0.get_prefix(KEYS.cordons))


def test_mailers_certs_prints_the_etcd_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "pki"
    assert cli_main(["certs", str(directory), "--node", "a"]) == 0
    out = capsys.readouterr().out
    # Each process's etcd identity is its own certificate, next to its MAILER_TLS_* line
    assert f"MAILER_ETCD_CERT={directory / 'coordinator.crt'}" in out
    assert f"MAILER_ETCD_KEY={directory / 'node-a.key'}" in out
    assert f"MAILER_ETCD_CA={directory / 'ca.crt'}" in out
    # And how to set up etcd's users with them
    assert f"mailers etcd-auth --endpoints HOST:PORT --pki {directory} a" in out


# ---- mailers etcd-auth ------------------------------------------------------------------


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[tuple[EtcdCluster, Path]]:
    """One etcd member serving TLS with client certificates, auth still off."""
    require_etcd()
    pki = tmp_path / "pki"
    make_dev_pki(pki, ["n1", "n2"])
    etcd = EtcdCluster(tmp_path / "etcd", tls=EtcdTls.from_dir(pki, "etcd"))
    etcd.start()
    yield etcd, pki
    etcd.stop()


async def _cli(*argv: str) -> int:
    # The command runs its own event loop (asyncio.run), so not on this one.
    return await asyncio.to_thread(cli_main, list(argv))


async def test_mailers_etcd_auth_sets_up_and_changes_node_users(
    tls_etcd: tuple[EtcdCluster, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    etcd, pki = tls_etcd
    endpoints = ",".join(etcd.endpoints)
    n1 = connect(etcd.endpoints, tls=EtcdTls.from_dir(pki, "node-n1"))
    n2 = connect(etcd.endpoints, tls=EtcdTls.from_dir(pki, "node-n2"))
    try:
        # When root's certificate sets up the cluster with node n1 (etcd may still be
        # electing its leader: the command waits for it)
        assert await _cli("etcd-auth", "--endpoints", endpoints, "--pki", str(pki), "n1") == 0
        out = capsys.readouterr().out
        assert "auth enabled" in out
        assert "mailers-node-n1" in out

        # Then n1 registers its own key, and nobody else's
        await n1.put(KEYS.node("n1"), b"{}")
        await assert_denied(n1.put(KEYS.node("n2"), b"{}"))
        # And n2, without a user yet, touches nothing
        await assert_denied(n2.put(KEYS.node("n2"), b"{}"))

        # When n2 is added later, it may register too
        assert await _cli("etcd-auth", "--endpoints", endpoints, "--pki", str(pki),
                          "--add-node", "n2") == 0  # fmt: skip
        await n2.put(KEYS.node("n2"), b"{}")

        # When n2 is removed, its certificate opens nothing again
        assert await _cli("etcd-auth", "--endpoints", endpoints, "--pki", str(pki),
                          "--remove-node", "n2") == 0  # fmt: skip
        await assert_denied(n2.put(KEYS.node("n2"), b"{}"))
    finally:
        await n1.close()
        await n2.close()


async def test_mailers_etcd_auth_refuses_clearly(
    tls_etcd: tuple[EtcdCluster, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    etcd, pki = tls_etcd
    endpoints = ",".join(etcd.endpoints)
    base = ["etcd-auth", "--endpoints", endpoints]
    # Given auth set up by root
    assert await _cli(*base, "--pki", str(pki), "n1") == 0
    capsys.readouterr()

    # A node's certificate is not root: etcd refuses, exit 1, saying what to use
    node = [f"--{flag}={pki / name}" for flag, name in
            (("ca", "ca.crt"), ("cert", "node-n1.crt"), ("key", "node-n1.key"))]  # fmt: skip
    assert await _cli(*base, *node, "--add-node", "n2") == 1
    err = capsys.readouterr().err
    assert "permission denied" in err and "etcd-root certificate (CN root)" in err

    # Usage errors exit 2 before anything is sent: no certificate, half of one, a node
    # id with '/', positional ids with --add-node, a missing PKI
    for argv in (
        [*base, "n1"],
        [*base, "--ca", str(pki / "ca.crt"), "n1"],
        [*base, "--pki", str(pki), "a/b"],
        [*base, "--pki", str(pki), "n1", "--add-node", "n2"],
        [*base, "--pki", str(pki / "nope"), "n1"],
    ):
        assert await _cli(*argv) == 2, argv
        assert "error:" in capsys.readouterr().err, argv

    # And nothing changed: n2 still has no user
    n2 = connect(etcd.endpoints, tls=EtcdTls.from_dir(pki, "node-n2"))
    try:
        await assert_denied(n2.put(KEYS.node("n2"), b"{}"))
    finally:
        await n2.close()
