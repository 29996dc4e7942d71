"""The transport-free core: validate -> tokenize (windows) -> infer (Triton) -> merge -> decode -> offsets."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from itertools import groupby
from typing import Protocol, TypeVar

import numpy as np

from ner_gateway.decoding import decode
from ner_gateway.domain import Document, Recognition, RecognizeRequest, StageTimings
from ner_gateway.errors import InvalidRequest, TritonUnavailable
from ner_gateway.metrics import GatewayMetrics, current_model
from ner_gateway.models import ModelRegistry, NerModel
from ner_gateway.offsets import convert_entities
from ner_gateway.tokenization import TextTokens, Window
from ner_gateway.tracing import TRACER
from ner_gateway.triton_pool import TritonPool

LOGGER = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_text_chars: int
    max_request_chars: int
    default_timeout_s: float


class CpuStage(Protocol):
    """Runs one CPU stage of a request: inline, or in the offload pool for large requests."""

    def __call__(self, work: Callable[[], T]) -> Awaitable[T]: ...


@dataclass(frozen=True)
class CpuOffload:
    """Where a large request's CPU stages run: ``executor``, from ``min_chars`` characters on (see settings)."""

    executor: Executor
    min_chars: int


class RecognitionPipeline:
    def __init__(
        self, registry: ModelRegistry, backend: TritonPool, limits: Limits,
        on_triton_unavailable: Callable[[], None] = lambda: None, metrics: GatewayMetrics | None = None,
        offload: CpuOffload | None = None,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.limits = limits
        self.on_triton_unavailable = on_triton_unavailable
        self.metrics = metrics
        self.offload = offload

    def validate(self, request: RecognizeRequest) -> NerModel:
        limits = self.limits
        if not request.texts:
            raise InvalidRequest("texts must hold at least one text")
        if len(request.texts) > limits.max_texts_per_request:
            raise InvalidRequest(f"{len(request.texts)} texts in one request; the limit is "
                                 f"{limits.max_texts_per_request}")
        for index, text in enumerate(request.texts):
            if len(text) > limits.max_text_chars:
                raise InvalidRequest(f"texts[{index}] has {len(text)} characters; the limit is "
                                     f"{limits.max_text_chars}")
        total = sum(map(len, request.texts))
        if total > limits.max_request_chars:
            raise InvalidRequest(f"the texts hold {total} characters in all; the limit per request is "
                                 f"{limits.max_request_chars}")
        return self.registry.get(request.model)

    async def recognize(self, request: RecognizeRequest, timeout_s: float | None = None) -> Recognition:
        """Run one request; ``timeout_s`` is what remains of the caller's deadline (None: the default)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s if timeout_s is not None else self.limits.default_timeout_s)
        # Spans carry sizes and names, never the raw text.
        t_start = time.perf_counter_ns()
        with TRACER.start_as_current_span("validate") as span:
            span.set_attribute("ner.texts", len(request.texts))
            model = self.validate(request)
            span.set_attribute("ner.model", model.name)
        current_model.set(model.name)
        request_id = request.request_id or uuid.uuid4().hex
        offload = self.offload if self.offload and sum(map(len, request.texts)) >= self.offload.min_chars else None

        async def cpu_stage(work: Callable[[], T]) -> T:
            """A CPU stage: inline for small requests, in the worker pool for large ones (the loop stays free)."""
            return work() if offload is None else await loop.run_in_executor(offload.executor, work)

        t0 = time.perf_counter_ns()
        with TRACER.start_as_current_span("tokenize") as span:
            tokens, windows = await cpu_stage(lambda: self._tokenize(model, request.texts))
            n_tokens = sum(map(len, tokens))
            span.set_attributes({"ner.tokens": n_tokens, "ner.windows": len(windows), "ner.offloaded": bool(offload)})
        t1 = time.perf_counter_ns()
        with TRACER.start_as_current_span("triton.infer") as span:
            span.set_attributes({"ner.model": model.name, "ner.model_version": model.served.version,
                                 "ner.windows": len(windows), "ner.request_id": request_id})
            window_logits = await self._infer(model, tokens, windows, deadline, request_id, cpu_stage)
        t2 = time.perf_counter_ns()
        with TRACER.start_as_current_span("decode") as span:
            documents = await cpu_stage(lambda: self._decode(model, request, tokens, windows, window_logits))
            span.set_attributes({"ner.aggregation": request.aggregation.value,
                                 "ner.entities": sum(len(d.entities) for d in documents)})
        t3 = time.perf_counter_ns()
        result = Recognition(
            documents=documents, model=model.name, model_version=model.served.version, request_id=request_id,
            timings=StageTimings((t1 - t0) // 1000, (t2 - t1) // 1000, (t3 - t2) // 1000),
        )
        if self.metrics is not None:
            stages = {"validate": t0 - t_start, "tokenize": t1 - t0, "infer": t2 - t1, "decode": t3 - t2}
            self.metrics.observe_recognition(result, n_tokens, {k: v / 1e9 for k, v in stages.items()})
        return result

    @staticmethod
    def _tokenize(model: NerModel, texts: list[str]) -> tuple[list[TextTokens], list[Window]]:
        tokens = model.tokenizer.tokenize(texts)
        return tokens, model.tokenizer.plan_windows(tokens, model.window_stride)

    @staticmethod
    def _decode(model: NerModel, request: RecognizeRequest, tokens: list[TextTokens], windows: list[Window],
                window_logits: list[np.ndarray]) -> list[Document]:
        documents = []
        by_text = groupby(zip(windows, window_logits, strict=True), key=lambda pair: pair[0].text)
        for (_, pairs), text, text_tokens in zip(by_text, request.texts, tokens, strict=True):
            text_windows, logits = zip(*pairs, strict=True)
            merged = model.tokenizer.merge(len(text_tokens), list(text_windows), list(logits))
            entities = decode(text, merged, text_tokens.view, model.labels, request.aggregation, request.constrained)
            documents.append(Document(convert_entities(text, entities, request.offset_unit), len(text_windows)))
        return documents

    async def _infer(self, model: NerModel, tokens: list[TextTokens], windows: list[Window], deadline: float,
                     request_id: str, cpu_stage: CpuStage) -> list[np.ndarray]:
        """Logits per window ([its tokens with specials, classes]); all windows of all texts go to Triton
        in batches of at most its max_batch_size, sent concurrently. ``cpu_stage`` builds their arrays."""
        loop = asyncio.get_running_loop()
        size = model.served.max_batch_size
        # Longest windows together: each Triton call pads to its own longest window, so sorting first keeps
        # the padding (and, for engines, the bucket) small.
        order = sorted(range(len(windows)), key=lambda i: windows[i].end - windows[i].start)
        chunks = [[windows[i] for i in order[start : start + size]] for start in range(0, len(order), size)]
        inputs = await cpu_stage(lambda: [model.tokenizer.arrays(tokens, chunk, model.sequence_buckets)
                                          for chunk in chunks])
        try:
            results = await asyncio.gather(*(
                self.backend.infer(model.served, arrays, model.manifest.output, deadline - loop.time(), request_id)
                for arrays in inputs
            ))
        except TritonUnavailable:
            self.on_triton_unavailable()
            raise
        specials = model.tokenizer.special_tokens
        sorted_logits = [
            result[row, : window.end - window.start + specials]
            for chunk, result in zip(chunks, results, strict=True)
            for row, window in enumerate(chunk)
        ]
        logits: list[np.ndarray] = [np.empty(0)] * len(windows)
        for position, index in enumerate(order):
            logits[index] = sorted_logits[position]
        return logits
