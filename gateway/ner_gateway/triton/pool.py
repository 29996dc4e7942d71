"""What the gateway knows of its Triton endpoints: which are up, and where each served model is ready.

gRPC keeps one long-lived connection, so a Kubernetes ClusterIP Service pins a gateway to one Triton pod; the
pool therefore holds every endpoint of ``NER_TRITON_URL`` (triton/endpoints.py). A background refresh polls each
endpoint (is Triton up?) and, per served model, whether that model is ready there; an inference that finds an
endpoint or a model unavailable takes it out at once (``take_out``; triton/routing.py routes and retries). A poll
that gets no answer in time is no verdict (under load a busy Triton, or this gateway's busy event loop, misses the
interval): the endpoint keeps its state until it leaves ``unanswered_polls_down`` polls in a row unanswered.

Readiness is per model version: one version unloaded or failing (on one endpoint or all) takes only that version
out, never the endpoint or the other models and versions. The pool reports facts and tells its listeners when they
change; what they mean for the gateway's health is transport/health.py's policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.core.errors import ConfigurationError, ModelUnavailable, NerError, TritonUnavailable
from ner_gateway.core.ports import ServedModel
from ner_gateway.triton.backend import TritonBackend
from ner_gateway.triton.endpoints import resolve

LOGGER = logging.getLogger(__name__)
ModelKey = tuple[str, str]  # (name, version): ServedModel.key


class TritonPool:
    """Every endpoint of ``spec``: their states, and the core's ``ModelSource`` port (startup checks)."""

    def __init__(self, spec: str, refresh_interval_s: float = 1.0, unanswered_polls_down: int = 3) -> None:
        self.url = spec
        self.refresh_interval_s = refresh_interval_s
        # A poll that gets no answer in time keeps an endpoint's last state: under load Triton, or this gateway's
        # own event loop, can be too busy to answer within the interval, and taking the only Triton out then
        # turned an overload into UNAVAILABLE for every call. This many unanswered polls in a row (a hung
        # Triton) do take it out.
        self.unanswered_polls_down = unanswered_polls_down
        self._unanswered: dict[str, int] = {}  # endpoint -> unanswered polls in a row
        self._backends: dict[str, TritonBackend] = {}
        self._ready: list[str] = []  # endpoints that are up
        self._served: list[ServedModel] = []
        self._serving: dict[ModelKey, list[str]] = {}  # served model version -> the up endpoints where it is ready
        # (endpoint, model version; None for the whole endpoint) -> when an inference last found it unavailable
        self._failed_at: dict[tuple[str, ModelKey | None], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def ready_endpoints(self) -> list[str]:
        return list(self._ready)

    @property
    def served(self) -> list[ServedModel]:
        """The models watched (``watch``): those the gateway serves."""
        return list(self._served)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` whenever an endpoint or a served model goes out or comes back."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def endpoints_for(self, model: ServedModel) -> list[str]:
        """The up endpoints where ``model`` (that version) is ready."""
        return self._serving.get(model.key, [])

    def backend(self, endpoint: str) -> TritonBackend:
        return self._backends[endpoint]

    async def refresh(self) -> None:
        """Re-resolve the endpoints and poll each one: is it up, and which served models are ready on it."""
        started = asyncio.get_running_loop().time()
        endpoints = await asyncio.to_thread(resolve, self.url)
        if not endpoints and self._backends:
            endpoints = list(self._backends)  # DNS hiccup: keep what we had rather than drop everything
        for gone in set(self._backends) - set(endpoints):
            await self._backends.pop(gone).close()
            self._unanswered.pop(gone, None)
        for endpoint in endpoints:
            if endpoint not in self._backends:
                self._backends[endpoint] = TritonBackend(endpoint)
        served = list(self._served)  # as of this poll: versions may be watched or unwatched while it runs
        states = await asyncio.gather(*(self._endpoint_state(e, b, served) for e, b in self._backends.items()))

        def fresh(endpoint: str, model: ModelKey | None = None) -> bool:
            """A poll that began before an inference saw it fail is stale: do not put it back yet."""
            return self._failed_at.get((endpoint, model), float("-inf")) < started

        up = {endpoint: models for endpoint, models in zip(self._backends, states, strict=True)
              if models is not None and fresh(endpoint)}
        before = (self._ready, dict(self._serving))
        if list(up) != self._ready:
            LOGGER.info("Triton endpoints ready: %s of %s", list(up) or "none", list(self._backends))
        self._ready = list(up)
        watched = {m.key for m in self._served}
        for model in served:
            if model.key in watched:
                self._set_serving(model, [e for e, models in up.items() if model.key in models
                                          and fresh(e, model.key)])
        if (self._ready, self._serving) != before:
            self._changed()

    async def _endpoint_state(self, endpoint: str, backend: TritonBackend,
                              served: list[ServedModel]) -> set[ModelKey] | None:
        """None: the endpoint is down; else the served model versions that are ready on it.

        Before any model is served (startup), "up" is Triton's own readiness: with its default strict
        readiness, every model it loads is loaded. Afterwards it is liveness, because a strict Triton reports
        not ready as soon as any one of its models is unloaded, and that must not take down the others. A probe
        without an answer in time keeps what the last poll found, up to ``unanswered_polls_down`` polls in a row.
        """
        timeout = self.refresh_interval_s
        if not served:
            return set() if await backend.is_ready(timeout) else None
        live = await backend.is_live(timeout)
        answers = list(await asyncio.gather(*(backend.is_model_ready(m.name, m.version, timeout)
                                              for m in served))) if live else []
        if live is not None and None not in answers:
            self._unanswered.pop(endpoint, None)
            return {m.key for m, ready in zip(served, answers, strict=True) if ready} if live else None
        return self._without_answer(endpoint, served, answers or [None] * len(served))

    def _without_answer(self, endpoint: str, served: list[ServedModel],
                        answers: list[bool | None]) -> set[ModelKey] | None:
        """The state of an endpoint whose poll went (partly) unanswered: as the last poll found it, where this one
        has no answer, until ``unanswered_polls_down`` polls in a row go unanswered."""
        unanswered = self._unanswered[endpoint] = self._unanswered.get(endpoint, 0) + 1
        if endpoint not in self._ready:
            return None
        if unanswered >= self.unanswered_polls_down:
            LOGGER.warning("Triton %s left %d polls in a row unanswered (%.1f s each); taking it out", endpoint,
                           unanswered, self.refresh_interval_s)
            return None
        LOGGER.info("Triton %s did not answer a poll within %.1f s (busy?); keeping its last state", endpoint,
                    self.refresh_interval_s)
        return {m.key for m, ready in zip(served, answers, strict=True)
                if ready or (ready is None and endpoint in self._serving.get(m.key, []))}

    def _set_serving(self, model: ServedModel, endpoints: list[str]) -> None:
        if bool(endpoints) != bool(self._serving.get(model.key)):
            if endpoints:
                LOGGER.info("model %s version %s is ready again (on %s)", model.name, model.version, endpoints)
            else:
                LOGGER.warning("model %s version %s is not ready on any Triton endpoint; its calls go to another "
                               "version or fail with UNAVAILABLE until it is back (the other models are unaffected)",
                               model.name, model.version)
        self._serving[model.key] = endpoints

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

    def model_ready(self, model: ServedModel | str) -> bool:
        """The model version (or, given a name, any served version of it) is ready on at least one endpoint (as of
        the last refresh or failed inference)."""
        if isinstance(model, str):
            return any(endpoints for (name, _), endpoints in self._serving.items() if name == model)
        return bool(self._serving.get(model.key))

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
        return bool(states) and all(state is True for state in states)

    async def check_model(self, manifest: ModelManifest) -> ServedModel:
        """The tensor checks on every ready endpoint; all must agree (one repository behind them all)."""
        served = {await self._backends[e].check_model(manifest) for e in self._ready}
        if len(served) != 1:
            raise ConfigurationError(f"Triton endpoints disagree about {manifest.name!r}: {served}")
        return served.pop()

    def watch(self, model: ServedModel) -> None:
        """Route ``model`` to the endpoints ready now, and from here on poll where it is ready."""
        self._served.append(model)
        self._serving[model.key] = list(self._ready)
        self._changed()

    def unwatch(self, model: ServedModel) -> None:
        """Stop polling ``model`` (a version that went away) and route nothing more to it."""
        self._served = [m for m in self._served if m.key != model.key]
        self._serving.pop(model.key, None)
        self._changed()

    async def take_out(self, endpoint: str, model: ServedModel, error: TritonUnavailable,
                       time_left_s: float) -> NerError:
        """An inference on ``endpoint`` found it unavailable: ask what is (Triton answers the same status for
        "server gone" as for "model not ready") and take out only that, until a later refresh sees it back.
        Returns the error for the caller: ModelUnavailable when only the model is out there."""
        backend, now = self._backends[endpoint], asyncio.get_running_loop().time()
        timeout = max(0.1, min(self.refresh_interval_s, time_left_s))
        live, model_ready = await asyncio.gather(backend.is_live(timeout),
                                                 backend.is_model_ready(model.name, model.version, timeout))
        if live is None or (live and model_ready is None):
            # No answer in time is no verdict (a busy Triton or event loop): this call fails or moves on, the
            # endpoint stays, and the refresh takes out a Triton that keeps not answering.
            return error
        if not live:
            LOGGER.warning("Triton %s unavailable; taking it out of rotation and retrying elsewhere", endpoint)
            self._ready = [e for e in self._ready if e != endpoint]
            for served in self._served:
                self._set_serving(served, [e for e in self._serving.get(served.key, []) if e != endpoint])
            self._failed_at[(endpoint, None)] = now
            self._changed()
            return error
        if not model_ready:
            LOGGER.warning("model %s version %s not ready on Triton %s; taking it out there", model.name,
                           model.version, endpoint)
            self._set_serving(model, [e for e in self._serving.get(model.key, []) if e != endpoint])
            self._failed_at[(endpoint, model.key)] = now
            self._changed()
            unavailable = ModelUnavailable(f"model {model.name!r} version {model.version} is not ready on any "
                                           "inference server; retry later")
            unavailable.__cause__ = error
            return unavailable
        return error  # up and ready: a refusal such as a full queue; it stays in rotation
