"""Tenants, quotas and the secrets canary on a real cluster with auth on (issue 6).

Two canaries: a tenant's API token, and the SMTP AUTH password of the nodes' relay (a
real STARTTLS sink requiring AUTH, its certificate verified against a dev CA). After a
job has run with every process logging at DEBUG, a call with a wrong token and an
admin call with the tenant's token, neither (raw, base64, base64url, sha256, and for
the password base64("\\0user\\0password") as AUTH PLAIN sends it) may appear in any
log, output, etcd key or value, stored message, error text or trailing metadata; the
token's sha256 only in the auth file.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from client_sdk import (
    Address,
    AuthError,
    JobOptions,
    JobState,
    MailerClient,
    MessageContent,
    NotFoundError,
    Recipient,
    ResourceExhaustedError,
)
from coordinator.auth import hash_token, new_token
from mailers_dev.certs import CertSpec, DevCA
from mailers_dev.cluster import ClusterSpec, LocalCluster
from mailers_runtime.etcd import connect
from tests.helpers import wait_nodes_active
from tests.integration.conftest import start_cluster

pytestmark = pytest.mark.integration

CANARY = new_token()
SMTP_USER = "mailer"
SMTP_CANARY = "smtp-" + new_token()
BETA = new_token()
TIGHT = new_token()
ADMIN = new_token()
CONTENT = MessageContent(
    sender=Address("news@example.com", "News"), subject="Hi {{ name }}", text_body="Hello"
)


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "auth.json"
    path.write_text(
        json.dumps(
            {
                "tenants": {
                    "acme": {"tokens": [hash_token(CANARY)]},
                    "beta": {"tokens": [hash_token(BETA)]},
                    "tight": {
                        "tokens": [hash_token(TIGHT)],
                        "quotas": {
                            "max_recipients_per_job": 3,
                            "messages_per_hour": 5,
                            "max_active_jobs": 1,
                        },
                    },
                },
                "admins": [hash_token(ADMIN)],
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, auth_file: Path) -> Iterator[LocalCluster]:
    debug = {"MAILER_LOG_LEVEL": "DEBUG"}
    # The relay: STARTTLS with a certificate from a dev CA, AUTH required. Its password
    # file lives outside the cluster's directory (which the canary search covers).
    secrets = tmp_path_factory.mktemp("relay-secrets")
    ca = DevCA.create(secrets)
    smtp = ca.issue(CertSpec("smtp", "smtp", ("127.0.0.1", "localhost"), client=False))
    password_file = secrets / "smtp-password"
    password_file.write_text(SMTP_CANARY + "\n")
    c = start_cluster(
        tmp_path_factory.mktemp("secrets"),
        ClusterSpec(
            coordinator_env={**debug, "MAILER_AUTH_FILE": str(auth_file)},
            node_env={**debug, "MAILER_RELAY_PASSWORD": SMTP_CANARY},
            nodes=2,
            sink_args=(
                "--tls-cert",
                str(smtp.cert),
                "--tls-key",
                str(smtp.key),
                "--auth-user",
                SMTP_USER,
                "--auth-password-file",
                str(password_file),
                "--auth-required",
            ),  # fmt: skip
            relay_options=(
                f"tls=starttls;ca={ca.cert_path};user={SMTP_USER};"
                "password_env=MAILER_RELAY_PASSWORD"
            ),
        ),
    )
    yield c
    c.stop()


def _people(n: int, tag: str) -> list[Recipient]:
    return [Recipient(f"{tag}{i}@example.org", f"P {i}") for i in range(n)]


async def test_tenants_see_only_their_jobs(cluster: LocalCluster) -> None:
    addresses = cluster.coordinator_addresses
    async with (
        MailerClient(addresses, token=CANARY) as acme,
        MailerClient(addresses, token=BETA) as beta,
        MailerClient(addresses, token=ADMIN) as admin,
    ):
        await wait_nodes_active(admin, 2)
        # Given a job of acme's
        later = JobOptions(send_at=datetime.now(UTC) + timedelta(hours=1))
        job = await acme.submit(CONTENT, _people(2, "a"), idempotency_key="k1", options=later)
        # Then beta gets the very answer a missing job gets, for every job call
        missing = "job 'no-such-job' not found"
        for job_id in (job.job_id, "no-such-job"):
            expected = missing.replace("no-such-job", job_id)
            for call in (beta.get, beta.cancel, beta.retry_failed):
                with pytest.raises(NotFoundError) as info:
                    await call(job_id)
                assert info.value.details == expected
            with pytest.raises(NotFoundError) as info:
                await beta.results_page(job_id)
            assert info.value.details == expected
            with pytest.raises(NotFoundError):
                async for _ in beta.watch(job_id):
                    pass
        # And listings show only the caller's jobs (admins see all)
        assert job.job_id in {j.job_id for j in (await acme.list_jobs_page()).items}
        assert job.job_id not in {j.job_id for j in (await beta.list_jobs_page()).items}
        assert job.job_id in {j.job_id for j in (await admin.list_jobs_page()).items}
        # And the idempotency key is per tenant: beta's "k1" is a new job
        other = await beta.submit(CONTENT, _people(1, "b"), idempotency_key="k1", options=later)
        assert other.created and other.job_id != job.job_id
        again = await acme.submit(CONTENT, _people(2, "a"), idempotency_key="k1", options=later)
        assert not again.created and again.job_id == job.job_id
        # And admins cannot submit (no tenant), tenants cannot use the admin API
        with pytest.raises(AuthError) as denied:
            await admin.submit(CONTENT, _people(1, "c"))
        assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(AuthError) as denied:
            await acme.pause(job.job_id)
        assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
        await acme.cancel(job.job_id)
        await beta.cancel(other.job_id)


async def test_quotas_answer_resource_exhausted_with_retry_info(cluster: LocalCluster) -> None:
    later = JobOptions(send_at=datetime.now(UTC) + timedelta(hours=1))
    async with MailerClient(cluster.coordinator_addresses, token=TIGHT) as tight:
        # More recipients than one job may have: waiting does not help (no RetryInfo)
        with pytest.raises(ResourceExhaustedError) as info:
            await tight.submit(CONTENT, _people(4, "t"), options=later)
        assert info.value.details == "quota: more than 3 recipients in one job"
        assert info.value.retry_after is None
        # One unfinished job is the limit
        first = await tight.submit(CONTENT, _people(3, "t"), options=later)
        with pytest.raises(ResourceExhaustedError) as info:
            await tight.submit(CONTENT, _people(1, "u"), options=later)
        assert info.value.details == "quota: 1 unfinished jobs already"
        assert info.value.retry_after == timedelta(seconds=30)
        # 3 of 5 an hour used: 3 more must wait until the first leave the window
        await tight.cancel(first.job_id)
        with pytest.raises(ResourceExhaustedError) as info:
            await tight.submit(CONTENT, _people(3, "v"), options=later)
        assert info.value.details == "quota: 5 recipients per hour; 3 used in the last hour"
        assert info.value.retry_after is not None
        assert timedelta(minutes=55) < info.value.retry_after <= timedelta(hours=1)


def _forms(secret: str) -> dict[str, bytes]:
    raw = secret.encode()
    return {
        "raw": raw,
        "base64": base64.b64encode(raw),
        "base64url": base64.urlsafe_b64encode(raw).rstrip(b"="),
        "sha256": hashlib.sha256(raw).hexdigest().encode(),
    }


async def test_canary_token_leaks_nowhere(cluster: LocalCluster, auth_file: Path) -> None:
    seen: list[bytes] = []
    async with (
        MailerClient(cluster.coordinator_addresses, token=CANARY) as acme,
        MailerClient(cluster.coordinator_addresses, token=ADMIN) as admin,
    ):
        await wait_nodes_active(admin, 2)
        # Given a job run to the end by the canary's tenant
        job = await acme.submit(CONTENT, _people(20, "c"))
        final = await acme.wait(job.job_id)
        assert final.state is JobState.COMPLETED and final.delivered == 20
    # (through the relay over STARTTLS, after AUTH: the sink requires both)
    lines = [line for line in cluster.delivered() if str(line["rcpt"]).startswith("c")]
    assert len(lines) >= 20 and all(line["tls"] for line in lines)
    # And a call with a wrong token and an admin call with the canary, on raw channels
    # so the whole error (details, trailing metadata, debug string) can be searched
    leader = cluster.coordinator_addresses
    for address in leader:
        async with grpc.aio.insecure_channel(address) as channel:
            for method, token in (
                ("/mailer.v1.MailerService/GetJob", CANARY[:-2] + "xx"),
                ("/mailer.v1.AdminService/ListNodes", CANARY),
            ):
                call: Any = channel.unary_unary(method)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call(b"", metadata=(("authorization", f"Bearer {token}"),), timeout=5)
                exc = info.value
                assert exc.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                )
                seen.append((exc.details() or "").encode())
                seen.append(repr(exc.trailing_metadata()).encode())
                seen.append(repr(exc.initial_metadata()).encode())
                seen.append((exc.debug_error_string() or "").encode())
    # When everything the cluster wrote is searched
    etcd = connect(cluster.etcd.endpoints)
    try:
        for kv in await etcd.get_prefix(b"/"):
            seen.append(kv.key)
            seen.append(kv.value)
    finally:
        await etcd.close()
    # Then no form of the canary is anywhere but the sha256 in the auth file
    forms = _forms(CANARY)
    smtp_forms = {f"smtp {name}": form for name, form in _forms(SMTP_CANARY).items()}
    plain = f"\0{SMTP_USER}\0{SMTP_CANARY}".encode()
    smtp_forms["smtp AUTH PLAIN"] = base64.b64encode(plain)
    forms.update(smtp_forms)
    _assert_files_clean(cluster.base_dir, forms)
    for chunk in seen:
        for name, form in forms.items():
            assert form not in chunk, f"canary ({name}) found in a gRPC error or etcd: {chunk!r}"
    auth = auth_file.read_bytes()  # noqa: ASYNC240 - a small local file
    assert forms["sha256"] in auth and forms["raw"] not in auth


def _assert_files_clean(base: Path, forms: dict[str, bytes]) -> None:
    """No form in any file the cluster wrote: logs (stdout and stderr), etcd's data
    directory, the sink's maildir and log."""
    files = [p for p in base.rglob("*") if p.is_file()]
    assert any(p.name.startswith("coordinator") for p in files), "no coordinator log found"
    for path in files:
        data = path.read_bytes()
        for name, form in forms.items():
            assert form not in data, f"canary ({name}) found in {path}"


async def test_suppression_lists_are_per_tenant(cluster: LocalCluster) -> None:
    addresses = cluster.coordinator_addresses
    async with (
        MailerClient(addresses, token=CANARY) as acme,
        MailerClient(addresses, token=BETA) as beta,
        MailerClient(addresses, token=ADMIN) as admin,
    ):
        # Given acme suppresses an address on its own list
        await acme.suppress("gone@tenant.example")
        # Then beta does not see it, and cannot reach acme's list
        assert "gone@tenant.example" not in {s.email async for s in beta.suppressions()}
        with pytest.raises(AuthError) as denied:
            await beta.suppress("x@tenant.example", tenant="acme")
        assert denied.value.code is grpc.StatusCode.PERMISSION_DENIED
        # While acme and an admin naming acme do
        assert "gone@tenant.example" in {s.email async for s in acme.suppressions()}
        listed = {s.email async for s in admin.suppressions(tenant="acme")}
        assert "gone@tenant.example" in listed
        assert await admin.unsuppress("gone@tenant.example", tenant="acme")
        assert "gone@tenant.example" not in {s.email async for s in acme.suppressions()}
