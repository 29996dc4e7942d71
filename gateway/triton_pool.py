"""Several Triton endpoints behind one backend: balance across the ready ones, skip the unhealthy.

gRPC keeps one long-lived connection, so a Kubernetes ClusterIP Service pins a gateway to one Triton
pod. ``NER_TRITON_URL`` therefore takes a comma-separated list of ``host:port`` and/or
``dns:///name:port`` entries; a DNS entry (a headless Service) is re-resolved on every refresh, so
pods that come and go are picked up. A background refresh polls each endpoint's readiness (server and
served models); inference goes round-robin over the ready endpoints and, when one turns out to be
unavailable, is retried on the next (Triton inference is idempotent) within the caller's deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket

import numpy as np

from ner_gateway.errors import ConfigurationError, TritonUnavailable
from ner_gateway.manifest import ModelManifest
from ner_gateway.triton_backend import ServedModel, TritonBackend

LOGGER = logging.getLogger(__name__)
DNS_PREFIX = "dns:///"


def resolve(spec: str) -> list[str]:
    """Expand a NER_TRITON_URL value into ``host:port`` endpoints (DNS entries to one per address)."""
    endpoints: list[str] = []
    for entry in (part.strip() for part in spec.split(",")):
        if not entry:
            continue
        if entry.startswith(DNS_PREFIX):
            host, _, port = entry[len(DNS_PREFIX):].rpartition(":")
            if not host or not port.isdigit():
                raise ConfigurationError(f"invalid Triton endpoint {entry!r}: expected dns:///name:port")
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except socket.gaierror as e:
                LOGGER.warning("cannot resolve %s: %s", entry, e)
                continue
            for family, _, _, _, address in infos:
                ip = address[0] if family == socket.AF_INET else f"[{address[0]}]"
                endpoints.append(f"{ip}:{port}")
        else:
            endpoints.append(entry)
    return list(dict.fromkeys(endpoints))


class TritonPool:
    """The TritonBackend interface over every endpoint of ``spec``."""

    def __init__(self, spec: str, refresh_interval_s: float = 1.0, max_attempts: int = 3) -> None:
        self.url = spec
        self.refresh_interval_s = refresh_interval_s
        self.max_attempts = max_attempts
        self._backends: dict[str, TritonBackend] = {}
        self._ready: list[str] = []
        self._served: list[ServedModel] = []
        self._failed_at: dict[str, float] = {}  # endpoint -> when an inference last found it unavailable
        self._round_robin = itertools.count()
        self._task: asyncio.Task[None] | None = None

    @property
    def ready_endpoints(self) -> list[str]:
        return list(self._ready)

    async def refresh(self) -> None:
        """Re-resolve the endpoints and poll each one's readiness (server, and every served model)."""
        started = asyncio.get_running_loop().time()
        endpoints = await asyncio.to_thread(resolve, self.url)
        if not endpoints and self._backends:
            endpoints = list(self._backends)  # DNS hiccup: keep what we had rather than drop everything
        for gone in set(self._backends) - set(endpoints):
            await self._backends.pop(gone).close()
        for endpoint in endpoints:
            if endpoint not in self._backends:
                self._backends[endpoint] = TritonBackend(endpoint)
        states = await asyncio.gather(*(self._endpoint_ready(b) for b in self._backends.values()))
        # A poll that began before an inference saw the endpoint fail is stale: do not put it back yet.
        ready = [endpoint for endpoint, ok in zip(self._backends, states, strict=True)
                 if ok and self._failed_at.get(endpoint, float("-inf")) < started]
        if ready != self._ready:
            LOGGER.info("Triton endpoints ready: %s of %s", ready or "none", list(self._backends))
        self._ready = ready

    async def _endpoint_ready(self, backend: TritonBackend) -> bool:
        if not await backend.is_ready(timeout_s=self.refresh_interval_s):
            return False
        checks = [backend.is_model_ready(m.name, m.version, self.refresh_interval_s) for m in self._served]
        return all(await asyncio.gather(*checks))

    def start(self) -> None:
        self._task = asyncio.create_task(self._refresh_forever(), name="triton-pool-refresh")

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval_s)
            try:
                await self.refresh()
            except Exception:  # keep refreshing whatever one round hit
                LOGGER.exception("refreshing Triton endpoints failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for backend in self._backends.values():
            await backend.close()

    @property
    def ready(self) -> bool:
        """Some endpoint was ready at the last refresh (the refresh task polls; this reads no network)."""
        return bool(self._ready)

    async def wait_ready(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        await self.refresh()
        while not self._ready:
            if loop.time() > deadline:
                raise ConfigurationError(f"no Triton endpoint of {self.url!r} ready after {timeout_s:.0f} s")
            await asyncio.sleep(0.25)
            await self.refresh()

    async def is_model_ready(self, name: str, version: str, timeout_s: float = 5.0) -> bool:
        states = [await self._backends[e].is_model_ready(name, version, timeout_s) for e in self._ready]
        return bool(states) and all(states)

    async def check_model(self, manifest: ModelManifest) -> ServedModel:
        """The tensor checks on every ready endpoint; all must agree (one repository behind them all)."""
        served = {await self._backends[e].check_model(manifest) for e in self._ready}
        if len(served) != 1:
            raise ConfigurationError(f"Triton endpoints disagree about {manifest.name!r}: {served}")
        model = served.pop()
        self._served.append(model)
        return model

    async def infer(self, model: ServedModel, inputs: dict[str, np.ndarray], output: str, timeout_s: float,
                    request_id: str = "") -> np.ndarray:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        candidates = self._ready
        if not candidates:
            raise TritonUnavailable("no inference server is available; retry later")
        start = next(self._round_robin)
        order = [candidates[(start + i) % len(candidates)] for i in range(len(candidates))]
        error: TritonUnavailable | None = None
        for endpoint in order[: self.max_attempts]:
            try:
                return await self._backends[endpoint].infer(model, inputs, output, deadline - loop.time(),
                                                            request_id)
            except TritonUnavailable as e:
                LOGGER.warning("Triton %s unavailable; taking it out of rotation and retrying elsewhere", endpoint)
                self._ready = [r for r in self._ready if r != endpoint]
                self._failed_at[endpoint] = loop.time()
                error = e
        assert error is not None
        raise error
