"""``python -m coordinator``: run a coordinator configured from MAILER_* variables."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys

from coordinator.config import from_env
from coordinator.server import serve


async def _main() -> None:
    config = from_env(os.environ)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(config, stop)


def main() -> int:
    logging.basicConfig(
        level=os.environ.get("MAILER_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s coordinator[{os.getpid()}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
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
