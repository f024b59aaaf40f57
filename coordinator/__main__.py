"""``python -m coordinator``: run a coordinator configured from MAILER_* variables."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from coordinator.config import from_env
from coordinator.server import serve
from mailers import logs


async def _main() -> None:
    config = from_env(os.environ)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop)


def main() -> int:
    logs.setup(
        "coordinator", os.environ.get("MAILER_COORDINATOR_ID") or str(os.getpid()), os.environ
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(_main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
