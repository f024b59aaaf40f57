"""The distributions built from this repository, installed the way users install them.

``mailers-sdk`` (sdk/) is what a service installs to talk to a cluster: it must bring
no etcd, SMTP, template or CLI package, import on its own, and carry its types
(``py.typed``) so that a user's ``mypy --strict`` checks calls into it. ``mailers-server``
(the repository root) holds the coordinator, the sender node and their runtime library,
and depends on the SDK for the generated messages; ``mailers-cli`` (cli/) is the
``mailers`` command; ``mailers-dev`` (devtools/) the local cluster and test tools, which
no server depends on.

Wheels are built with the pinned uv (``.tools/uv``, installed by dev.sh) and installed
from versions taken from uv.lock, into an empty virtualenv of the test's own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.helpers import unavailable

# One build at a time: uv build writes into the packages' own build/ directories.
pytestmark = [pytest.mark.deploy, pytest.mark.xdist_group("distributions")]

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "uv" / "bin" / "uv"
# What the SDK needs, and what those need in turn (grpcio: typing-extensions).
SDK_RUNTIME = {"mailers-sdk", "grpcio", "protobuf", "googleapis-common-protos", "typing-extensions"}
SERVER_ONLY = {"aetcd", "aiosmtplib", "aiosmtpd", "asyncpg", "jinja2", "rich", "uvloop"}

SAMPLE = textwrap.dedent(
    """
    from datetime import timedelta

    from client_sdk import Address, ClientConfig, MailerClient, MessageContent, Recipient


    async def send(addresses: list[str]) -> str:
        content = MessageContent(
            sender=Address("news@example.com", "News"),
            subject="Hi {{ name }}",
            text_body="Hello {{ name }}",
        )
        config = ClientConfig(default_timeout=timedelta(seconds=10))
        async with MailerClient(["127.0.0.1:7701"], config) as client:
            job = await client.submit(content, [Recipient(a) for a in addresses])
            return job.job_id
    """
)

# The same program with a type error a typed package must reveal.
SAMPLE_WRONG = SAMPLE.replace("return job.job_id", "return job.progress.total")


def _run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not UV.exists():
        unavailable(
            "uv is not installed (bash dev.sh test installs it)",
            f"{UV} is missing: dev.sh installs it",
        )
    out = tmp_path_factory.mktemp("dist")
    for package in ("mailers-sdk", "mailers-server", "mailers-cli", "mailers-dev"):
        _run(UV, "build", "--wheel", "--package", package, "--out-dir", out, cwd=ROOT)
    built = {p.name.split("-")[0]: p for p in out.glob("*.whl")}
    return {
        "sdk": built["mailers_sdk"],
        "server": built["mailers_server"],
        "cli": built["mailers_cli"],
        "dev": built["mailers_dev"],
    }


def _contents(wheel_path: Path) -> tuple[set[str], list[str], str]:
    """A wheel's top-level names (not its metadata), Requires-Dist lines, entry points."""
    with zipfile.ZipFile(wheel_path) as wheel:
        names = wheel.namelist()
        tops = {n.split("/")[0] for n in names if ".dist-info/" not in n}
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line.removeprefix("Requires-Dist: ")
            for line in wheel.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
        entry = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = wheel.read(entry[0]).decode() if entry else ""
    return tops, requires, entry_points


@pytest.fixture(scope="module")
def sdk_venv(wheels: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty virtualenv holding the SDK wheel and what uv.lock pins for it, only."""
    work = tmp_path_factory.mktemp("sdk-venv")
    requirements = work / "requirements.txt"
    _run(
        UV, "export", "--frozen", "--package", "mailers-sdk", "--no-dev",
        "--no-emit-workspace", "--output-file", requirements, cwd=ROOT,
    )  # fmt: skip
    venv = work / "venv"
    _run(UV, "venv", "--python", sys.executable, venv, cwd=work)
    python = venv / "bin" / "python"
    _run(UV, "pip", "install", "--python", python, "-r", requirements, wheels["sdk"], cwd=work)
    return venv


def test_sdk_installs_alone_with_only_its_runtime(sdk_venv: Path) -> None:
    # Given the SDK installed into an empty virtualenv
    frozen = _run(UV, "pip", "freeze", "--python", sdk_venv / "bin" / "python", cwd=sdk_venv)
    names = {line.split("==")[0].split(" @ ")[0].lower() for line in frozen.splitlines()}
    # Then it brought exactly its runtime: no etcd, SMTP, template, database or CLI package
    assert names == SDK_RUNTIME
    assert not names & SERVER_ONLY


def test_sdk_imports_outside_the_source_tree(sdk_venv: Path, tmp_path: Path) -> None:
    # When a program outside the repository imports the SDK
    out = _run(
        sdk_venv / "bin" / "python",
        "-c",
        "import client_sdk, mailerpb.mailer.v1.coordinator_pb2 as pb; "
        "print(client_sdk.__file__); print(pb.SubmitJobRequest.DESCRIPTOR.full_name)",
        cwd=tmp_path,
    )
    # Then the installed copy is used, with the generated messages it needs
    path, message = out.split()
    assert str(sdk_venv) in path
    assert message == "mailer.v1.SubmitJobRequest"


def test_sdk_types_reach_a_users_mypy(sdk_venv: Path, tmp_path: Path) -> None:
    # Given a user's program type-checked against the installed SDK only (the repository
    # is not on the path: the check runs in an empty directory)
    (tmp_path / "good.py").write_text(SAMPLE)
    (tmp_path / "bad.py").write_text(SAMPLE_WRONG)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "MYPY_CACHE_DIR": str(tmp_path)}
    mypy = [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
            "--python-executable", str(sdk_venv / "bin" / "python")]  # fmt: skip
    # Then a correct program passes mypy --strict
    _run(*mypy, "good.py", cwd=tmp_path, env=env)
    # And a wrong one fails, which only happens when the SDK's types are seen
    wrong = subprocess.run(
        [*mypy, "bad.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert wrong.returncode == 1, wrong.stdout + wrong.stderr
    assert 'Incompatible return value type (got "int", expected "str")' in wrong.stdout


def test_server_wheel_leaves_the_sdk_to_its_own_distribution(wheels: dict[str, Path]) -> None:
    tops, requires, _ = _contents(wheels["server"])
    assert tops == {"coordinator", "sender_node", "mailers_runtime"}
    assert "mailers-sdk==0.2.0" in requires
    with zipfile.ZipFile(wheels["sdk"]) as wheel:
        names = set(wheel.namelist())
    assert {"client_sdk/py.typed", "mailerpb/py.typed", "client_sdk/client.py"} <= names
    assert "mailerpb/mailer/v1/coordinator_pb2.pyi" in names


def test_server_processes_need_neither_the_cli_nor_the_dev_tools(
    wheels: dict[str, Path],
) -> None:
    # Given the server distribution's requirements
    _, requires, entry_points = _contents(wheels["server"])
    names = {re.split(r"[<>=~!;\[ ]", r, maxsplit=1)[0].lower() for r in requires}
    # Then the CLI's table library is not among them, nor our CLI or dev distributions
    # (aiosmtpd is: the coordinators' inbound endpoint for bounces runs on it)
    assert not names & {"rich", "mailers-cli", "mailers-dev"}, names
    assert "aiosmtpd" in names
    assert "mailers" not in entry_points


def test_cli_and_dev_tools_are_their_own_distributions(wheels: dict[str, Path]) -> None:
    # The CLI: the `mailers` package and command, on top of the servers and the SDK
    tops, requires, entry_points = _contents(wheels["cli"])
    assert tops == {"mailers"}
    assert {"mailers-sdk==0.2.0", "mailers-server==0.2.0"} <= set(requires)
    assert any(r.startswith("rich") for r in requires)
    assert "mailers = mailers.cli:main" in entry_points
    # The development tools: the local cluster, PKI, sink and fault proxy
    tops, requires, entry_points = _contents(wheels["dev"])
    assert tops == {"mailers_dev"}
    assert "[mailers.cli]" in entry_points  # demo, cluster, certs join the CLI
    assert "mailers-cli==0.2.0" in requires
    assert any(r.startswith("aiosmtpd") for r in requires)
