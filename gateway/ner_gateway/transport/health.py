"""The health policy, in one place: grpc.health.v1 status from what the pool knows of Triton.

The overall ("") and ner.v1.NerService status is SERVING while some Triton endpoint is up and at least one served
model is ready on one (``serving``; before any model is served, while some endpoint is up): a single model
unloaded or failing does not take the gateway out of a load balancer, since its calls fail fast with UNAVAILABLE on
their own and ListModels marks it ``ready: false``; taking this gateway out would help nobody (every gateway sees
the same Tritons). The status follows the pool as soon as it changes (its polls, or an inference that found an
endpoint or a model unavailable) and the embedded Triton's deaths and restarts (``follow_embedded_triton``). From
shutdown on (``shutdown``), every service is NOT_SERVING for good.
"""

from __future__ import annotations

import logging

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from ner_gateway.observability.metrics import GatewayMetrics
from ner_gateway.pb.ner.v1 import ner_pb2
from ner_gateway.transport.background import BackgroundTasks
from ner_gateway.triton.pool import TritonPool

LOGGER = logging.getLogger(__name__)

SERVICE_NAME = ner_pb2.DESCRIPTOR.services_by_name["NerService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def serving(pool: TritonPool) -> bool:
    """The policy: some endpoint is up and at least one served model is ready on one (before any model is
    served: some endpoint is up)."""
    served = pool.served
    if not served:
        return bool(pool.ready_endpoints)
    return any(pool.model_ready(model) for model in served)


class TritonHealth:
    """Keeps the overall ("") and NerService health in step with the pool."""

    def __init__(self, pool: TritonPool, metrics: GatewayMetrics | None = None) -> None:
        self.servicer = HealthServicer()
        self.pool = pool
        self.metrics = metrics
        self.serving: bool | None = None
        self._shut_down = False
        self._followers = BackgroundTasks()
        pool.on_change(self._follow_pool)

    async def set_serving(self, serving: bool) -> None:
        if self._shut_down:
            return
        if serving != self.serving:
            LOGGER.log(logging.INFO if serving else logging.WARNING, "health: %s",
                       "SERVING" if serving else "NOT_SERVING (Triton not ready)")
        self.serving = serving
        if self.metrics is not None:
            self.metrics.triton_up.set(1 if serving else 0)
        for service in ("", SERVICE_NAME):
            await self.servicer.set(service, SERVING if serving else NOT_SERVING)

    def _follow_pool(self) -> None:
        self._followers.start(self.set_serving(serving(self.pool)), name="health-follows-pool")

    def follow_embedded_triton(self, ready: bool) -> None:
        """The embedded Triton died or came back (its supervisor says so): follow at once, once the pool has
        seen it too, instead of waiting for the pool's next poll."""
        self._followers.start(self._follow_triton(ready), name="health-follows-triton")

    async def _follow_triton(self, ready: bool) -> None:
        if ready:
            await self.pool.refresh()
        await self.set_serving(ready and serving(self.pool))

    async def shutdown(self) -> None:
        """Every service NOT_SERVING, for good (later ``set_serving`` calls change nothing). Idempotent."""
        if not self._shut_down:
            LOGGER.info("health: NOT_SERVING (shutting down)")
        self._shut_down = True
        await self._followers.cancel_all()
        await self.servicer.enter_graceful_shutdown()
