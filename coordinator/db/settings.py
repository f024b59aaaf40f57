"""How a coordinator reaches PostgreSQL: the URL, the password file, the pool.

``MAILER_DATABASE_URL`` is a libpq-style URL (``postgresql://user@host:port/db``);
asyncpg honours its ``sslmode`` (``verify-full`` checks the server's certificate and
name) and ``sslrootcert`` parameters. The password is never part of the URL: it is
read from ``MAILER_DATABASE_PASSWORD_FILE`` each time the pool opens a connection, so
a rotated password is picked up without a restart.
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path

from mailers_runtime import settings
from mailers_runtime.errors import ConfigError


@settings.config
class DatabaseConfig:
    url: str = settings.setting("MAILER_DATABASE_URL")
    """``postgresql://user@host:port/database[?sslmode=verify-full&sslrootcert=...]``."""
    password_file: str = settings.setting("MAILER_DATABASE_PASSWORD_FILE", default="")
    """File holding the password (one line); empty: no password (trust or peer auth)."""
    pool_size: int = settings.setting(
        "MAILER_DATABASE_POOL_SIZE", default=10, parse=settings.integer
    )
    """Connections the leader keeps open."""
    connect_timeout_s: float = 5.0
    """Deadline of one connection attempt."""
    statement_timeout_s: float = 30.0
    """Deadline of one query on the server side (set per connection)."""

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        if parsed.scheme not in ("postgresql", "postgres"):
            raise ConfigError("MAILER_DATABASE_URL must start with postgresql://")
        if parsed.password:
            raise ConfigError(
                "MAILER_DATABASE_URL must not hold a password: use MAILER_DATABASE_PASSWORD_FILE"
            )
        if not parsed.hostname or not parsed.path.strip("/"):
            raise ConfigError("MAILER_DATABASE_URL needs a host and a database name")
        if self.pool_size < 2:
            raise ConfigError("MAILER_DATABASE_POOL_SIZE must be at least 2")
        if self.connect_timeout_s <= 0 or self.statement_timeout_s <= 0:
            raise ConfigError("database timeouts must be positive")

    def password(self) -> str | None:
        """The password, read now from :attr:`password_file` (None without one).

        Raises:
            OSError: the file cannot be read.
        """
        if not self.password_file:
            return None
        return Path(self.password_file).read_text(encoding="utf-8").strip() or None

    def redacted(self) -> str:
        """The URL for logs (it never holds a password; query parameters dropped)."""
        parsed = urllib.parse.urlsplit(self.url)
        return urllib.parse.urlunsplit(parsed._replace(query=""))
