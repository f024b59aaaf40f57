"""The operator commands against a running cluster, through their --json output."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from client_sdk import Address, MailerClient, MessageContent, Recipient
from mailers.cli import main
from mailers_dev.cluster import LocalCluster
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


Cli = Callable[..., Any]


@pytest.fixture
def cli(cluster: LocalCluster, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    def run(*args: str) -> Any:
        capsys.readouterr()
        code = main([*args, "--coordinators", ",".join(cluster.coordinator_addresses), "--json"])
        out = capsys.readouterr().out
        assert code == 0, out
        return json.loads(out)

    yield run


def _nodes_active(run: Cli) -> bool:
    nodes = run("nodes")
    return isinstance(nodes, list) and sum(n["state"] == "active" for n in nodes) == 3


def test_status_names_one_leader_and_a_standby(cli: Cli) -> None:
    # The second coordinator campaigns a moment after the first has won: on a busy
    # machine the first status may come before it stands by.
    def settled() -> bool:
        status = cli("status")
        return bool(status["leader"]) and len(status["standbys"]) == 1

    wait_until(settled, timeout_s=30, message="a leader and one standby")
    status = cli("status")
    assert isinstance(status, dict)
    assert status["leader"]["address"] and len(status["standbys"]) == 1
    assert status["leader"]["epoch"] > 0 and status["etcd_endpoints"]
    assert all(s["epoch"] > status["leader"]["epoch"] for s in status["standbys"])


def test_cordon_reset_and_uncordon_a_node(cli: Cli) -> None:
    wait_until(lambda: _nodes_active(cli), timeout_s=60, message="3 nodes active")
    cordoned = cli("node", "cordon", "node1")
    assert isinstance(cordoned, dict) and cordoned["state"] == "cordoned"
    states = {n["node_id"]: n["state"] for n in cli("nodes")}
    assert states["node1"] == "cordoned"
    reset = cli("node", "reset-breaker", "node1")
    assert isinstance(reset, dict) and reset["breaker_state"] == "closed"
    drained = cli("node", "drain", "node1")
    assert isinstance(drained, dict) and drained["batches_in_flight"] == 0
    back = cli("node", "uncordon", "node1")
    assert isinstance(back, dict) and back["state"] == "active"


def test_jobs_job_and_results(cli: Cli, tmp_path: Path, cluster: LocalCluster) -> None:
    csv = tmp_path / "r.csv"
    csv.write_text("email,name\nann@cli.example,Ann\nbob@cli.example,Bob\n")
    text = tmp_path / "body.txt"
    text.write_text("Hello {{ name }}")
    code = main(
        ["send", "--csv", str(csv), "--from", "ops@example.com", "--subject", "Hi {{ name }}",
         "--text", str(text), "--coordinators", ",".join(cluster.coordinator_addresses),
         "--idempotency-key", "cli-1"]
    )  # fmt: skip
    assert code == 0
    jobs = cli("jobs", "--limit", "200")
    assert isinstance(jobs, list)
    job = next(j for j in jobs if j["idempotency_key"] == "cli-1")
    shown = cli("job", "show", job["job_id"])
    assert isinstance(shown, dict) and shown["progress"]["delivered"] == 2
    results = cli("results", job["job_id"])
    assert isinstance(results, list)
    assert sorted(r["email"] for r in results) == ["ann@cli.example", "bob@cli.example"]
    assert all(r["status"] == "delivered" and r["reply"]["code"] == 250 for r in results)
    retried = cli("job", "retry-failed", job["job_id"])
    assert isinstance(retried, dict) and retried["requeued"] == 0


def test_drain_shows_progress_until_no_batch_is_left(
    cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    addresses = ",".join(cluster.coordinator_addresses)
    capsys.readouterr()
    assert main(["node", "drain", "node2", "--coordinators", addresses]) == 0
    captured = capsys.readouterr()
    # Progress on stderr, the drained node (the data) on stdout
    assert "draining node2" in captured.err and "0 batches left" in captured.err
    assert "node2" in captured.out and "draining" not in captured.out
    assert main(["node", "uncordon", "node2", "--coordinators", addresses]) == 0


def test_send_skips_invalid_rows_lists_them_and_sends_the_rest(
    tmp_path: Path, cluster: LocalCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a CSV of 500 rows of which 2% the cluster would refuse
    bad = {
        50: "not-an-email",
        120: "two@at@signs.example",
        200: "jöhn@umlaut.example",
        260: "",
        300: "x@-dash-.example",
        333: "a b@space.example",
        400: "trailing@dot.example.",
        450: "@no-local.example",
        470: "no-domain@",
        499: "semi;colon@x.example",
    }
    rows = [bad.get(i, f"r{i}@rejects.example") for i in range(500)]
    csv = tmp_path / "list.csv"
    csv.write_text("email,name,meta.row\n" + "".join(f"{e},R{i},{i}\n" for i, e in enumerate(rows)))
    text = tmp_path / "body.txt"
    text.write_text("Hello {{ name }}")
    capsys.readouterr()
    # When it is sent with --json
    code = main(
        ["send", "--csv", str(csv), "--from", "ops@example.com", "--subject", "Hi",
         "--text", str(text), "--coordinators", ",".join(cluster.coordinator_addresses),
         "--idempotency-key", "cli-rejects", "--json"]
    )  # fmt: skip
    captured = capsys.readouterr()
    # Then the other 490 went out, the summary on stdout is JSON, the notice on stderr
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert (summary["total"], summary["delivered"], summary["rejected_rows"]) == (490, 490, 10)
    assert "skipped 10 invalid rows" in captured.err
    # And every skipped row is listed with its line (the header is line 1) and reason
    listed = (tmp_path / "list.rejects.csv").read_text().splitlines()
    assert listed[0] == "line,email,reason"
    lines = sorted(int(row.split(",", 1)[0]) for row in listed[1:])
    assert lines == sorted(i + 2 for i in bad)
    assert summary["reject_file"] == str(tmp_path / "list.rejects.csv")
    sent = {str(x["message_id"]) for x in cluster.delivered()}
    assert sum(1 for m in sent if m.startswith(f"<{summary['job_id']}.")) == 490
    # And each result carries its row's metadata (the meta.row column) and Message-ID
    assert main(["results", summary["job_id"], "-o", "json", "--coordinators",
                 ",".join(cluster.coordinator_addresses)]) == 0  # fmt: skip
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 490
    assert {r["metadata"]["row"] for r in results} == {str(i) for i in range(500) if i not in bad}
    assert all(r["message_id"] in sent for r in results)


def _in_terminal(args: list[str], columns: int = 80) -> str:
    """What ``mailers ARGS`` shows in a pseudo-terminal ``columns`` wide."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    env = {**os.environ, "TERM": "xterm"}
    env.pop("COLUMNS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailers.cli", *args],
        stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
        proc.wait(60)
    assert proc.returncode == 0, b"".join(chunks).decode(errors="replace")
    text = b"".join(chunks).decode(errors="replace")
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)  # colours and cursor moves


@pytest.fixture(scope="module")
def sent_job(cluster: LocalCluster) -> str:
    """A finished job of the module's cluster, whatever else its tests did first (under
    two test workers the order of a module's tests is not given)."""

    async def send() -> str:
        async with MailerClient(cluster.coordinator_addresses) as client:
            content = MessageContent(Address("ops@example.com"), subject="s", text_body="t")
            job = await client.submit(
                content, [Recipient("x@listing.example")], idempotency_key="listing-job"
            )
            await client.wait(job.job_id)
            return job.job_id

    return asyncio.run(send())


def test_an_80_column_terminal_shows_whole_ids(cluster: LocalCluster, sent_job: str) -> None:
    addresses = ",".join(cluster.coordinator_addresses)
    # Given jobs (at least sent_job) and three nodes
    jobs = _in_terminal(["--coordinators", addresses, "jobs"])
    listed = json.loads(
        subprocess.run(
            [sys.executable, "-m", "mailers.cli", "jobs", "-o", "json",
             "--coordinators", addresses],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout
    )  # fmt: skip
    assert sent_job in {job["job_id"] for job in listed}
    # Then each job id, node id and node address is shown whole on one line
    for job in listed:
        assert job["job_id"] in jobs, jobs
    assert "…" not in jobs
    nodes = _in_terminal(["nodes", "--coordinators", addresses, "-o", "wide"])
    for i in range(3):
        assert f"node{i}" in nodes
    for address in re.findall(r"127\.0\.0\.1:\d+", nodes):
        assert len(address) > len("127.0.0.1:")
    assert "…" not in nodes
    # And the status reads the leader's epoch, the standby waiting behind it
    status = _in_terminal(["status", "--coordinators", addresses])
    leader = next(line for line in status.splitlines() if line.strip().startswith("leader"))
    standby = next(line for line in status.splitlines() if line.strip().startswith("standby"))
    assert re.search(r"\s\d+\s*$", leader), status
    assert re.search(r"rev \d+\s*$", standby), status


def _shape(doc: object) -> object:
    """A document's structure: its keys, list lengths and kinds of values."""
    if isinstance(doc, dict):
        return {k: _shape(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [_shape(v) for v in doc]
    return type(doc).__name__


LISTINGS = {
    "status": ["status"],
    "nodes": ["nodes"],
    "jobs": ["jobs"],
    "suppressions": ["suppression", "list"],
}


@pytest.mark.parametrize("listing", [*LISTINGS, "results"])
def test_every_listing_in_every_format(
    listing: str, cluster: LocalCluster, sent_job: str, capsys: pytest.CaptureFixture[str]
) -> None:
    addresses = ",".join(cluster.coordinator_addresses)
    capsys.readouterr()
    assert main(["jobs", "-o", "json", "--coordinators", addresses]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert sent_job in {job["job_id"] for job in jobs}
    args = LISTINGS.get(listing) or ["results", sent_job]
    documents = {}
    for fmt in ("json", "yaml"):
        # -o before the subcommand for json, after it for yaml: both positions work
        where = ["-o", fmt, *args] if fmt == "json" else [*args, "-o", fmt]
        assert main(["--coordinators", addresses, *where]) == 0
        captured = capsys.readouterr()
        documents[fmt] = (json.loads if fmt == "json" else yaml.safe_load)(captured.out)
    # The same document either way (live figures such as a lease's TTL may move
    # between the two calls: the keys and kinds of values must not)
    assert _shape(documents["json"]) == _shape(documents["yaml"])
    widths = {}
    for fmt in ("table", "wide"):
        assert main([*args, "-o", fmt, "--coordinators", addresses]) == 0
        out = capsys.readouterr().out
        header = next(line for line in out.splitlines() if line.strip())
        widths[fmt] = len(header.split())
        assert "…" not in out
    # wide shows at least the columns table shows
    assert widths["wide"] >= widths["table"]
