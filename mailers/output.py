"""How the ``mailers`` commands print what they read: ``-o table|wide|json|yaml``.

Data goes to stdout, messages, progress and errors to stderr, so ``-o json | jq``
always reads a document. A table never cuts a cell that names or counts something (an
id, an address, a state, a number, a time): when the terminal is too narrow the line
grows past it (the terminal wraps it, as kubectl's do) and only free text (a job's name,
an SMTP reply) wraps within its column. ``table`` shows the columns most use; ``wide``
every one.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import yaml
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

FORMATS = ("table", "wide", "json", "yaml")

TEXT_MIN_WIDTH = 12
"""The narrowest a free-text column gets before the line grows instead."""


def plain(value: Any) -> Any:
    """A JSON-ready copy of SDK values (dataclasses, enums, datetimes, sequences)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, tuple | list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


def dump(data: Any, fmt: str) -> str:
    """``data`` (already :func:`plain`) as a JSON or YAML document."""
    if fmt == "yaml":
        return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


@dataclasses.dataclass(frozen=True)
class Column:
    header: str
    text: bool = False
    """Free text, which may wrap; every other column is kept whole."""
    wide: bool = False
    """Shown only with ``-o wide``."""
    right: bool = False


def table(columns: Sequence[Column], rows: Sequence[Sequence[str]], wide: bool) -> Table:
    """A table of ``rows`` (cells may hold rich markup) with the columns of the format."""
    shown = [i for i, c in enumerate(columns) if wide or not c.wide]
    out = Table(*(columns[i].header for i in shown), box=box.SIMPLE_HEAD)
    for position, i in enumerate(shown):
        column, spec = out.columns[position], columns[i]
        column.justify = "right" if spec.right else "left"
        if spec.text:
            column.overflow = "fold"
            column.min_width = min(TEXT_MIN_WIDTH, _widest(spec.header, rows, i))
        else:
            column.no_wrap = True
            column.min_width = _widest(spec.header, rows, i)
    for row in rows:
        out.add_row(*(row[i] for i in shown))
    return out


def _widest(header: str, rows: Sequence[Sequence[str]], i: int) -> int:
    cells = [Text.from_markup(row[i]).cell_len for row in rows]
    return max([len(header), *cells])


def print_table(out: Table, console: Console | None = None) -> None:
    """Print on stdout (or ``console``), the line as wide as the whole cells need."""
    console = console or stdout()
    needed = sum((c.min_width or 0) + 3 for c in out.columns) + 1
    if needed > console.width:
        console = Console(
            file=console.file, width=needed, highlight=False, force_terminal=console.is_terminal
        )
    console.print(out)


def stdout() -> Console:
    return Console(file=sys.stdout, highlight=False, soft_wrap=False)


def stderr() -> Console:
    """Messages, progress and errors; never wrapped mid-word (paths and ids stay whole)."""
    return Console(stderr=True, highlight=False, soft_wrap=True)


def output_format(ns: argparse.Namespace) -> str:
    """``-o``, with ``--json`` as a short form of ``-o json``."""
    return "json" if getattr(ns, "json", False) else str(getattr(ns, "output", None) or "table")


def add_output_arguments(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    """``-o/--output`` and ``--json``, before or after the subcommand's name."""
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        help="table (default), wide (every column), json or yaml",
        default=argparse.SUPPRESS if on_subcommand else "table",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="the same as -o json",
        default=argparse.SUPPRESS if on_subcommand else False,
    )
