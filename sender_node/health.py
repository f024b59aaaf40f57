"""The standard gRPC health service (``grpc.health.v1``) on the node's own port.

The overall status (service ``""``) is SERVING while the node is registered under a
trusted lease, not draining, and its journal works; NOT_SERVING otherwise (also before
the first registration). Kubernetes' native gRPC probes and ``mailers_runtime.healthcheck
--service ""`` read it. The status is re-checked every ``interval_s``; a change shows
within that time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class NodeHealth:
    """Keeps the health service's overall status in step with ``serving()``.

    Owns its task (:meth:`start`, :meth:`stop`).

    Args:
        serving: Whether the node takes work now.
        interval_s: How often it is asked.
    """

    def __init__(self, serving: Callable[[], bool], interval_s: float = 0.5) -> None:
        self.servicer = health.aio.HealthServicer()
        """Add it to the server with ``health_pb2_grpc.add_HealthServicer_to_server``."""
        self._serving = serving
        self._interval_s = interval_s
        self._status: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def update(self) -> None:
        """Publish the current status now."""
        status = SERVING if self._serving() else NOT_SERVING
        if status != self._status:
            self._status = status
            await self.servicer.set("", status)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="node-health")

    async def stop(self) -> None:
        """Stop following, and report NOT_SERVING for good (the node is going away)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.servicer.enter_graceful_shutdown()

    async def _run(self) -> None:
        while True:
            await self.update()
            await asyncio.sleep(self._interval_s)
