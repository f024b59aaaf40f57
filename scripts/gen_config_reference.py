"""Generate deploy/CONFIG.md, the configuration reference, from the settings declarations.

Usage: python scripts/gen_config_reference.py [--check]

For each process (coordinator, sender node) it imports the config class and walks the
declarations of its fields (``mailers_runtime.settings.declarations``): every
``MAILER_*`` variable with the field it sets, and for each

- the default: what ``from_env`` yields with no variable set (so computed defaults,
  such as the node id, show as templates), shown as the variable spells it, or
  "required" when ``from_env`` fails without the variable;
- the description: the attribute docstring of the field (the string literal after it
  in its class).

Fields no variable sets are listed too. Variables read outside the declarations
(logging, the CLI) come from :data:`OTHER_VARIABLES`;
``tests/unit/test_config_reference.py`` checks that every ``MAILER_*`` name in the
product code is declared or listed there, and that every declared variable really
changes its field when set. With --check nothing is written; the exit status is 1 when
the file differs from what the code produces.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import enum
import inspect
import re
import sys
import textwrap
import types
import typing
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import coordinator.config  # noqa: E402
import mailers.config  # noqa: E402
import sender_node.config  # noqa: E402
from mailers_runtime import settings  # noqa: E402

OUTPUT = ROOT / "deploy" / "CONFIG.md"
PRODUCT_PACKAGES = ("coordinator", "sender_node", "mailers_runtime", "mailers", "client_sdk")
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
        "every process (`mailers_runtime.logs.setup`; the sender node also declares it)",
        "`INFO`",
        "Log level: `DEBUG`, `INFO`, `WARNING`, `ERROR`.",
    ),
    "MAILER_LOG_FORMAT": Other(
        "every process (`mailers_runtime.logs.setup`)",
        "`text`",
        "`json` writes one JSON object per line (time, level, logger, message, "
        "component, instance, and job/batch/node context).",
    ),
    "MAILER_COORDINATORS": Other(
        "the `mailers` command (`send`, `status`, `nodes`)",
        f"`{','.join(mailers.config.DEFAULT_COORDINATORS)}`",
        "Coordinator addresses the command tries; it finds the leader among them.",
    ),
    "MAILER_CONTEXT": Other(
        "the `mailers` command",
        "the config file's `current_context`",
        "Which context of the config file (`$MAILERS_CONFIG`, else "
        "`~/.config/mailers/config.toml`) the command uses; `--context` overrides it.",
    ),
    "MAILER_TOKEN": Other(
        "the `mailers` command (`send` and the operator commands)",
        "none (auth off)",
        "API token sent as `authorization: Bearer` on every call; a tenant token for "
        "`send` and job commands, an admin token for `status`, `nodes`, `node`.",
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


def env_sources(process: Process) -> dict[str, list[Source]]:
    """Field path (``etcd.lease_ttl_s``) -> the variables declared for it."""
    out: dict[str, list[Source]] = {}
    for declared in settings.declarations(process.config_class):
        out.setdefault(declared.path, []).append(Source(declared.variable.name))
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
    """The value at a dotted path; None below an absent (None) value."""
    value = config
    for part in path.split("."):
        if value is None:
            return None
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


def _unset_instance(value: Any) -> bool:
    """A dataclass value equal to its class's own defaults (what "unset" gives)."""
    if not dataclasses.is_dataclass(value) or isinstance(value, type):
        return False
    try:
        return bool(value == type(value)())
    except TypeError:  # the class has required fields
        return False


def _show(value: Any) -> str:
    """A value as its variable spells it."""
    if isinstance(value, timedelta):
        return f"`{value.total_seconds():g}` s"
    if isinstance(value, tuple):
        return "`" + ",".join(str(v) for v in value) + "`" if value else "empty"
    if value is None or value == "" or value == {} or _unset_instance(value):
        return "empty"
    if isinstance(value, bool):
        return f"`{int(value)}`"
    if isinstance(value, enum.Enum):
        return f"`{value.value}`"
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


def _default(value: Any, declared: settings.Declared | None) -> str:
    show = declared.variable.show if declared is not None else None
    return f"`{show(value)}`" if show is not None else _show(value)


def rows(process: Process) -> list[Row]:
    """One row per field, declared or not, in field order."""
    declared = {d.path: d for d in settings.declarations(process.config_class)}
    required = required_variables(process)
    defaults = build(process, process.required_samples)
    out: list[Row] = []

    def walk(cls: type[Any], prefix: str) -> None:
        docs = attribute_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            path = f"{prefix}{f.name}"
            tp = hints[f.name]
            inner = settings.nested_class(f)
            if path not in declared and (inner or dataclasses.is_dataclass(tp)):
                walk(inner or tp, f"{path}.")
                continue
            here = declared.get(path)
            sources = [Source(here.variable.name)] if here is not None else []
            if here is not None and here.variable.name in required:
                default = "**required**"
            else:
                default = _default(field_value(defaults, path), here)
            out.append(Row(path, _type_name(tp), sources, default, docs.get(f.name, "")))

    walk(process.config_class, "")
    return out


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def _process_section(process: Process) -> list[str]:
    table = rows(process)
    lines = [
        "",
        f"## {process.title} (`{process.command}`)",
        "",
        f"Read by `{process.module.__name__}.from_env` into `{process.config_class.__name__}`.",
        "",
        "| Variable | Default | Field | Description |",
        "| --- | --- | --- | --- |",
    ]
    for row in table:
        if row.sources:
            names = ", ".join(f"`{s.variable}`" for s in row.sources)
            lines.append(
                f"| {names} | {row.default} | `{row.path}`: {_escape(row.type_name)} "
                f"| {_escape(row.description) or '—'} |"
            )
    fixed = [row for row in table if not row.sources]
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
    return lines


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated by scripts/gen_config_reference.py from the settings declarations",
        "     of coordinator/config.py and sender_node/config.py (and the classes they nest).",
        "     Do not edit: run `python scripts/gen_config_reference.py`.",
        "     tests/unit/test_config_reference.py fails when this file is stale. -->",
        "",
        "Every process reads its configuration from `MAILER_*` environment variables, in one",
        "place (`from_env` in its `config.py`), each declared once on the field it sets",
        "(`mailers_runtime.settings`). Defaults are what the process uses when the variable",
        "is unset or empty. Durations ending in `_S` are seconds.",
        "Fields no variable sets are listed too, so every option is here.",
    ]
    for process in PROCESSES:
        lines += _process_section(process)
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
