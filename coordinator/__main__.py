"""``python -m coordinator``: run a coordinator configured from MAILER_* variables.

Exits 2, with one line on stderr, when the configuration is unusable: a malformed
value, neither TLS (``MAILER_TLS_CA``, ``_CERT``, ``_KEY``) nor ``MAILER_PLAINTEXT=1``,
or a TLS file that cannot be read.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from coordinator.config import CoordinatorConfig, from_env
from coordinator.server import serve
from mailers_runtime import collector, logs
from mailers_runtime.errors import ConfigError
from mailers_runtime.tls import Transport


async def _main(config: CoordinatorConfig, transport: Transport) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop, transport)


def main() -> int:
    try:
        config = from_env(os.environ)
        # TLS files are read once, here, so a bad one stops the process before it starts.
        transport = Transport.load(config.tls)
    except ConfigError as exc:  # TlsConfigError too
        print(f"coordinator: {exc}", file=sys.stderr)
        return 2
    logs.setup("coordinator", config.coordinator_id or str(os.getpid()), os.environ)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    collector.tune()
    asyncio.run(_main(config, transport))
    return 0


if __name__ == "__main__":
    sys.exit(main())
