"""The import rules of the layout (ARCHITECTURE.md), checked on the source tree.

- The servers (``coordinator``, ``sender_node``) and their shared runtime library
  (``mailers_runtime``) never import the CLI (``mailers``), the development tools
  (``mailers_dev``), tests or benchmarks, nor the CLI's and the test sink's third-party
  libraries: a server process carries none of them.
- The coordinator and the sender node never import each other; what both need lives in
  ``mailers_runtime``, which imports neither. The CLI does not import the development
  tools: they add their commands through the ``mailers.cli`` entry point.
- The SDK imports only itself, the generated messages and gRPC/protobuf.
- Generated protobuf code (``mailerpb``) is imported only by the edge modules, where
  messages become model objects and back.

Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVERS = ("coordinator", "sender_node", "mailers_runtime")
OURS = {"coordinator", "sender_node", "mailers_runtime", "mailers", "mailers_dev",
        "client_sdk", "mailerpb", "tests", "bench", "scripts"}  # fmt: skip
NOT_IN_SERVERS = {"mailers", "mailers_dev", "tests", "bench", "scripts", "rich"}
PROTO_EDGES = {
    "client_sdk/_operations.py",
    "client_sdk/_convert.py",
    "coordinator/_convert.py",
    "coordinator/servicer.py",
    "coordinator/server.py",
    "coordinator/node_link.py",
    "sender_node/_convert.py",
    "sender_node/servicer.py",
    "sender_node/__main__.py",
}
"""Each either converts (``_convert``), serves or calls the gRPC service, or wires it."""


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level module) of every import in a file, relative ones resolved."""
    package = path.relative_to(ROOT).parts[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, package
            elif node.module:
                yield node.lineno, node.module.split(".")[0]


def _sources(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def _where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_servers_import_neither_the_cli_nor_the_dev_tools() -> None:
    wrong = [
        f"{_where(path, line)} imports {module}"
        for path in _sources(*SERVERS)
        for line, module in _imports(path)
        if module in NOT_IN_SERVERS
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("coordinator", {"sender_node"}),
        ("sender_node", {"coordinator"}),
        ("mailers_runtime", {"coordinator", "sender_node"}),
        # The dev tools add their commands to the CLI through an entry point.
        ("mailers", {"mailers_dev"}),
    ],
)
def test_the_servers_share_only_the_runtime_library(package: str, forbidden: set[str]) -> None:
    wrong = [
        f"{_where(path, line)} imports {module}"
        for path in _sources(package)
        for line, module in _imports(path)
        if module in forbidden
    ]
    assert not wrong, "\n".join(wrong)


def test_the_sdk_stands_alone() -> None:
    allowed = {"client_sdk", "mailerpb", "grpc", "google", "typing_extensions"}
    wrong = [
        f"{_where(path, line)} imports {module}"
        for path in _sources("client_sdk")
        for line, module in _imports(path)
        if module not in allowed and module not in sys.stdlib_module_names
    ]
    assert not wrong, "\n".join(wrong)


def test_generated_protos_stay_at_the_edges() -> None:
    wrong = [
        f"{_where(path, line)} imports mailerpb"
        for path in _sources(*SERVERS, "client_sdk", "mailers", "mailers_dev")
        for line, module in _imports(path)
        if module == "mailerpb" and str(path.relative_to(ROOT)) not in PROTO_EDGES
    ]
    assert not wrong, "\n".join(wrong)


def test_the_rules_see_what_they_check() -> None:
    # Given a file with a top-level, a lazy and a relative import
    found = dict(
        (module, line)
        for line, module in _imports(ROOT / "mailers" / "cli.py")  # lazy server imports
    )
    # Then all are seen, so a rule over them can fail
    assert {"coordinator", "sender_node", "mailers_runtime"} <= set(found)
    assert set(PROTO_EDGES) <= {str(p.relative_to(ROOT)) for p in _sources(*OURS - {"tests"})}


MAX_FUNCTION_LINES = 60
SHIPPED = (*SERVERS, "client_sdk", "mailers", "mailers_dev", "scripts", "deploy")


def test_no_function_is_longer_than_sixty_lines() -> None:
    long = [
        f"{_where(path, node.lineno)} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for path in _sources(*SHIPPED)
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, "\n".join(long)
