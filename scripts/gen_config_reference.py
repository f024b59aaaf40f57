"""Generate deploy/CONFIG.md, the configuration reference, from the configuration code.

Usage: python scripts/gen_config_reference.py [--check]

For each process (coordinator, sender node) it walks the config dataclass and its
nested dataclasses, and for every field writes:

- the ``MAILER_*`` variable(s) it comes from, found by parsing ``from_env`` with
  :mod:`ast`: each keyword argument of a config-class call, the ``MAILER_*`` string
  literals in its expression, following local names to their assignments;
- the default: what ``from_env`` yields with no variable set (so the defaults
  ``from_env`` applies win over the dataclass's), or "required" when ``from_env``
  fails without the variable;
- the description: the attribute docstring (the string literal after the field).

Variables read outside ``from_env`` (logging, the CLI) come from :data:`OTHER_VARIABLES`;
``tests/unit/test_config_reference.py`` checks that every ``MAILER_*`` name in the
product code is in one or the other, and that every mapped variable really changes its
field when set. With --check nothing is written; the exit status is 1 when the file
differs from what the code produces.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import coordinator.config  # noqa: E402
import mailers.campaign  # noqa: E402
import sender_node.config  # noqa: E402

OUTPUT = ROOT / "deploy" / "CONFIG.md"
PRODUCT_PACKAGES = ("coordinator", "sender_node", "mailers", "client_sdk")
# A name ends in a letter or digit: ``MAILER_DATABASE_*`` in prose names a family, not a
# variable ``MAILER_DATABASE_``.
_VAR = re.compile(r"\bMAILER_[A-Z0-9_]*[A-Z0-9]\b")


@dataclasses.dataclass(frozen=True)
class Process:
    title: str
    command: str
    module: types.ModuleType
    config_class: type[Any]
    required_samples: Mapping[str, str]
    """A valid value for each variable without which from_env fails."""


PROCESSES = (
    Process(
        "Coordinator",
        "python -m coordinator",
        coordinator.config,
        coordinator.config.CoordinatorConfig,
        {"MAILER_DATABASE_URL": "postgresql://mailers@127.0.0.1:5432/mailers"},
    ),
    Process(
        "Sender node",
        "python -m sender_node",
        sender_node.config,
        sender_node.config.SenderConfig,
        {"MAILER_ETCD_ENDPOINTS": "127.0.0.1:2379", "MAILER_RELAYS": "127.0.0.1:25"},
    ),
)


@dataclasses.dataclass(frozen=True)
class Other:
    read_by: str
    default: str
    description: str


OTHER_VARIABLES: dict[str, Other] = {
    "MAILER_LOG_LEVEL": Other(
        "every process (`mailers.logs.setup`; the sender node also in `from_env`)",
        "`INFO`",
        "Log level: `DEBUG`, `INFO`, `WARNING`, `ERROR`.",
    ),
    "MAILER_LOG_FORMAT": Other(
        "every process (`mailers.logs.setup`)",
        "`text`",
        "`json` writes one JSON object per line (time, level, logger, message, "
        "component, instance, and job/batch/node context).",
    ),
    "MAILER_COORDINATORS": Other(
        "the `mailers` command (`send`, `status`, `nodes`)",
        f"`{mailers.campaign.DEFAULT_COORDINATORS}`",
        "Coordinator addresses the command tries; it finds the leader among them.",
    ),
    "MAILER_TOKEN": Other(
        "the `mailers` command (`send` and the operator commands)",
        "none (auth off)",
        "API token sent as `authorization: Bearer` on every call; a tenant token for "
        "`send` and job commands, an admin token for `status`, `nodes`, `node`.",
    ),
    "MAILER_PLAINTEXT": Other(
        "coordinator and sender node (`mailers.tls.from_env`), the `mailers` command",
        "off",
        "`1` runs gRPC without TLS, for local development only. With neither this nor "
        "the `MAILER_TLS_*` files a coordinator or node refuses to start.",
    ),
    "MAILER_TLS_CA": Other(
        "coordinator, sender node, the `mailers` command, `mailers.healthcheck`",
        "none",
        "CA bundle (PEM) every gRPC peer's certificate must chain to.",
    ),
    "MAILER_TLS_CERT": Other(
        "coordinator, sender node, the `mailers` command, `mailers.healthcheck`",
        "none",
        "This process's certificate (PEM), served and presented as client certificate.",
    ),
    "MAILER_TLS_KEY": Other(
        "coordinator, sender node, the `mailers` command, `mailers.healthcheck`",
        "none",
        "The private key of `MAILER_TLS_CERT` (PEM); never logged.",
    ),
    "MAILER_TLS_CLIENT_AUTH": Other(
        "coordinator (`mailers.tls.from_env`)",
        "`require`",
        "`require`: clients must present a certificate from the CA (mutual TLS); `none`: "
        "server-authenticated TLS, tenant tokens only. Nodes always require one.",
    ),
    "MAILER_TLS_ALLOWED_CLIENTS": Other(
        "coordinator and sender node (`mailers.tls.from_env`)",
        "nodes: `mailers-coordinator`; coordinators: any name",
        "Comma list of certificate names (CN or DNS SAN) a client certificate must carry; "
        "`*` accepts any certificate from the CA.",
    ),
    "MAILER_TLS_SERVER_NAME": Other(
        "coordinator, the `mailers` command",
        "the host of the address dialled",
        "Name checked in the certificate of the servers this process dials (nodes for a "
        "coordinator, coordinators for the command).",
    ),
    "MAILER_ETCD_CA": Other(
        "coordinator and sender node (`mailers.etcd.EtcdTls.from_env`)",
        "none (plaintext etcd)",
        "CA of the etcd members' certificates; with `MAILER_ETCD_CERT` and "
        "`MAILER_ETCD_KEY` (all three or none) etcd is reached over TLS.",
    ),
    "MAILER_ETCD_CERT": Other(
        "coordinator and sender node (`mailers.etcd.EtcdTls.from_env`)",
        "none",
        "Client certificate for etcd; its CN is the etcd user (`mailers-coordinator`, "
        "`mailers-node-<id>`, see `mailers etcd-auth`).",
    ),
    "MAILER_ETCD_KEY": Other(
        "coordinator and sender node (`mailers.etcd.EtcdTls.from_env`)",
        "none",
        "The private key of `MAILER_ETCD_CERT`.",
    ),
    "MAILER_DOMAIN_LIMITS": Other(
        "sender node (`throttle.parse_domain_limits`, sets `domain_limits` and `domain_overrides`)",
        "20 transactions at once per recipient domain, no rate limit",
        "Per recipient domain throttles, e.g. `default=concurrency:20;gmail.com=rate:10,"
        "burst:5,concurrency:4` (keys: rate, burst, concurrency, min_rate, decrease, "
        "increase, recovery, cooldown). A 421/451 reply slows a domain down regardless.",
    ),
    "MAILER_ETCD_SERVER_NAME": Other(
        "coordinator and sender node (`mailers.etcd.EtcdTls.from_env`)",
        "the first endpoint's host",
        "Name checked in the etcd members' certificates when several endpoints are given.",
    ),
}


# ---- reading the code ---------------------------------------------------------------


def attribute_docs(cls: type[Any]) -> dict[str, str]:
    """Field name -> the string literal right after the field in cls's source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for stmt, after in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(stmt.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


@dataclasses.dataclass(frozen=True)
class Source:
    variable: str
    derived: bool
    """True when the field is computed from the variable (e.g. a share of it), not read
    as it is."""


def env_sources(process: Process) -> dict[str, list[Source]]:
    """Field path (``etcd.lease_ttl_s``) -> the variables from_env builds it from."""
    func = process.module.from_env
    tree = ast.parse(textwrap.dedent(inspect.getsource(func)))
    fdef = tree.body[0]
    assert isinstance(fdef, ast.FunctionDef)
    assigned: dict[str, ast.expr] = {}
    for node in ast.walk(fdef):
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                assigned[target.id] = node.value

    def is_config_call(expr: ast.expr) -> bool:
        if not (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name)):
            return False
        obj = getattr(process.module, expr.func.id, None)
        return isinstance(obj, type) and dataclasses.is_dataclass(obj)

    def variables(expr: ast.AST, derived: bool, seen: frozenset[str]) -> Iterator[Source]:
        if isinstance(expr, ast.Constant) and isinstance(expr.value, str):
            if _VAR.fullmatch(expr.value):
                yield Source(expr.value, derived)
            return
        if isinstance(expr, ast.Name) and expr.id in assigned and expr.id not in seen:
            yield from variables(assigned[expr.id], derived, seen | {expr.id})
            return
        through = (
            derived
            or isinstance(expr, ast.BinOp)
            or (
                isinstance(expr, ast.Call)
                and isinstance(expr.func, ast.Name)
                and expr.func.id in {"min", "max"}
            )
        )
        for child in ast.iter_child_nodes(expr):
            yield from variables(child, through, seen)

    out: dict[str, list[Source]] = {}

    def walk_call(call: ast.Call, prefix: str) -> None:
        for kw in call.keywords:
            assert kw.arg is not None
            value = kw.value
            if isinstance(value, ast.Name) and value.id in assigned:
                if is_config_call(assigned[value.id]):
                    value = assigned[value.id]
            path = f"{prefix}{kw.arg}"
            if is_config_call(value):
                assert isinstance(value, ast.Call)
                walk_call(value, f"{path}.")
                continue
            found: dict[str, Source] = {}
            for source in variables(value, False, frozenset()):
                found.setdefault(source.variable, source)
            if found:
                out[path] = list(found.values())

    returns = [n for n in ast.walk(fdef) if isinstance(n, ast.Return) and n.value is not None]
    assert len(returns) == 1, "from_env must have exactly one return"
    result = returns[0].value
    assert isinstance(result, ast.Call)
    walk_call(result, "")
    return out


class _Pid(int):
    """A PID that prints as ``<pid>``, so defaults built from it read as templates."""

    def __format__(self, spec: str) -> str:
        return "<pid>"

    def __str__(self) -> str:
        return "<pid>"


def build(process: Process, environ: Mapping[str, str]) -> Any:
    """Call the process's from_env on environ, with placeholder host name and PID."""
    from_env: Callable[..., Any] = process.module.from_env
    params = inspect.signature(from_env).parameters
    kwargs: dict[str, Any] = {}
    if "hostname" in params:
        kwargs["hostname"] = "<hostname>"
    if "pid" in params:
        kwargs["pid"] = _Pid(0)
    return from_env(environ, **kwargs)


def field_value(config: Any, path: str) -> Any:
    value = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def required_variables(process: Process) -> set[str]:
    required = set()
    for name in process.required_samples:
        env = {k: v for k, v in process.required_samples.items() if k != name}
        try:
            build(process, env)
        except ValueError:
            required.add(name)
    return required


def product_variables() -> dict[str, set[str]]:
    """Every ``MAILER_*`` name in the product code -> the files that mention it."""
    found: dict[str, set[str]] = {}
    for package in PRODUCT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for name in _VAR.findall(path.read_text()):
                found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


# ---- rendering ----------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _show(value: Any) -> str:
    if isinstance(value, timedelta):
        return f"`{value.total_seconds():g}` s"
    if isinstance(value, tuple):
        return "`" + ",".join(str(v) for v in value) + "`" if value else "empty"
    if value is None or value == "":
        return "empty"
    if isinstance(value, float) and value.is_integer():
        return f"`{value:g}`"
    return f"`{value}`"


@dataclasses.dataclass(frozen=True)
class Row:
    path: str
    type_name: str
    sources: list[Source]
    default: str
    description: str


def rows(process: Process) -> list[Row]:
    sources = env_sources(process)
    required = required_variables(process)
    defaults = build(process, process.required_samples)
    out: list[Row] = []

    def walk(cls: type[Any], prefix: str) -> None:
        docs = attribute_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            tp = hints[f.name]
            if isinstance(tp, type) and dataclasses.is_dataclass(tp):
                walk(tp, f"{path}.")
                continue
            srcs = sources.get(path, [])
            if any(s.variable in required for s in srcs):
                default = "**required**"
            else:
                default = _show(field_value(defaults, path))
            out.append(Row(path, _type_name(tp), srcs, default, docs.get(f.name, "")))

    walk(process.config_class, "")
    return out


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_reference.py from coordinator/config.py and",
        "     sender_node/config.py. Do not edit: run `python scripts/gen_config_reference.py`.",
        "     tests/unit/test_config_reference.py fails when this file is stale. -->",
        "",
        "Every process reads its configuration from `MAILER_*` environment variables, in one",
        "place (`from_env` in its `config.py`). Defaults are what the process uses when the",
        "variable is unset or empty. Durations ending in `_S` are seconds.",
        "Fields no variable sets are listed too, so every option is here.",
    ]
    for process in PROCESSES:
        table = rows(process)
        module = process.module.__name__
        lines += [
            "",
            f"## {process.title} (`{process.command}`)",
            "",
            f"Read by `{module}.from_env` into `{process.config_class.__name__}`.",
            "",
            "| Variable | Default | Field | Description |",
            "| --- | --- | --- | --- |",
        ]
        fixed = []
        for row in table:
            if not row.sources:
                fixed.append(row)
                continue
            names = ", ".join(
                f"`{s.variable}`" + (" (derived)" if s.derived else "") for s in row.sources
            )
            lines.append(
                f"| {names} | {row.default} | `{row.path}`: {_escape(row.type_name)} "
                f"| {_escape(row.description) or '—'} |"
            )
        if fixed:
            lines += [
                "",
                "Not set by any variable:",
                "",
                "| Field | Value | Description |",
                "| --- | --- | --- |",
            ]
            for row in fixed:
                lines.append(
                    f"| `{row.path}`: {_escape(row.type_name)} | {row.default} "
                    f"| {_escape(row.description) or '—'} |"
                )
    lines += [
        "",
        "## Other variables",
        "",
        "Read outside `from_env`.",
        "",
        "| Variable | Default | Read by | Description |",
        "| --- | --- | --- | --- |",
    ]
    for name, other in sorted(OTHER_VARIABLES.items()):
        lines.append(f"| `{name}` | {other.default} | {other.read_by} | {other.description} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail when the file is stale")
    ns = parser.parse_args(argv)
    text = render()
    if ns.check:
        current = OUTPUT.read_text() if OUTPUT.exists() else ""
        if current != text:
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                str(OUTPUT.relative_to(ROOT)),
                "generated",
            )
            sys.stdout.writelines(diff)
            print(
                f"{OUTPUT.relative_to(ROOT)} is stale: run python scripts/gen_config_reference.py"
            )
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
