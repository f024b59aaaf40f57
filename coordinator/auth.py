"""Tenants, API tokens and who a caller is. Pure, except :func:`load_auth_file`.

A token is ``mlr_`` plus 32 random bytes in URL-safe base64 (256 bits; the prefix
lets secret scanners spot a leaked one). The auth file holds only ``sha256:<hex>``
digests of tokens. A plain, unsalted SHA-256 is enough here because tokens are
random and long: salting and slow hashes defend guessable passwords against
dictionary attacks, which a 256-bit random value does not fear; an unsalted digest
also makes the lookup one dict access instead of one slow hash per known token.

The auth file (JSON, or TOML when its name ends in ``.toml``)::

    {
      "tenants": {
        "acme": {
          "tokens": ["sha256:9f86d0..."],
          "quotas": {"max_recipients_per_job": 100000, "messages_per_hour": 50000,
                     "max_active_jobs": 5},
          "bounce_domain": "bounces.acme.example"
        }
      },
      "admins": ["sha256:60303a..."]
    }

Quotas missing from a tenant take the coordinator's defaults; without a
``bounce_domain`` its bounces go to the nodes' ``MAILER_BOUNCE_DOMAIN``. ``python -m
coordinator.auth hash --tenant acme`` (or ``--admin``) prints a new token and the
line to put in the file. Nothing in this module logs or formats a token.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import json
import re
import secrets
import sys
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from coordinator.quotas import Quotas

TOKEN_PREFIX = "mlr_"
HASH_PREFIX = "sha256:"
_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
"""Tenant ids: lower-case, no '/', so they can name etcd keys."""
AUTH_METADATA_KEY = "authorization"
_BEARER = "bearer "


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who is calling.

    ``tenant`` is the tenant whose jobs the caller sees ("" for none); ``admin``
    callers may use the admin API and see every tenant's jobs, but submit nothing.
    """

    tenant: str
    admin: bool = False

    @property
    def sees_all(self) -> bool:
        return self.admin


ANONYMOUS_DEV = Principal(tenant="", admin=True)
"""The caller when auth is off (local dev): tenant "", allowed everything."""


@dataclasses.dataclass(frozen=True)
class Tenant:
    tenant_id: str
    quotas: Quotas
    bounce_domain: str = ""
    """Where the tenant's bounces go (its VERP envelope senders' domain); "": the
    nodes' MAILER_BOUNCE_DOMAIN."""


@dataclasses.dataclass(frozen=True)
class AuthConfig:
    """Parsed auth file: token digests to tenants, and admin digests."""

    tenants: Mapping[str, Tenant]
    token_tenants: Mapping[str, str]
    """``sha256:<hex>`` -> tenant id."""
    admin_hashes: frozenset[str]

    def identify(self, metadata: Iterable[tuple[str, str | bytes]]) -> Principal | None:
        """The principal a call's metadata authenticates, or None (missing/unknown token)."""
        token = bearer_token(metadata)
        if token is None:
            return None
        digest = hash_token(token)
        # Digests are public-ish (they are in the file); comparing them by dict lookup
        # leaks at most timing about a digest, never about the token itself.
        if digest in self.admin_hashes:
            return Principal(tenant="", admin=True)
        tenant = self.token_tenants.get(digest)
        return Principal(tenant=tenant) if tenant is not None else None

    def quotas_for(self, tenant: str, default: Quotas) -> Quotas:
        known = self.tenants.get(tenant)
        return known.quotas if known is not None else default

    def bounce_domain_for(self, tenant: str) -> str:
        known = self.tenants.get(tenant)
        return known.bounce_domain if known is not None else ""

    def bounce_domains(self) -> frozenset[str]:
        """Every tenant's own bounce domain (the inbound endpoint accepts them too)."""
        return frozenset(t.bounce_domain for t in self.tenants.values() if t.bounce_domain)


def hash_token(token: str) -> str:
    """The ``sha256:<hex>`` digest of a token, as written in the auth file."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, digest: str) -> bool:
    """Whether token hashes to digest (constant time)."""
    return hmac.compare_digest(hash_token(token), digest)


def new_token() -> str:
    """A new random API token."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of the ``authorization: Bearer <token>`` entry, if there is exactly one."""
    values = [v for k, v in metadata if k.lower() == AUTH_METADATA_KEY]
    if len(values) != 1:
        return None
    value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
    if not value[: len(_BEARER)].lower() == _BEARER:
        return None
    token = value[len(_BEARER) :].strip()
    return token or None


def _quotas(raw: Any, default: Quotas, where: str) -> Quotas:
    if raw is None:
        return default
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: quotas must be a table")
    known = {f.name for f in dataclasses.fields(Quotas)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"{where}: unknown quotas {sorted(unknown)}")
    for name, value in raw.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}.{name}: must be a whole number >= 0")
    return dataclasses.replace(default, **raw)


def _hashes(raw: Any, where: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(h, str) for h in raw):
        raise ValueError(f"{where}: must be a list of sha256:<hex> strings")
    for i, h in enumerate(raw):
        if not _HASH.match(h):
            # Never echo the value: someone may have pasted a token instead of its hash.
            raise ValueError(f"{where}[{i}]: is not a sha256:<64 hex> digest")
    return list(raw)


_DOMAIN = re.compile(r"\A(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}\Z")


def _bounce_domain(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or (raw and not _DOMAIN.match(raw.lower())):
        raise ValueError(f"{where}.bounce_domain: must be a domain name")
    return raw.lower()


def parse_auth(raw: Mapping[str, Any], default_quotas: Quotas) -> AuthConfig:
    """Build the auth config from the parsed file.

    Raises:
        ValueError: naming the entry at fault (never a token or digest).
    """
    unknown = set(raw) - {"tenants", "admins"}
    if unknown:
        raise ValueError(f"auth file: unknown keys {sorted(unknown)}")
    tenants_raw = raw.get("tenants", {})
    if not isinstance(tenants_raw, Mapping):
        raise ValueError("tenants: must be a table of tenant id -> {tokens, quotas}")
    tenants: dict[str, Tenant] = {}
    token_tenants: dict[str, str] = {}
    for tenant_id, entry in tenants_raw.items():
        where = f"tenants.{tenant_id}"
        if not isinstance(tenant_id, str) or not TENANT_ID.match(tenant_id):
            raise ValueError(f"{where}: tenant ids are 1-63 of a-z 0-9 _ . - (no '/')")
        if not isinstance(entry, Mapping) or set(entry) - {"tokens", "quotas", "bounce_domain"}:
            raise ValueError(
                f"{where}: must be a table with 'tokens' and optional 'quotas', 'bounce_domain'"
            )
        for digest in _hashes(entry.get("tokens", []), f"{where}.tokens"):
            if digest in token_tenants:
                raise ValueError(f"{where}.tokens: a token is listed for two tenants")
            token_tenants[digest] = tenant_id
        tenants[tenant_id] = Tenant(
            tenant_id,
            _quotas(entry.get("quotas"), default_quotas, where),
            _bounce_domain(entry.get("bounce_domain", ""), where),
        )
    admins = frozenset(_hashes(raw.get("admins", []), "admins"))
    if admins & set(token_tenants):
        raise ValueError("admins: a token is both an admin's and a tenant's")
    return AuthConfig(tenants=tenants, token_tenants=token_tenants, admin_hashes=admins)


def load_auth_file(path: Path, default_quotas: Quotas) -> AuthConfig:
    """Read and parse the auth file at path (JSON, or TOML by suffix).

    Raises:
        ValueError: the file is malformed (the message names the entry, not secrets).
        OSError: the file cannot be read.
    """
    data = path.read_bytes()
    try:
        raw = tomllib.loads(data.decode()) if path.suffix == ".toml" else json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        # The parser's message may quote file content; keep only where it failed.
        raise ValueError(f"auth file {path} is not valid {path.suffix or 'JSON'}") from exc
    if not isinstance(raw, Mapping):
        raise ValueError(f"auth file {path}: the top level must be a table")
    return parse_auth(raw, default_quotas)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m coordinator.auth hash (--tenant T | --admin)``."""
    parser = argparse.ArgumentParser(prog="python -m coordinator.auth")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("hash", help="print a new token and the auth-file line for it")
    who = make.add_mutually_exclusive_group(required=True)
    who.add_argument("--tenant", help="tenant id the token belongs to")
    who.add_argument("--admin", action="store_true", help="an admin token")
    ns = parser.parse_args(argv)
    if ns.tenant is not None and not TENANT_ID.match(ns.tenant):
        parser.error("tenant ids are 1-63 of a-z 0-9 _ . - (no '/')")
    token = new_token()
    where = "admins" if ns.admin else f'tenants["{ns.tenant}"].tokens'
    sys.stdout.write(f"token: {token}\n")
    sys.stdout.write(f"{where}: {json.dumps(hash_token(token))}\n")
    sys.stdout.write("Give the token to its user; put only the hash in MAILER_AUTH_FILE.\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
