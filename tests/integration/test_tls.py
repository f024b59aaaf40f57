"""TLS on every gRPC hop of a real cluster (issue "Security"), with a development CA.

A cluster started with ``ClusterSpec(tls=True)`` runs mutual TLS: the SDK presents the
``client`` certificate to the coordinators, the leader presents ``coordinator.crt`` to
the nodes and checks theirs. Everything a peer without the right certificate tries is
refused with an exact status: UNAVAILABLE when the handshake fails (no client
certificate, one from another CA, plaintext), PERMISSION_DENIED when a certificate from
the CA names no coordinator on a node. Processes without a transport choice do not
start at all.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client_sdk import (
    Address,
    ClientConfig,
    ClientTls,
    JobState,
    MailerClient,
    MessageContent,
    Recipient,
    RetryPolicy,
    UnavailableError,
)
from mailerpb.mailer.v1 import sender_pb2, sender_pb2_grpc
from mailers.cli import main as cli_main
from mailers_dev.certs import make_dev_pki
from mailers_dev.cluster import ClusterSpec, LocalCluster
from mailers_dev.procs import free_port, spawn_python, wait_for_port
from mailers_runtime.healthcheck import probe
from mailers_runtime.tls import TlsFiles
from tests.helpers import assert_eventually, wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.integration

CONTENT = MessageContent(
    sender=Address("news@example.com", "News"), subject="Hi {{ name }}", text_body="Hello"
)
LEADER_SERVICE = "mailer.v1.MailerService"
CALL_TIMEOUT_S = 10.0
"""Deadline of one raw call: a handshake refusal answers within milliseconds."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path_factory.mktemp("tls"), ClusterSpec(tls=True, nodes=2))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA with certificates of the same names: trusted by nobody in the cluster."""
    directory = tmp_path_factory.mktemp("other-pki")
    make_dev_pki(directory, ["node0"])
    return directory


@pytest.fixture
async def client(cluster: LocalCluster) -> AsyncIterator[MailerClient]:
    async with cluster.client() as c:
        await wait_nodes_active(c, 2)
        yield c


def _credentials(
    ca: Path, name: str | None = None, pki: Path | None = None
) -> grpc.ChannelCredentials:
    """Trusting ca, presenting ``<pki>/<name>.crt`` (none when name is None)."""
    if name is None:
        return grpc.ssl_channel_credentials(ca.read_bytes())
    pki = pki or ca.parent
    return grpc.ssl_channel_credentials(
        ca.read_bytes(), (pki / f"{name}.key").read_bytes(), (pki / f"{name}.crt").read_bytes()
    )


async def _health_code(channel: grpc.aio.Channel) -> grpc.StatusCode:
    try:
        await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _send_and_wait(client: MailerClient, tag: str, count: int) -> None:
    job = await client.submit(CONTENT, [Recipient(f"{tag}{i}@example.org") for i in range(count)])
    final = await client.wait(job.job_id)
    assert final.state is JobState.COMPLETED
    assert final.delivered == count


# ---- the happy path --------------------------------------------------------------------


async def test_a_job_runs_end_to_end_over_mutual_tls(
    cluster: LocalCluster, client: MailerClient
) -> None:
    # Given a TLS cluster whose two nodes are connected to the leader (over mTLS)
    # When a job is sent through the SDK with the client certificate
    await _send_and_wait(client, "e2e", 40)
    # Then every recipient reached the sink, sent by the nodes
    rcpts = {str(line["rcpt"]) for line in cluster.delivered()}
    assert {f"e2e{i}@example.org" for i in range(40)} <= rcpts
    # And each process said it runs TLS under its own certificate
    for proc in cluster.coordinators.values():
        assert "TLS as mailers-coordinator" in proc.log()
    for name, proc in cluster.nodes.items():
        assert f"TLS as mailers-node-{name}" in proc.log()


async def test_redirects_to_the_leader_use_tls_too(cluster: LocalCluster) -> None:
    # Given a client that tries the standby first (both orders: one of them is)
    for addresses in (cluster.coordinator_addresses, cluster.coordinator_addresses[::-1]):
        async with MailerClient(addresses, tls=cluster.client_tls) as c:
            # When it asks for the cluster status
            status = await c.cluster_status(timeout=timedelta(seconds=30))
            # Then it reached the leader, over TLS
            assert status.leader is not None
            assert c.leader == status.leader.address


# ---- refusals at the coordinator ---------------------------------------------------------


async def test_a_client_without_a_certificate_is_refused(cluster: LocalCluster) -> None:
    ca = cluster.pki_dir / "ca.crt"
    for address in cluster.coordinator_addresses:
        # Given a client that trusts the CA but has no certificate
        async with grpc.aio.secure_channel(address, _credentials(ca)) as channel:
            # Then the handshake fails: UNAVAILABLE, even for the health service
            assert await _health_code(channel) is grpc.StatusCode.UNAVAILABLE
    # And the SDK without a client certificate gives up with UnavailableError
    no_cert = ClientTls(root_certificates=ca.read_bytes())
    config = ClientConfig(retry=RetryPolicy(max_attempts=2))
    async with MailerClient(cluster.coordinator_addresses, config, tls=no_cert) as c:
        with pytest.raises(UnavailableError) as info:
            await c.cluster_status(timeout=timedelta(seconds=20))
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


async def test_a_certificate_from_another_ca_is_refused(
    cluster: LocalCluster, other_pki: Path
) -> None:
    ca = cluster.pki_dir / "ca.crt"
    address = cluster.coordinator_addresses[0]
    # Given a client certificate from another CA (the client trusts the right CA)
    foreign = _credentials(ca, "client", other_pki)
    async with grpc.aio.secure_channel(address, foreign) as channel:
        # Then the coordinator refuses the handshake
        assert await _health_code(channel) is grpc.StatusCode.UNAVAILABLE
    # And a client trusting the other CA refuses the coordinator's certificate
    wrong_trust = _credentials(other_pki / "ca.crt", "client", other_pki)
    async with grpc.aio.secure_channel(address, wrong_trust) as channel:
        assert await _health_code(channel) is grpc.StatusCode.UNAVAILABLE
    # While the cluster's own client certificate is let in
    async with grpc.aio.secure_channel(address, _credentials(ca, "client")) as channel:
        assert await _health_code(channel) is grpc.StatusCode.OK


async def test_a_plaintext_client_cannot_reach_a_tls_coordinator(cluster: LocalCluster) -> None:
    for address in cluster.coordinator_addresses:
        async with grpc.aio.insecure_channel(address) as channel:
            assert await _health_code(channel) is grpc.StatusCode.UNAVAILABLE
    # The SDK without tls dials plaintext: it cannot reach the cluster either
    config = ClientConfig(retry=RetryPolicy(max_attempts=2))
    async with MailerClient(cluster.coordinator_addresses, config) as c:
        with pytest.raises(UnavailableError):
            await c.cluster_status(timeout=timedelta(seconds=20))


# ---- refusals at a node -------------------------------------------------------------------


async def _dispatch_as(
    address: str, credentials: grpc.ChannelCredentials, *, send_open: bool = False
) -> tuple[grpc.StatusCode, str]:
    """Open a Dispatch stream; the code and details it ends with.

    With ``send_open`` the stream at once claims an epoch above any leader's. The node
    may answer before that write goes out, and grpc's client then reports its failed
    write (INTERNAL, "Failed execute_batch") instead of the node's status; without it,
    the node's answer is what the caller sees.
    """
    opening = sender_pb2.DispatchRequest(
        open=sender_pb2.DispatchOpen(coordinator_id="intruder", epoch=2**62)
    )
    async with grpc.aio.secure_channel(address, credentials) as channel:
        stub = sender_pb2_grpc.SenderServiceStub(channel)
        if send_open:
            call = stub.Dispatch(iter([opening]), timeout=CALL_TIMEOUT_S)
        else:
            call = stub.Dispatch(timeout=CALL_TIMEOUT_S)
        code: grpc.StatusCode = await call.code()
        return code, await call.details()


async def test_a_node_takes_dispatch_streams_only_from_coordinators(
    cluster: LocalCluster, client: MailerClient, other_pki: Path
) -> None:
    ca = cluster.pki_dir / "ca.crt"
    nodes = await client.list_nodes()
    assert len(nodes) == 2
    for node in nodes:
        # Given certificates signed by the cluster's CA that are not a coordinator's
        for name in ("client", f"node-{node.node_id}"):
            # When one opens a dispatch stream to the node
            code, details = await _dispatch_as(node.address, _credentials(ca, name))
            # Then the node refuses it, before its handler reads anything
            assert code is grpc.StatusCode.PERMISSION_DENIED, details
            assert details.endswith(
                "is not one of mailers-coordinator (MAILER_TLS_ALLOWED_CLIENTS)"
            )
            # And a stream that claims a huge epoch at once gets no further
            code, details = await _dispatch_as(node.address, _credentials(ca, name), send_open=True)
            assert code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INTERNAL), details
        # And a certificate from another CA, or none, does not get past the handshake
        code, details = await _dispatch_as(node.address, _credentials(ca, "coordinator", other_pki))
        assert code is grpc.StatusCode.UNAVAILABLE, details
        code, details = await _dispatch_as(node.address, _credentials(ca))
        assert code is grpc.StatusCode.UNAVAILABLE, details
        async with grpc.aio.insecure_channel(node.address) as channel:
            plain = sender_pb2_grpc.SenderServiceStub(channel).Dispatch(timeout=CALL_TIMEOUT_S)
            assert await plain.code() is grpc.StatusCode.UNAVAILABLE
        assert "refused /mailer.v1.SenderService/Dispatch" in cluster.nodes[node.node_id].log()
    # And the leader's streams were not disturbed: had a node taken the intruders' epoch,
    # it would have closed the leader's stream and refused it since (stale epoch). A job
    # still goes through both nodes.
    await _send_and_wait(client, "after-intruders", 20)
    assert {n.state.name for n in await client.list_nodes()} == {"ACTIVE"}
    for proc in cluster.nodes.values():
        assert "intruder" not in proc.log()


# ---- health probes over TLS ----------------------------------------------------------------


def test_the_healthcheck_probes_tls_servers(cluster: LocalCluster) -> None:
    env = cluster.tls_env("coordinator")
    tls = TlsFiles(
        Path(env["MAILER_TLS_CA"]), Path(env["MAILER_TLS_CERT"]), Path(env["MAILER_TLS_KEY"])
    )
    verdicts = [probe(a, None, CALL_TIMEOUT_S, tls=tls) for a in cluster.coordinator_addresses]
    # Every coordinator is alive, over TLS with the coordinator's own certificate
    assert all(v.ok for v in verdicts), verdicts
    # Exactly one leads
    ready = [
        probe(a, LEADER_SERVICE, CALL_TIMEOUT_S, tls=tls) for a in cluster.coordinator_addresses
    ]
    assert sum(v.ok for v in ready) == 1, ready
    # Without TLS the probe gets no answer
    plain = probe(cluster.coordinator_addresses[0], None, CALL_TIMEOUT_S)
    assert not plain.ok and plain.reason == "no usable answer: UNAVAILABLE"
    # The command reads MAILER_TLS_CA, _CERT, _KEY from its environment, as in a container
    done = subprocess.run(
        [sys.executable, "-m", "mailers_runtime.healthcheck", cluster.coordinator_addresses[0]],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- a coordinator that asks for no client certificate --------------------------------------


@pytest.fixture
def token_only_coordinator(cluster: LocalCluster, tmp_path: Path) -> Iterator[str]:
    """A coordinator with MAILER_TLS_CLIENT_AUTH=none, leading a prefix of its own."""
    port = free_port()
    env = {
        **cluster.tls_env("coordinator"),
        # etcd's root: the coordinators' etcd role reaches only the cluster's /mailers/.
        **cluster.etcd_env("etcd-root"),
        "MAILER_PLAINTEXT": "",
        "MAILER_TLS_CLIENT_AUTH": "none",
        "MAILER_ETCD_ENDPOINTS": ",".join(cluster.etcd.endpoints),
        "MAILER_ETCD_PREFIX": "/token-only",
        "MAILER_LISTEN": f"127.0.0.1:{port}",
        "MAILER_COORDINATOR_ID": "token-only",
        # A database of its own: it leads another prefix, so another fence.
        "MAILER_DATABASE_URL": cluster.postgres.create_database(f"token_only_{port}"),
        "MAILER_DATABASE_PASSWORD_FILE": str(cluster.postgres.password_file),
    }
    proc = spawn_python("token-only", "coordinator", tmp_path, env)
    try:
        wait_for_port(port, 60, proc.popen)
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


async def test_client_auth_none_lets_clients_in_with_server_tls_only(
    cluster: LocalCluster, token_only_coordinator: str
) -> None:
    ca = (cluster.pki_dir / "ca.crt").read_bytes()
    # Given a coordinator that asks for no client certificate
    server_only = ClientTls(root_certificates=ca)
    async with MailerClient([token_only_coordinator], tls=server_only) as c:
        # Then a client with only the CA reaches it (once it leads its prefix)
        async def leads() -> bool:
            status = await c.cluster_status(timeout=timedelta(seconds=5))
            return status.leader is not None

        await assert_eventually(leads, timeout_s=60, message="token-only coordinator leads")
    # But still over TLS only
    async with grpc.aio.insecure_channel(token_only_coordinator) as channel:
        assert await _health_code(channel) is grpc.StatusCode.UNAVAILABLE


# ---- start-up refusals ----------------------------------------------------------------------


def _run_module(module: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    scrubbed = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    if module == "coordinator":
        # Never reached: the process must refuse to start before it connects anywhere.
        scrubbed["MAILER_DATABASE_URL"] = "postgresql://mailers@127.0.0.1:1/mailers"
    return subprocess.run(
        [sys.executable, "-m", module],
        env={**scrubbed, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


NODE_ENV = {"MAILER_ETCD_ENDPOINTS": "127.0.0.1:1", "MAILER_RELAYS": "127.0.0.1:2"}


@pytest.mark.parametrize(
    ("module", "env"), [("coordinator", {}), ("sender_node", NODE_ENV)], ids=["coordinator", "node"]
)
def test_no_transport_chosen_refuses_to_start(module: str, env: dict[str, str]) -> None:
    # Given neither MAILER_TLS_CA, _CERT, _KEY nor MAILER_PLAINTEXT
    done = _run_module(module, env)
    # Then the process exits 2 at once, saying what to set
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"{module}: no transport security chosen: set MAILER_TLS_CA")
    assert "MAILER_PLAINTEXT=1 for local development" in done.stderr


def test_unusable_tls_files_refuse_to_start_naming_the_file(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    env = cluster.tls_env("coordinator")
    # Given a key that is not the certificate's
    done = _run_module(
        "coordinator", {**env, "MAILER_TLS_KEY": str(cluster.pki_dir / "client.key")}
    )
    assert done.returncode == 2
    assert "is not the key of the certificate" in done.stderr
    assert str(cluster.pki_dir / "client.key") in done.stderr
    # Given a key file holding no key (a secret-looking line that must not be echoed)
    bogus = tmp_path / "bogus.key"
    bogus.write_text("-----BEGIN PRIVATE KEY-----\nS3CRET-CANARY\n-----END PRIVATE KEY-----\n")
    done = _run_module("sender_node", {**NODE_ENV, **env, "MAILER_TLS_KEY": str(bogus)})
    assert done.returncode == 2
    assert f"MAILER_TLS_KEY={bogus}: not an unencrypted PEM private key" in done.stderr
    assert "S3CRET" not in done.stderr + done.stdout
    # Given a missing CA file, or TLS and plaintext at once
    missing = tmp_path / "nope.crt"
    done = _run_module("coordinator", {**env, "MAILER_TLS_CA": str(missing)})
    assert done.returncode == 2 and f"MAILER_TLS_CA={missing}: cannot read" in done.stderr
    done = _run_module("coordinator", {**env, "MAILER_PLAINTEXT": "1"})
    assert done.returncode == 2 and "choose TLS or plaintext" in done.stderr
    # And a node cannot be told to skip client certificates
    done = _run_module("sender_node", {**NODE_ENV, **env, "MAILER_TLS_CLIENT_AUTH": "none"})
    assert done.returncode == 2 and "always require client certificates" in done.stderr


# ---- mailers certs -------------------------------------------------------------------------


def test_mailers_certs_writes_a_pki_with_private_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "pki"
    # When the command makes a PKI for two nodes
    code = cli_main(["certs", str(directory), "--node", "a", "--node", "b", "--host", "mx.test"])
    out = capsys.readouterr().out
    # Then it wrote the CA and every certificate, keys readable by the owner only
    assert code == 0
    names = {"ca", "coordinator", "client", "etcd", "etcd-root", "node-a", "node-b"}
    for name in names:
        assert (directory / f"{name}.crt").is_file()
        mode = stat.S_IMODE((directory / f"{name}.key").stat().st_mode)
        assert mode == 0o600, f"{name}.key has mode {oct(mode)}"
    # And it printed the environment each process needs
    assert f"MAILER_TLS_CA={directory / 'ca.crt'}" in out
    assert f"MAILER_TLS_CERT={directory / 'node-b.crt'}" in out
    assert f"MAILER_TLS_KEY={directory / 'client.key'}" in out
    # And it does not replace a CA by accident
    assert cli_main(["certs", str(directory)]) == 2
    assert cli_main(["certs", str(directory), "--force"]) == 0


def test_mailers_admin_commands_use_tls_flags(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    env = cluster.tls_env("client")
    addresses = ",".join(cluster.coordinator_addresses)
    args = ["status", "--json", "--coordinators", addresses]
    tls = ["--tls-ca", env["MAILER_TLS_CA"], "--tls-cert", env["MAILER_TLS_CERT"]]
    # A certificate without its key is a usage error
    assert cli_main([*args, *tls]) == 2
    # With the key, the command reaches the leader over TLS
    capsys.readouterr()
    assert cli_main([*args, *tls, "--tls-key", env["MAILER_TLS_KEY"]]) == 0
    assert '"leader"' in capsys.readouterr().out
