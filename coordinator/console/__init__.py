"""The operators' web console, served by every coordinator under ``/console/`` on its
HTTPS endpoint (``MAILER_HTTP_LISTEN`` with ``MAILER_CONSOLE=1``).

- :mod:`~coordinator.console.session`: sessions and CSRF tokens (pure, clock injected).
- :mod:`~coordinator.console.query`: query strings and forms, parsed and bounded (pure).
- :mod:`~coordinator.console.views`: pages from plain values, every value escaped (pure).
- :mod:`~coordinator.console.throughput`: the last hour per minute (pure).
- :mod:`~coordinator.console.reads`: the one store read, for the throughput chart.
- :mod:`~coordinator.console.routes`: the aiohttp shell; it acts through the gRPC API
  with the operator's token.
"""

from __future__ import annotations

from client_sdk import ClientTls
from coordinator.auth import AuthConfig
from coordinator.config import CoordinatorConfig
from coordinator.console.routes import Console, connector, dial_address
from coordinator.db.store import Database

__all__ = ["Console", "console_for"]


def console_for(
    config: CoordinatorConfig, auth: AuthConfig | None, db: Database | None
) -> Console | None:
    """The console this coordinator serves, or None when ``MAILER_CONSOLE`` is off.

    It dials this coordinator's advertised address with the coordinator's own TLS
    files (its certificate as the client certificate), or in plaintext when the cluster
    runs plaintext; with ``MAILER_TLS_ALLOWED_CLIENTS`` set, that list must name the
    coordinators' certificate.

    Raises:
        ValueError: a TLS file cannot be read.
    """
    if not config.console:
        return None
    files = config.tls.files
    tls = (
        ClientTls.from_files(files.ca_file, files.cert_file, files.key_file)
        if files is not None
        else None
    )
    connect = connector(dial_address(config.advertised), tls)
    return Console(connect, auth, db, secure=files is not None)
