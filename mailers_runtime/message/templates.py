"""The Jinja sandbox every template runs in, and templates compiled into fields.

Everything a template may and may not do is decided here, in one place; the compiler
(:mod:`mailers_runtime.message.compiler`) only feeds it sources and values.

Templates are Jinja2, run in an :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`
restricted further (see :func:`~mailers_runtime.message.compiler.check_templates`,
which the coordinator calls at submit):

- Allowed: ``{{ expressions }}`` with the filters in :data:`ALLOWED_FILTERS` and the
  string methods in :data:`ALLOWED_STR_METHODS`, ``{% if %}``, ``{% for %}`` (one level,
  not ``recursive``), ``{% filter %}``, ``{% raw %}``, ``{% autoescape %}``, comments.
- Rejected at compile time: ``set``, ``with``, ``macro``, ``call``, ``block``,
  ``extends``, ``include``, ``import``, nested loops, unknown filters, and any
  attribute or item whose name starts with ``_`` (or is one of Python's internal
  frame/code attributes). What the sandbox only sees at render time (an unsafe
  attribute reached through a computed name, a disallowed method) fails the recipient
  with a :class:`~mailers_runtime.message.model.RenderError`.
- Resources: string repetition, ``join`` and ``replace`` may not build a value above
  ``RenderLimits.max_value_chars``, ``**`` and ``%``-formatting are bounded, and each
  rendered field stops at ``RenderLimits.max_output_chars``. Without assignments or
  nested loops, no template can grow a value exponentially.
- Missing variables render empty (Jinja's default ``Undefined``), so a CSV row with an
  empty or absent column still gets its message; write ``{{ name | default("there") }}``
  for a fallback. Using a missing variable in any other way (an attribute, a call) fails
  that recipient. :func:`~mailers_runtime.message.compiler.template_variables` lists the
  names a job's templates use.

Values are HTML-escaped in the HTML body (autoescape, HTML only, :func:`escape_html` on
the fast path) and percent-encoded in the unsubscribe URL (:func:`url_quote`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import markupsafe
from jinja2 import Template as JinjaTemplate
from jinja2 import filters as jinja_filters
from jinja2 import nodes
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import (
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
    ImmutableSandboxedEnvironment,
)
from jinja2.utils import pass_eval_context

from mailers_runtime.message.model import RenderError, RenderLimits
from mailers_runtime.message.text import QpPieces, encode_qp

_FORMAT_WIDTH = re.compile(r"%[-#0 +]*(?:\*|\d{4,})|%[-#0 +]*\d*\.(?:\*|\d{4,})")

# Jinja filters a template may use: none can grow a value more than linearly, except
# ``join`` and ``replace``, which are wrapped with a size check.
ALLOWED_FILTERS = frozenset(
    (
        "abs", "capitalize", "count", "d", "default", "e", "escape", "first", "float",
        "forceescape", "int", "join", "last", "length", "list", "lower", "max", "min",
        "replace", "reverse", "round", "safe", "sort", "string", "striptags", "title",
        "tojson", "trim", "truncate", "unique", "upper", "urlencode", "wordcount",
    )
)  # fmt: skip
# ``str`` methods a template may call (``name.split(",")``); padding and formatting
# methods are left out because one call can allocate gigabytes.
ALLOWED_STR_METHODS = frozenset(
    (
        "capitalize", "casefold", "count", "endswith", "find", "isalnum", "isalpha",
        "isdecimal", "isdigit", "islower", "isnumeric", "isspace", "istitle", "isupper",
        "join", "lower", "lstrip", "partition", "removeprefix", "removesuffix", "replace",
        "rfind", "rpartition", "rsplit", "rstrip", "split", "splitlines", "startswith",
        "strip", "swapcase", "title", "upper",
    )
)  # fmt: skip
_UNSAFE_NAMES = frozenset(
    {"mro", "func_globals", "func_code", "f_globals", "f_locals", "f_builtins", "f_code"}
    | UNSAFE_GENERATOR_ATTRIBUTES
    | UNSAFE_COROUTINE_ATTRIBUTES
    | UNSAFE_ASYNC_GENERATOR_ATTRIBUTES
)
# The only functions a template may call (besides allowed methods); range is left out
# because it makes 100,000-step loops from nothing.
_GLOBALS = frozenset({"dict", "cycler", "joiner"})
_FORBIDDEN_NODES: tuple[tuple[type[nodes.Node], str], ...] = (
    (nodes.Extends, "extends"),
    (nodes.Include, "include"),
    (nodes.Import, "import"),
    (nodes.FromImport, "import"),
    (nodes.Macro, "macro"),
    (nodes.CallBlock, "call"),
    (nodes.Block, "block"),
    (nodes.Assign, "set"),
    (nodes.AssignBlock, "set"),
    (nodes.With, "with"),
)
# The bytes urllib.parse.quote encodes with safe="": all but RFC 3986's unreserved ones.
_NOT_UNRESERVED = re.compile(rb"[^A-Za-z0-9_.~-]")
_PERCENT = tuple(f"%{b:02X}".encode() for b in range(256))


def url_quote(value: object) -> str:
    """``value`` percent-encoded for the unsubscribe URL: ``urllib.parse.quote(value,
    safe="")``, at a third of its cost (it looks every byte up; this only the few to
    encode, an address's ``@`` say)."""
    return _NOT_UNRESERVED.sub(_percent, str(value).encode()).decode("ascii")


def _percent(match: re.Match[bytes]) -> bytes:
    return _PERCENT[match[0][0]]


class _Undefined(Undefined):
    """A missing variable renders empty; an attribute the sandbox refused is an error."""

    __slots__ = ()

    def __str__(self) -> str:
        if self._undefined_exception is SecurityError:
            self._fail_with_undefined_error()
        return ""


class Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox, minus everything that can allocate without bound."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def __init__(self, limits: RenderLimits, **options: Any) -> None:
        super().__init__(
            undefined=_Undefined,
            keep_trailing_newline=True,
            auto_reload=False,
            cache_size=0,
            **options,
        )
        self._max_value = limits.max_value_chars
        self.globals = {name: value for name, value in self.globals.items() if name in _GLOBALS}
        self.filters = {name: f for name, f in self.filters.items() if name in ALLOWED_FILTERS}
        self.filters["join"] = self._join_filter
        self.filters["replace"] = self._replace_filter

    def _check_size(self, size: int, what: str) -> None:
        if size > self._max_value:
            raise SecurityError(f"{what} would build {size} characters (limit {self._max_value})")

    def _bounded(self, items: Iterable[Any], separator: str) -> list[Any]:
        out: list[Any] = []
        size = 0
        for item in items:
            size += (len(item) if isinstance(item, str) else 20) + len(separator)
            self._check_size(size, "join")
            out.append(item)
        return out

    @pass_eval_context
    def _join_filter(self, eval_ctx: Any, value: Iterable[Any], d: str = "", **kw: Any) -> str:
        return str(jinja_filters.do_join(eval_ctx, self._bounded(value, str(d)), d, **kw))

    @pass_eval_context
    def _replace_filter(
        self, eval_ctx: Any, s: str, old: str, new: str, count: int | None = None
    ) -> str:
        self._check_size(_replaced_size(str(s), str(old), str(new), count), "replace")
        return jinja_filters.do_replace(eval_ctx, s, old, new, count)

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str) and attr not in ALLOWED_STR_METHODS:
            return False
        return super().is_safe_attribute(obj, attr, value)

    def wrap_str_format(self, value: Any) -> None:
        # str.format is not in ALLOWED_STR_METHODS; never hand out a wrapper for it.
        return None

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        owner = getattr(__obj, "__self__", None)
        if isinstance(owner, str):
            method = getattr(__obj, "__name__", "")
            if method == "replace" and len(args) >= 2:
                count = args[2] if len(args) > 2 and isinstance(args[2], int) else None
                __self._check_size(
                    _replaced_size(owner, str(args[0]), str(args[1]), count), "replace"
                )
            elif method == "join" and args:
                args = (__self._bounded(args[0], owner), *args[1:])
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(count, int):
                    self._check_size(len(seq) * max(count, 0), "repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int):
                if abs(right) > 1024 or max(left.bit_length(), 1) * abs(right) > 65536:
                    raise SecurityError("the result of ** would be too large")
        elif operator == "%" and isinstance(left, str) and _FORMAT_WIDTH.search(left):
            raise SecurityError("%-formatting with a width or precision of 1000 or more")
        return super().call_binop(context, operator, left, right)


def _replaced_size(s: str, old: str, new: str, count: int | None) -> int:
    hits = s.count(old) if old else len(s) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


def _policy_problems(tree: nodes.Template) -> list[str]:
    """What the sandbox does not allow in ``tree``, statically (see the module doc)."""
    problems: list[str] = []
    for node_type, what in _FORBIDDEN_NODES:
        for node in tree.find_all(node_type):
            problems.append(f"line {node.lineno}: {{% {what} %}} is not allowed")
    for loop in tree.find_all(nodes.For):
        if loop.recursive:
            problems.append(f"line {loop.lineno}: recursive loops are not allowed")
        inner = next(iter(loop.find_all(nodes.For)), None)
        if inner is not None:
            problems.append(f"line {inner.lineno}: nested loops are not allowed")
    names: list[tuple[int, str]] = [(n.lineno, n.attr) for n in tree.find_all(nodes.Getattr)]
    for item in tree.find_all(nodes.Getitem):
        if isinstance(item.arg, nodes.Const) and isinstance(item.arg.value, str):
            names.append((item.lineno, item.arg.value))
    for lineno, name in names:
        if name.startswith("_") or name in _UNSAFE_NAMES:
            problems.append(f"line {lineno}: access to {name!r} is unsafe")
    for call in tree.find_all(nodes.Call):
        if isinstance(call.node, nodes.Name) and call.node.name not in _GLOBALS:
            problems.append(f"line {call.lineno}: there is no function {call.node.name!r}")
    return problems


class Environments:
    """The four sandboxes, one per kind of output."""

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.html = Sandbox(limits, autoescape=True)
        self.text = Sandbox(limits, autoescape=False)
        self.url = Sandbox(limits, autoescape=False, finalize=url_quote)


def escape_html(value: str) -> str:
    """``value`` HTML-escaped, as autoescape would."""
    return markupsafe.escape(value)


class Field:
    """One compiled template: subject, a body, a header value or the unsubscribe URL.

    Templates made only of text and ``{{ name }}`` holes (nearly all of them) are
    rendered by joining strings, with exactly Jinja's output; the rest run Jinja's
    compiled code from the sandbox.
    """

    def __init__(
        self,
        where: str,
        literals: tuple[str, ...],
        names: tuple[str, ...],
        escape: Callable[[str], str] | None,
        template: JinjaTemplate | None,
        max_output_chars: int,
    ) -> None:
        self.where = where
        self.literals = literals
        self.names = names
        self._escape = escape
        self._template = template
        self._max = max_output_chars
        self._literal_chars = sum(len(literal) for literal in literals)
        # HTML escaping turns one character into at most 6 (&#34;).
        self._growth = 6 if escape is escape_html else 1
        self._qp: QpPieces | None = None
        """The literals for :meth:`render_qp`, made at its first call (only bodies
        need them)."""

    @property
    def static(self) -> bool:
        """True when the output never depends on the recipient."""
        return self._template is None and not self.names

    def render(self, values: Mapping[str, str]) -> str:
        """The field for one recipient.

        Raises:
            RenderError: the template failed (a sandbox refusal, a type error, the
                output limit).
        """
        if self._template is not None:
            return self._render_jinja(values)
        literals = self.literals
        if not self.names:
            return literals[0]
        self._check_size(values)
        escape = self._escape
        parts = [literals[0]]
        for i, name in enumerate(self.names, 1):
            value = values.get(name)
            if value:
                parts.append(escape(value) if escape is not None else value)
            parts.append(literals[i])
        return "".join(parts)

    def render_qp(self, values: Mapping[str, str]) -> bytes:
        """``encode_qp(self.render(values))``, with the lines no value is on encoded
        once per field (:class:`~mailers_runtime.message.text.QpPieces`).

        Raises:
            RenderError: as :meth:`render`.
        """
        if self._template is not None or not self.names:
            return encode_qp(self.render(values))
        pieces = self._qp
        if pieces is None:
            pieces = self._qp = QpPieces(self.literals)
        encoded = pieces.encode(self._values(values))
        return encoded if encoded is not None else encode_qp(self.render(values))

    def _values(self, values: Mapping[str, str]) -> list[str]:
        """The values of :attr:`names`, escaped ("" for a missing one), once their
        output is known to fit."""
        self._check_size(values)
        names = self.names
        escape = self._escape
        if escape is None:
            return [values.get(name) or "" for name in names]
        return [escape(value) if (value := values.get(name)) else "" for name in names]

    def _check_size(self, values: Mapping[str, str]) -> None:
        names = self.names
        size = self._literal_chars + self._growth * sum(len(values.get(n, "")) for n in names)
        if size > self._max:
            raise RenderError(f"{self.where}: rendered text would exceed {self._max} characters")

    def _render_jinja(self, values: Mapping[str, str]) -> str:
        template = self._template
        assert template is not None
        parts: list[str] = []
        size = 0
        try:
            for chunk in template.root_render_func(template.new_context(dict(values))):
                size += len(chunk)
                if size > self._max:
                    raise RenderError(f"{self.where}: rendered text exceeds {self._max} characters")
                parts.append(chunk)
        except RenderError:
            raise
        except SecurityError as exc:
            raise RenderError(f"{self.where}: not allowed by the sandbox: {exc}") from None
        except Exception as exc:  # a template can raise anything a Python operator can
            raise RenderError(f"{self.where}: {type(exc).__name__}: {exc}") from None
        return "".join(parts)


def _simple_parts(tree: nodes.Template) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """Literals and names when ``tree`` is only text and ``{{ name }}``, else None."""
    literals = [""]
    names: list[str] = []
    for statement in tree.body:
        if not isinstance(statement, nodes.Output):
            return None
        for node in statement.nodes:
            if isinstance(node, nodes.TemplateData):
                literals[-1] += node.data
            elif isinstance(node, nodes.Name) and node.ctx == "load":
                names.append(node.name)
                literals.append("")
            else:
                return None
    return tuple(literals), tuple(names)


def compile_field(
    env: Sandbox,
    source: str,
    where: str,
    escape: Callable[[str], str] | None,
    limits: RenderLimits,
    check: Callable[[nodes.Template], list[str]] | None = None,
) -> Field:
    """``source`` compiled in ``env`` after the sandbox policy and ``check`` allow it.

    Raises:
        RenderError: a syntax error, an unknown filter or what the policy refuses; the
            message starts with ``where``.
    """
    try:
        tree = env.parse(source)
    except TemplateSyntaxError as exc:
        raise RenderError(f"{where}: line {exc.lineno}: {exc.message}") from None
    problems = _policy_problems(tree) + (check(tree) if check is not None else [])
    if problems:
        raise RenderError(f"{where}: " + "; ".join(problems))
    simple = _simple_parts(tree)
    if simple is not None:
        return Field(where, simple[0], simple[1], escape, None, limits.max_output_chars)
    try:
        template = env.from_string(tree)
    except TemplateSyntaxError as exc:  # e.g. an unknown filter
        raise RenderError(f"{where}: line {exc.lineno}: {exc.message}") from None
    return Field(where, ("",), (), None, template, limits.max_output_chars)
