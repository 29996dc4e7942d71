"""The transport-free core, one request moving forward: validate -> tokenize (core/tokenizing.py) -> windows
(core/windowing.py) -> the model's batcher and its Triton calls (core/batching.py) -> merge and decode
(core/decoding.py) -> offsets (core/offsets.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from opentelemetry import trace

from ner_gateway.core.admission import Admission
from ner_gateway.core.batching import Batcher, BatchLimits
from ner_gateway.core.deadline import Deadline
from ner_gateway.core.decoding import decode_texts, merge
from ner_gateway.core.domain import Document, Recognition, RecognizeRequest, StageTimings
from ner_gateway.core.errors import InvalidRequest, ModelUnavailable, Overloaded, TooLate
from ner_gateway.core.offsets import convert_entities
from ner_gateway.core.ports import InferenceBackend
from ner_gateway.core.registry import ModelRegistry, NerModel
from ner_gateway.core.shadow import ShadowBudget, compare
from ner_gateway.core.tokenizing import TextTokens
from ner_gateway.core.windowing import Window, plan_windows, texts_windows, window_rows
from ner_gateway.observability.metrics import GatewayMetrics, ModelMetrics
from ner_gateway.observability.tracing import TRACER, exemplar

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")
Mirrored = Callable[[], Coroutine[Any, Any, None]]  # a shadow call, started once the live answer is sent
_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_text_chars: int
    max_request_chars: int
    default_timeout_s: float


@dataclass(frozen=True)
class TritonShares:
    """How much of Triton a model's calls may hold (see core/batching.py): ``capacity_tokens`` padded tokens in
    all its calls in flight, ``request_tokens`` of one request, ``calls_in_flight`` calls (None: one per model
    instance)."""

    capacity_tokens: int
    request_tokens: int
    calls_in_flight: int | None = None
    cancel_calls: bool = False  # cancel a call nobody wants any more (settings.triton_cancel_calls)
    overlap_rows: int | None = None  # rows queued to start a call beside another (None: the model's preferred batch)
    overlap_wait_s: float = 0.0  # or the longest they wait for that


@dataclass(frozen=True)
class CpuOffload:
    """Where a large request's CPU stages run: ``executor``, from ``min_chars`` characters on (see settings)."""

    executor: Executor
    min_chars: int


class RecognitionPipeline:
    def __init__(
        self, registry: ModelRegistry, backend: InferenceBackend, limits: Limits,
        metrics: GatewayMetrics | None = None,
        offload: CpuOffload | None = None, admission: Admission | None = None,
        shares: TritonShares | None = None, shadow_budget: ShadowBudget | None = None,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.limits = limits
        self.metrics = metrics
        self.offload = offload
        self.admission = admission
        self.shares = shares or TritonShares(capacity_tokens=1 << 30, request_tokens=1 << 30)
        self.shadow_budget = shadow_budget or ShadowBudget(4, admission)
        self._batchers: dict[tuple[str, ...], Batcher] = {}  # (name, version) or (name, version, "shadow")
        self._model_metrics: dict[str, ModelMetrics] = {}

    def validate(self, request: RecognizeRequest) -> NerModel:
        limits = self.limits
        texts = request.texts
        if not texts:
            raise InvalidRequest("texts must hold at least one text")
        if len(texts) > limits.max_texts_per_request:
            raise InvalidRequest(f"{len(texts)} texts in one request; the limit is "
                                 f"{limits.max_texts_per_request}")
        total = 0
        for index, text in enumerate(texts):
            if len(text) > limits.max_text_chars:
                raise InvalidRequest(f"texts[{index}] has {len(text)} characters; the limit is "
                                     f"{limits.max_text_chars}")
            total += len(text)
        if total > limits.max_request_chars:
            raise InvalidRequest(f"the texts hold {total} characters in all; the limit per request is "
                                 f"{limits.max_request_chars}")
        return self.registry.get(request.model, request.model_version)

    def batcher(self, model: NerModel, shadow: bool = False) -> Batcher:
        """The model version's queue and calls (core/batching.py), made on its first request; shadow calls have
        their own, so that they never hold up the version's live calls (a canary that is also the shadow)."""
        key = model.served.key if not shadow else (*model.served.key, "shadow")
        batcher = self._batchers.get(key)
        if batcher is None:
            served, shares = model.served, self.shares
            max_calls = shares.calls_in_flight or max(1, served.instances)
            limits = BatchLimits(max_rows=served.max_batch_size, max_calls=max_calls,
                                 call_tokens=max(1, shares.capacity_tokens // max_calls),
                                 request_tokens=shares.request_tokens, buckets=model.sequence_buckets,
                                 cancel_calls=shares.cancel_calls,
                                 overlap_rows=shares.overlap_rows or served.preferred_batch_size,
                                 overlap_wait_s=shares.overlap_wait_s)
            batcher = self._batchers[key] = Batcher(
                self.backend, served, model.manifest.output, model.encoder.encode, limits,
                self._metrics_of(model.name))
        return batcher

    def keep_batchers(self, served: set[tuple[str, str]]) -> None:
        """Forget the batchers of versions no longer served (``served``: their keys); work they hold finishes."""
        for key in [key for key in self._batchers if key[:2] not in served]:
            del self._batchers[key]

    def _metrics_of(self, model: str) -> ModelMetrics | None:
        if self.metrics is None:
            return None
        bound = self._model_metrics.get(model)
        if bound is None:
            bound = self._model_metrics[model] = ModelMetrics(self.metrics, model)
        return bound

    async def recognize(self, request: RecognizeRequest, timeout_s: float | None = None,
                        on_model: Callable[[str, str], None] | None = None) -> Recognition:
        """Run one request; ``timeout_s`` is what remains of the caller's deadline (None: the default);
        ``on_model`` hears the model and version the request resolved to as soon as they are known (the RPC
        metrics' labels). Refused at once with Overloaded (RESOURCE_EXHAUSTED) when the gateway already holds all
        the work it may or the model's queue would outlast the deadline, and with TooLate (DEADLINE_EXCEEDED) when
        less time is left than the model's fastest call (``Admission.check_time``)."""
        deadline = Deadline.after(timeout_s if timeout_s is not None else self.limits.default_timeout_s)
        try:
            with self.admission.request() if self.admission else _NOTHING:
                try:
                    return await self._recognize(request, deadline, on_model)
                except ModelUnavailable:
                    # The version this call resolved to went out while it waited (unloaded in Triton: a rollout's
                    # last step), and the backend now says so. A call that pinned no version is answered once more
                    # by the version it resolves to now, if that one is ready.
                    model = None if request.model_version else self.validate(request)
                    if model is None or not self.backend.model_ready(model.served):
                        raise
                    return await self._recognize(request, deadline, on_model, model)
        except (Overloaded, TooLate) as e:
            if self.metrics is not None:
                self.metrics.refused.labels(e.reason).inc()
            raise

    async def _recognize(self, request: RecognizeRequest, deadline: Deadline,
                         on_model: Callable[[str, str], None] | None, model: NerModel | None = None,
                         live: bool = True) -> Recognition:
        """``live`` False: a shadow call, outside the live admission and the per-request metrics."""
        loop = asyncio.get_running_loop()
        admission = self.admission if live else None
        # Spans only when this request is traced (the RPC's span records); they carry sizes and names, never text.
        traced = trace.get_current_span().is_recording()
        t_start = time.perf_counter_ns()
        with _span("validate", traced) as span:
            model = model or self.validate(request)
            if span is not None:
                span.set_attributes({"ner.texts": len(request.texts), "ner.model": model.name,
                                     "ner.model_version": model.version})
        if on_model is not None:
            on_model(model.name, model.version)
        batcher = self.batcher(model, shadow=not live)
        if admission is not None:
            admission.check_time(deadline, batcher.fastest_call_s, batcher.expected_wait_s())
        request_id = request.request_id or os.urandom(16).hex()
        texts = request.texts
        offload = self.offload if self.offload and sum(map(len, texts)) >= self.offload.min_chars else None

        async def cpu_stage(work: Callable[[], T]) -> T:
            """A CPU stage: inline for small requests, in the worker pool for large ones (the loop stays free)."""
            return work() if offload is None else await loop.run_in_executor(offload.executor, work)

        t0 = time.perf_counter_ns()
        with _span("tokenize", traced) as span:
            tokens, windows = await cpu_stage(lambda: self._tokenize(model, texts))
            n_tokens = sum(map(len, tokens))
            if span is not None:
                span.set_attributes({"ner.tokens": n_tokens, "ner.windows": len(windows),
                                     "ner.offloaded": bool(offload)})
        # The windows count against the admission limit from here to the answer.
        with admission.windows_of(len(windows)) if admission else _NOTHING:
            t1 = time.perf_counter_ns()
            with _span("triton.infer", traced) as span:
                if span is not None:
                    span.set_attributes({"ner.model": model.name, "ner.model_version": model.version,
                                         "ner.windows": len(windows), "ner.request_id": request_id})
                rows = window_rows(tokens, windows, model.tokenizer.special.count, model.sequence_buckets)
                window_logits = await batcher.infer(rows.contents, rows.lengths, rows.widths, deadline, request_id)
            t2 = time.perf_counter_ns()
            with _span("decode", traced) as span:
                documents = await cpu_stage(lambda: self._decode(model, request, tokens, windows, window_logits))
                if span is not None:
                    span.set_attributes({"ner.aggregation": request.aggregation.value,
                                         "ner.entities": sum(len(d.entities) for d in documents)})
            t3 = time.perf_counter_ns()
            result = Recognition(
                documents=documents, model=model.name, model_version=model.version, request_id=request_id,
                timings=StageTimings((t1 - t0) // 1000, (t2 - t1) // 1000, (t3 - t2) // 1000),
            )
            bound = self._metrics_of(model.name) if live else None
            if bound is not None:
                stages = {"validate": t0 - t_start, "tokenize": t1 - t0, "infer": t2 - t1, "decode": t3 - t2}
                observe_recognition(bound, result, n_tokens, {k: v / 1e9 for k, v in stages.items()},
                                    exemplar() if traced else None)
            return result

    def shadow_of(self, request: RecognizeRequest, live: Recognition) -> Mirrored | None:
        """The mirrored call of an answered request, to start once its answer has been sent (it never delays or
        changes it); None when the request is not mirrored (a pinned call, a version without shadow, the share's
        draw). It takes a slot of the shadow budget when it starts, or is refused (counted): a mirrored call that
        never starts (a cancelled stream, a gateway stopping) holds nothing."""
        if request.model_version:
            return None
        model = self.registry.find(live.model, live.model_version)
        candidate = None if model is None else self.registry.shadow_for(model)
        if model is None or candidate is None:
            return None
        counts = self.metrics.shadow(model.name, model.version, candidate.version) if self.metrics else None
        mirror = replace(request, request_id=f"{live.request_id}-shadow")

        async def mirrored() -> None:
            if not self.shadow_budget.take():
                if counts is not None:
                    counts.refused()
                return
            try:
                answer = await self._recognize(mirror, Deadline.after(self.limits.default_timeout_s), None,
                                               candidate, live=False)
            except Exception as e:  # counted; a candidate that fails every call must not flood the log
                LOGGER.debug("shadow call to %s version %s failed: %r", candidate.name, candidate.version, e)
                if counts is not None:
                    counts.failed()
                return
            finally:
                self.shadow_budget.release()
            score = compare(live.documents, answer.documents)
            if counts is not None:
                counts.scored(score.entities, score.same_documents, score.changed_documents)

        return mirrored

    @staticmethod
    def _tokenize(model: NerModel, texts: list[str]) -> tuple[list[TextTokens], list[Window]]:
        tokens = model.tokenizer.tokenize(texts)
        return tokens, plan_windows(tokens, model.tokenizer.window_capacity, model.window_stride)

    @staticmethod
    def _decode(model: NerModel, request: RecognizeRequest, tokens: list[TextTokens], windows: list[Window],
                window_logits: list[npt.NDArray[np.float32]]) -> list[Document]:
        prefix = model.tokenizer.special.prefix
        ranges = texts_windows(windows)
        merged = [merge(len(text_tokens), windows[first:last], window_logits[first:last], prefix)
                  for text_tokens, (first, last) in zip(tokens, ranges, strict=True)]
        entities = decode_texts(request.texts, merged, [text_tokens.view for text_tokens in tokens], model.labels,
                                request.aggregation, request.constrained)
        return [Document(convert_entities(text, text_entities, request.offset_unit), last - first)
                for text, text_entities, (first, last) in zip(request.texts, entities, ranges, strict=True)]


def _span(name: str, traced: bool) -> AbstractContextManager[trace.Span | None]:
    return TRACER.start_as_current_span(name) if traced else _NOTHING


def observe_recognition(metrics: ModelMetrics, result: Recognition, tokens: int, seconds: dict[str, float],
                        trace_ids: dict[str, str] | None = None) -> None:
    """The per-request histograms and the label mix of one answered request; ``trace_ids``: the stage latencies'
    exemplar (a traced request's ids)."""
    for stage, value in seconds.items():
        metrics.stage_duration[stage].observe(value, exemplar=trace_ids)
    metrics.texts.observe(len(result.documents))
    metrics.tokens.observe(tokens)
    metrics.windows.observe(sum(d.windows for d in result.documents))
    by_label: dict[str, int] = {}
    for document in result.documents:
        for entity in document.entities:
            by_label[entity.label] = by_label.get(entity.label, 0) + 1
    for label, count in by_label.items():
        metrics.entity(label).inc(count)
    metrics.entities.observe(sum(by_label.values()))
