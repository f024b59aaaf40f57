"""Settings declared once: each option's variable, parser and default sit on its field.

A process's configuration is a tree of frozen dataclasses made with :func:`config`. A
field made with :func:`setting` comes from one ``MAILER_*`` variable, and its default
is the field's own, so a configuration built in code and one read from the environment
cannot disagree. A field made with :func:`nested` holds another dataclass, read
through that class's own declarations and through :class:`Variable` s given there for
its fields: for classes that declare none (``BackoffPolicy``) or that serve several
families of variables (``TlsFiles``: gRPC's and etcd's). An ``optional`` nested value
stays at its default (None) unless one of its variables is set.

:func:`load`, called by each process's ``from_env``, is the one reader of the
environment:

- an unset, empty or blank variable means the default; without a default it is
  required;
- a value the parser refuses raises :class:`ConfigError` naming the variable and why;
- cross-field checks stay in each class's ``__post_init__``; a plain ``ValueError``
  raised there becomes a :class:`ConfigError` naming the variables that were set.

The parsers here are the only ones: :func:`text`, :func:`integer`, :func:`number`,
:func:`boolean`, :func:`duration`, :func:`listed`, :func:`choice`, :func:`path` and
:func:`existing_file`. Each takes the stripped text and raises ``ValueError`` saying
why it is wrong. ``deploy/CONFIG.md`` is generated from :func:`declarations`.
"""

from __future__ import annotations

import dataclasses
import enum
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from mailers_runtime.errors import ConfigError

__all__ = [
    "ConfigError",
    "Declared",
    "Variable",
    "boolean",
    "choice",
    "config",
    "declarations",
    "duration",
    "existing_file",
    "integer",
    "listed",
    "load",
    "nested",
    "nested_class",
    "number",
    "path",
    "setting",
    "text",
    "variable_names",
]

T = TypeVar("T")
E = TypeVar("E", bound=enum.Enum)

MISSING: Any = dataclasses.MISSING
"""No value: a variable unset, or a field without a default."""
_KEY = "mailers_runtime.settings"
"""Where a field's declaration sits in its metadata."""
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


# ---- parsers --------------------------------------------------------------------------


def text(raw: str) -> str:
    """The text itself."""
    return raw


def integer(raw: str) -> int:
    """A decimal integer."""
    try:
        return int(raw)
    except ValueError:
        raise ValueError("not an integer") from None


def number(raw: str) -> float:
    """A decimal number."""
    try:
        return float(raw)
    except ValueError:
        raise ValueError("not a number") from None


def boolean(raw: str) -> bool:
    """``1``, ``true``, ``yes``, ``on`` or ``0``, ``false``, ``no``, ``off`` (any case)."""
    flag = raw.strip().lower()
    if flag in _TRUE:
        return True
    if flag in _FALSE:
        return False
    raise ValueError("not a boolean (1, true, yes, on or 0, false, no, off)")


def duration(raw: str) -> timedelta:
    """A number of seconds, as a timedelta."""
    try:
        return timedelta(seconds=number(raw))
    except OverflowError:
        raise ValueError("too many seconds") from None


def listed(raw: str) -> tuple[str, ...]:
    """Comma-separated items, each stripped; empty items are dropped."""
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def path(raw: str) -> Path:
    """A file system path, not checked (the file is read later, by its user)."""
    return Path(raw)


def existing_file(raw: str) -> Path:
    """A path that names a file now."""
    found = Path(raw)
    if not found.is_file():
        raise ValueError("no such file")
    return found


def choice(kind: type[E]) -> Callable[[str], E]:
    """A parser of the values of the enum ``kind`` (case-insensitive)."""

    def parse(raw: str) -> E:
        try:
            return kind(raw.lower())
        except ValueError:
            raise ValueError("expected " + " or ".join(str(m.value) for m in kind)) from None

    return parse


# ---- declarations -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variable:
    """One environment variable and how its text becomes a value."""

    name: str
    parse: Callable[..., Any] = text
    """Text (stripped, never empty) to value; raises ``ValueError`` with the reason."""
    quote: bool = True
    """Repeat the value in error messages. False for values that may hold a secret or
    whose parser names the bad part itself (lists of entries)."""
    show: Callable[[Any], str] | None = None
    """The field's value as this variable spells it, for the reference (seconds as
    days); None: the value itself."""
    with_environ: bool = False
    """The parser also takes the environment (a relay's ``password_env`` names another
    variable)."""

    def read(self, environ: Mapping[str, str]) -> Any:
        """The parsed value, or :data:`MISSING` when the variable is unset or blank.

        Raises:
            ConfigError: the parser refused the value; the message names the variable.
        """
        raw = environ.get(self.name, "").strip()
        if not raw:
            return MISSING
        try:
            return self.parse(raw, environ) if self.with_environ else self.parse(raw)
        except ValueError as exc:
            value = f"={raw!r}" if self.quote else ""
            raise ConfigError(f"{self.name}{value}: {exc}") from None


@dataclasses.dataclass(frozen=True)
class _Single:
    variable: Variable


@dataclasses.dataclass(frozen=True)
class _Nested:
    cls: type[Any]
    members: Mapping[str, Variable]
    optional: bool
    alone_ignored: frozenset[str]

    def needed(self) -> list[str]:
        """Members whose field has no default in :attr:`cls`."""
        return [
            f.name
            for f in dataclasses.fields(self.cls)
            if f.name in self.members and _default(f) is MISSING
        ]

    def read(self, environ: Mapping[str, str], default: Any, defaults: Mapping[str, Any]) -> Any:
        found = {name: var.read(environ) for name, var in self.members.items()}
        found = {name: value for name, value in found.items() if value is not MISSING}
        needed = self.needed()
        if self.optional and not any(name in found for name in needed):
            stray = [name for name in found if name not in self.alone_ignored]
            if stray:
                raise ConfigError(f"{self._names(stray)} set without {self._names(needed)}")
            return default
        base = {} if default is MISSING or default is None else _init_values(default)
        missing = [name for name in needed if name not in found and name not in base]
        if missing and self.optional:
            raise ConfigError(f"{self._names(needed)} go together; missing: {self._names(missing)}")
        if missing:
            raise ConfigError(f"{self._names(missing)}: required")
        given = [self.members[name].name for name in found]
        return _load(self.cls, environ, {**base, **defaults, **found}, given)

    def _names(self, fields: Iterable[str]) -> str:
        return ", ".join(self.members[name].name for name in fields)


def setting(
    name: str,
    *,
    default: Any = MISSING,
    default_factory: Any = MISSING,
    parse: Callable[..., Any] = text,
    quote: bool = True,
    show: Callable[[Any], str] | None = None,
    with_environ: bool = False,
) -> Any:
    """A field read from the variable ``name`` (see :class:`Variable` for the options).

    Args:
        name: The ``MAILER_*`` variable.
        default: The field's default, used when the variable is unset; none makes the
            variable required (and the field a required argument).
        default_factory: Instead of ``default``, for mutable values.
        parse: Text to value (:func:`integer`, :func:`boolean`...).
        quote: Repeat a refused value in the error message.
        show: The value as the variable spells it, for the reference.
        with_environ: ``parse`` takes the environment as second argument.
    """
    declared = _Single(Variable(name, parse, quote, show, with_environ))
    return dataclasses.field(
        default=default, default_factory=default_factory, metadata={_KEY: declared}
    )


def nested(
    cls: type[Any],
    *,
    default: Any = MISSING,
    optional: bool = False,
    alone_ignored: Iterable[str] = (),
    **members: Variable,
) -> Any:
    """A field holding a ``cls``, read through ``cls``'s own declarations and
    ``members`` (variables for fields of ``cls``, by field name).

    Args:
        cls: A dataclass.
        default: The field's default instance; its values are the defaults of the
            variables (so one class serves processes with different defaults).
        optional: The value stays ``default`` (None) unless a member is set; then every
            member whose field has no default must be set too.
        alone_ignored: Optional members that may be set without the others (then they
            are ignored); any other member set alone is an error.
        members: Variables of fields of ``cls``.
    """
    declared = _Nested(cls, dict(members), optional, frozenset(alone_ignored))
    return dataclasses.field(default=default, metadata={_KEY: declared})


@typing.dataclass_transform(
    frozen_default=True, field_specifiers=(dataclasses.field, dataclasses.Field, setting, nested)
)
def config(cls: type[T]) -> type[T]:
    """A frozen dataclass whose fields may be declared with :func:`setting` and
    :func:`nested` (both return ``dataclasses.field``)."""
    return dataclasses.dataclass(frozen=True)(cls)


# ---- reading ------------------------------------------------------------------------------


def load(cls: type[T], environ: Mapping[str, str], defaults: Mapping[str, Any] | None = None) -> T:
    """Build ``cls`` from ``environ`` through its declarations.

    Args:
        cls: A dataclass declared with :func:`setting` and :func:`nested`; undeclared
            fields keep their defaults.
        environ: Usually ``os.environ``.
        defaults: By dotted field path (``"smtp.helo_name"``), values that replace the
            declared defaults: what only the process knows (its host name). A set
            variable still wins; an undeclared field is set to the value.

    Raises:
        ConfigError: a required variable is unset, a value is malformed, or the values
            do not fit together; the message names the variables.
    """
    return _load(cls, environ, defaults or {}, [])


def _load(
    cls: type[T], environ: Mapping[str, str], defaults: Mapping[str, Any], given: list[str]
) -> T:
    own: dict[str, Any] = {}
    deeper: dict[str, dict[str, Any]] = {}
    for key, value in defaults.items():
        head, dot, rest = key.partition(".")
        if dot:
            deeper.setdefault(head, {})[rest] = value
        else:
            own[head] = value
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        declared = f.metadata.get(_KEY)
        default = own[f.name] if f.name in own else _default(f)
        if isinstance(declared, _Single):
            value = declared.variable.read(environ)
            if value is not MISSING:
                given.append(declared.variable.name)
            elif default is MISSING:
                raise ConfigError(f"{declared.variable.name} is required")
            else:
                value = default
        elif isinstance(declared, _Nested):
            value = declared.read(environ, default, deeper.get(f.name, {}))
        elif f.name in own:
            value = own[f.name]
        else:
            continue
        values[f.name] = value
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as exc:
        raise ConfigError(f"{', '.join(given) or cls.__name__}: {exc}") from None


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not MISSING:
        return f.default
    factory = f.default_factory
    return factory() if callable(factory) else MISSING


def _init_values(instance: Any) -> dict[str, Any]:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance) if f.init}


# ---- what is declared (the reference, tests, probes) ------------------------------------


@dataclasses.dataclass(frozen=True)
class Declared:
    """A variable as declared, and the field it sets."""

    path: str
    """Dotted path of the field from the class walked (``etcd.lease_ttl_s``)."""
    variable: Variable
    owner: type[Any]
    """The dataclass that has the field (its attribute docstring describes it)."""
    field: str
    together: tuple[str, ...]
    """The variables to set for this one to take effect: itself, and in an optional
    group every member without a default."""


def declarations(cls: type[Any], prefix: str = "") -> Iterator[Declared]:
    """Every variable declared in ``cls`` and its nested classes, in field order."""
    for f in dataclasses.fields(cls):
        declared = f.metadata.get(_KEY)
        where = f"{prefix}{f.name}"
        if isinstance(declared, _Single):
            yield Declared(where, declared.variable, cls, f.name, (declared.variable.name,))
        elif isinstance(declared, _Nested):
            needed = [declared.members[n].name for n in declared.needed()]
            for name, var in declared.members.items():
                with_it = [*needed, var.name] if declared.optional else [var.name]
                together = tuple(dict.fromkeys(with_it))
                yield Declared(f"{where}.{name}", var, declared.cls, name, together)
            yield from declarations(declared.cls, f"{where}.")


def nested_class(f: dataclasses.Field[Any]) -> type[Any] | None:
    """The class of a field declared with :func:`nested`, else None."""
    declared = f.metadata.get(_KEY)
    return declared.cls if isinstance(declared, _Nested) else None


def variable_names(cls: type[Any], under: str = "") -> dict[str, str]:
    """Dotted field path (relative to ``under``) -> its variable, for code that must
    name a variable (a probe overriding one, an error message about a file)."""
    prefix = f"{under}." if under else ""
    return {
        d.path.removeprefix(prefix): d.variable.name
        for d in declarations(cls)
        if d.path.startswith(prefix)
    }
