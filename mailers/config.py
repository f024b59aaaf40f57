"""Where the ``mailers`` commands connect: flags, environment, and named contexts.

A context names a cluster and how to reach it (coordinators, TLS files, a file holding
the API token), as kubectl's contexts do. They live in a TOML file,
``$MAILERS_CONFIG`` or ``$XDG_CONFIG_HOME/mailers/config.toml`` (``~/.config/...``)::

    current_context = "prod"

    [contexts.prod]
    coordinators = ["10.0.0.1:7701", "10.0.0.2:7701"]
    tls_ca = "/etc/mailers/ca.crt"
    tls_cert = "/etc/mailers/ops.crt"
    tls_key = "/etc/mailers/ops.key"
    token_file = "/etc/mailers/ops.token"

Each setting is taken from the first of: its flag (``--coordinators``, ``--tls-ca``...),
its environment variable (``MAILER_COORDINATORS``, ``MAILER_TLS_CA``..., ``MAILER_TOKEN``),
the context chosen by ``--context`` or ``MAILER_CONTEXT`` or else the file's
``current_context``, and the local cluster's defaults. ``mailers config`` manages the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from client_sdk import ClientTls

CONFIG_ENV = "MAILERS_CONFIG"
CONTEXT_ENV = "MAILER_CONTEXT"
COORDINATORS_ENV = "MAILER_COORDINATORS"
TOKEN_ENV = "MAILER_TOKEN"
DEFAULT_COORDINATORS = ("127.0.0.1:7701", "127.0.0.1:7702")
TLS_ENV = {
    "tls_ca": "MAILER_TLS_CA",
    "tls_cert": "MAILER_TLS_CERT",
    "tls_key": "MAILER_TLS_KEY",
    "tls_server_name": "MAILER_TLS_SERVER_NAME",
}
"""The ``--tls-*`` settings and their variables."""


class ConfigError(ValueError):
    """The configuration file, a context or a setting is unusable; the message says which."""


@dataclasses.dataclass(frozen=True)
class Context:
    coordinators: tuple[str, ...] = ()
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_server_name: str = ""
    token_file: str = ""


FIELDS = tuple(f.name for f in dataclasses.fields(Context))


@dataclasses.dataclass
class ConfigFile:
    path: Path
    current: str = ""
    contexts: dict[str, Context] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, environ: Mapping[str, str]) -> ConfigFile:
        """The file named by the environment (empty when it does not exist).

        Raises:
            ConfigError: it cannot be read or parsed, or holds unknown settings.
        """
        path = config_path(environ)
        if not path.exists():
            return cls(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc
        contexts: dict[str, Context] = {}
        for name, table in (data.get("contexts") or {}).items():
            unknown = set(table) - set(FIELDS)
            if unknown:
                raise ConfigError(f"{path}: context {name!r}: unknown {sorted(unknown)}")
            values = dict(table)
            values["coordinators"] = tuple(str(a) for a in values.get("coordinators", ()))
            contexts[str(name)] = Context(**values)
        return cls(path, str(data.get("current_context", "")), contexts)

    def save(self) -> None:
        """Write the file (mode 0600: it names the token's file and the keys)."""
        lines = [f"current_context = {json.dumps(self.current)}", ""]
        for name, ctx in sorted(self.contexts.items()):
            lines.append(f"[contexts.{json.dumps(name)}]")
            for field in FIELDS:
                value = getattr(ctx, field)
                if value:
                    shown = json.dumps(list(value) if field == "coordinators" else value)
                    lines.append(f"{field} = {shown}")
            lines.append("")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines), encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(self.path)


def config_path(environ: Mapping[str, str]) -> Path:
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    base = environ.get("XDG_CONFIG_HOME") or str(Path(environ.get("HOME", "~")) / ".config")
    return Path(base).expanduser() / "mailers" / "config.toml"


def chosen_context(ns: argparse.Namespace, environ: Mapping[str, str]) -> Context:
    """The context ``--context``, ``MAILER_CONTEXT`` or the file's current one names;
    an empty one when none is named.

    Raises:
        ConfigError: the named context is not in the file, or the file is unusable.
    """
    name = getattr(ns, "context", None) or environ.get(CONTEXT_ENV, "")
    config = ConfigFile.load(environ)
    name = name or config.current
    if not name:
        return Context()
    if name not in config.contexts:
        known = ", ".join(sorted(config.contexts)) or "none"
        raise ConfigError(f"no context {name!r} in {config.path} (contexts: {known})")
    return config.contexts[name]


@dataclasses.dataclass(frozen=True)
class Connection:
    """How a command reaches the cluster."""

    coordinators: tuple[str, ...]
    tls: ClientTls | None
    token: str | None = dataclasses.field(default=None, repr=False)


def resolve(ns: argparse.Namespace, environ: Mapping[str, str]) -> Connection:
    """Each setting from its flag, its variable, the chosen context, or the default.

    Raises:
        ConfigError: a context, address, TLS file or token file is unusable.
    """
    ctx = chosen_context(ns, environ)
    flag = getattr(ns, "coordinators", None)
    if flag or environ.get(COORDINATORS_ENV):
        value = flag or environ[COORDINATORS_ENV]
        coordinators = tuple(a.strip() for a in value.split(",") if a.strip())
        if not coordinators:
            raise ConfigError("--coordinators: no address given")
    else:
        coordinators = ctx.coordinators or DEFAULT_COORDINATORS
    tls_values = {
        field: (getattr(ns, field, None) or environ.get(name, "") or getattr(ctx, field)).strip()
        for field, name in TLS_ENV.items()
    }
    tls = None
    if tls_values["tls_ca"] or tls_values["tls_cert"] or tls_values["tls_key"]:
        try:
            tls = ClientTls.from_files(
                tls_values["tls_ca"] or None,
                tls_values["tls_cert"] or None,
                tls_values["tls_key"] or None,
                server_name=tls_values["tls_server_name"],
            )
        except ValueError as exc:
            raise ConfigError(f"TLS: {exc}") from None
    # The token never comes from a flag: flags show in ``ps``.
    token = environ.get(TOKEN_ENV) or None
    if token is None and ctx.token_file:
        try:
            token = Path(ctx.token_file).expanduser().read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise ConfigError(f"token_file {ctx.token_file}: {exc.strerror or exc}") from exc
    return Connection(coordinators, tls, token)


def add_connection_arguments(parser: argparse.ArgumentParser, *, on_subcommand: bool) -> None:
    """``--context``, ``--coordinators`` and ``--tls-*``. Given to the main parser and to
    each subcommand, so they work before and after the subcommand's name; on a
    subcommand an option left out keeps what the main parser read."""
    default: Any = argparse.SUPPRESS if on_subcommand else None
    context = parser.add_argument(
        "--context",
        metavar="NAME",
        help=f"a context of the config file (${CONTEXT_ENV})",
        default=default,
    )
    context.completer = context_names  # type: ignore[attr-defined]  # read by argcomplete
    parser.add_argument(
        "--coordinators",
        metavar="HOST:PORT,...",
        help=f"the coordinators (${COORDINATORS_ENV}; default {','.join(DEFAULT_COORDINATORS)})",
        default=default,
    )
    parser.add_argument(
        "--tls-ca", help="CA of the coordinators' certificates ($MAILER_TLS_CA)", default=default
    )
    parser.add_argument("--tls-cert", help="client certificate ($MAILER_TLS_CERT)", default=default)
    parser.add_argument("--tls-key", help="its private key ($MAILER_TLS_KEY)", default=default)
    parser.add_argument(
        "--tls-server-name",
        help="name in the coordinators' certificates, when not their host "
        "($MAILER_TLS_SERVER_NAME)",
        default=default,
    )


def context_names(**_: object) -> list[str]:
    """The contexts of the config file, for shell completion (none when unreadable)."""
    try:
        return sorted(ConfigFile.load(os.environ).contexts)
    except ConfigError:
        return []


def add_config_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``mailers config``: see :func:`cmd_config`."""
    parser = sub.add_parser(
        "config",
        help="named contexts: which cluster, with which certificates",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = parser.add_subparsers(dest="config_action", required=True)
    actions.add_parser("get-contexts", help="list the contexts; * marks the current one")
    actions.add_parser("current-context", help="print the current context's name")
    use = actions.add_parser("use-context", help="make a context the current one")
    use.add_argument("name")
    delete = actions.add_parser("delete-context", help="remove a context")
    delete.add_argument("name")
    put = actions.add_parser(
        "set-context",
        help="create a context or change its settings",
        description="Create context NAME, or change the settings given (an empty value "
        "removes one). The token itself is never stored: --token-file names a file that "
        "holds it.",
    )
    put.add_argument("name")
    put.add_argument("--coordinators", dest="set_coordinators", metavar="HOST:PORT,...")
    for field in ("tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file"):
        put.add_argument(f"--{field.replace('_', '-')}", dest=f"set_{field}", metavar="VALUE")
    put.add_argument("--use", action="store_true", help="also make it the current context")
    parser.set_defaults(func=cmd_config)


def cmd_config(ns: argparse.Namespace) -> int:
    """Read or change the configuration file; 0 done, 2 unusable file or name."""
    try:
        config = ConfigFile.load(os.environ)
        print_out = _config_action(config, ns)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if print_out:
        sys.stdout.write(print_out)
    return 0


def _config_action(config: ConfigFile, ns: argparse.Namespace) -> str:
    """Run one ``mailers config`` action; what it prints on stdout."""
    action = ns.config_action
    if action == "get-contexts":
        return "".join(
            f"{'*' if name == config.current else ' '} {name}  "
            f"{','.join(ctx.coordinators) or '(default coordinators)'}\n"
            for name, ctx in sorted(config.contexts.items())
        )
    if action == "current-context":
        if not config.current:
            raise ConfigError(f"no current context in {config.path}")
        return config.current + "\n"
    if action != "set-context" and ns.name not in config.contexts:
        raise ConfigError(f"no context {ns.name!r} in {config.path}")
    if action == "use-context":
        config.current = ns.name
    elif action == "delete-context":
        del config.contexts[ns.name]
        if config.current == ns.name:
            config.current = ""
    else:
        changes: dict[str, Any] = {}
        if ns.set_coordinators is not None:
            changes["coordinators"] = tuple(
                a.strip() for a in ns.set_coordinators.split(",") if a.strip()
            )
        for field in FIELDS[1:]:
            value = getattr(ns, f"set_{field}")
            if value is not None:
                changes[field] = (
                    str(Path(value).expanduser().resolve())
                    if value and (field.endswith(("_ca", "_cert", "_key", "_file")))
                    else value
                )
        old = config.contexts.get(ns.name, Context())
        config.contexts[ns.name] = dataclasses.replace(old, **changes)
        if ns.use or not config.current:
            config.current = ns.name
    config.save()
    return f"{action}: {ns.name} ({config.path})\n"
