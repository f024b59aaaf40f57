"""The operator commands against a running cluster, through their --json output."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

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
    status = cli("status")
    assert isinstance(status, dict)
    assert status["leader"]["address"] and len(status["standbys"]) == 1
    assert status["leader"]["epoch"] > 0 and status["etcd_endpoints"]


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
    out = capsys.readouterr().out
    assert "draining node2" in out and "0 batches left" in out
    assert main(["node", "uncordon", "node2", "--coordinators", addresses]) == 0
