"""The transport-free core: validate -> tokenize -> infer (Triton) -> decode -> offsets."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ner_gateway.decoding import decode
from ner_gateway.domain import Aggregation, Recognition, RecognizeRequest, StageTimings
from ner_gateway.errors import InvalidRequest, NotImplementedYet, TritonUnavailable
from ner_gateway.models import ModelRegistry, NerModel
from ner_gateway.offsets import convert_entities
from ner_gateway.tokenization import EncodedBatch
from ner_gateway.triton_backend import TritonBackend

LOGGER = logging.getLogger(__name__)

SUPPORTED_AGGREGATIONS = frozenset({Aggregation.NONE, Aggregation.SIMPLE})


@dataclass(frozen=True)
class Limits:
    max_texts_per_request: int
    max_text_chars: int
    default_timeout_s: float


class RecognitionPipeline:
    def __init__(
        self, registry: ModelRegistry, backend: TritonBackend, limits: Limits,
        on_triton_unavailable: Callable[[], None] = lambda: None,
    ) -> None:
        self.registry = registry
        self.backend = backend
        self.limits = limits
        self.on_triton_unavailable = on_triton_unavailable

    def validate(self, request: RecognizeRequest) -> NerModel:
        if not request.texts:
            raise InvalidRequest("texts must hold at least one text")
        if len(request.texts) > self.limits.max_texts_per_request:
            raise InvalidRequest(f"{len(request.texts)} texts in one request; the limit is "
                                 f"{self.limits.max_texts_per_request}")
        for index, text in enumerate(request.texts):
            if len(text) > self.limits.max_text_chars:
                raise InvalidRequest(f"texts[{index}] has {len(text)} characters; the limit is "
                                     f"{self.limits.max_text_chars}")
        if request.aggregation not in SUPPORTED_AGGREGATIONS:
            raise NotImplementedYet(f"aggregation {request.aggregation.name} is not implemented yet; "
                                    "use SIMPLE or NONE")
        return self.registry.get(request.model)

    async def recognize(self, request: RecognizeRequest, timeout_s: float | None = None) -> Recognition:
        """Run one request; ``timeout_s`` is what remains of the caller's deadline (None: the default)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (timeout_s if timeout_s is not None else self.limits.default_timeout_s)
        model = self.validate(request)
        request_id = request.request_id or uuid.uuid4().hex

        t0 = time.perf_counter_ns()
        batch = model.tokenizer.encode(request.texts)
        t1 = time.perf_counter_ns()
        logits = await self._infer(model, batch, deadline, request_id)
        t2 = time.perf_counter_ns()
        documents = []
        for row, text in enumerate(request.texts):
            entities = decode(text, logits[row], batch.offsets(row), batch.special_mask(row), model.labels,
                              request.aggregation)
            documents.append(convert_entities(text, entities, request.offset_unit))
        t3 = time.perf_counter_ns()
        return Recognition(
            documents=documents, model=model.name, model_version=model.served.version, request_id=request_id,
            timings=StageTimings((t1 - t0) // 1000, (t2 - t1) // 1000, (t3 - t2) // 1000),
        )

    async def _infer(self, model: NerModel, batch: EncodedBatch, deadline: float,
                     request_id: str) -> list[np.ndarray]:
        """Logits per text (each [its tokens, classes]); batches above Triton's max go out concurrently."""
        loop = asyncio.get_running_loop()
        size = model.served.max_batch_size
        chunks = [slice(i, i + size) for i in range(0, len(batch.encodings), size)]
        try:
            results = await asyncio.gather(*(
                self.backend.infer(model.served, batch.arrays(model.manifest.inputs, rows), model.manifest.output,
                                   deadline - loop.time(), request_id)
                for rows in chunks
            ))
        except TritonUnavailable:
            self.on_triton_unavailable()
            raise
        lengths = batch.lengths
        logits = []
        for rows, result in zip(chunks, results, strict=True):
            logits.extend(result[i, : lengths[rows.start + i]] for i in range(result.shape[0]))
        return logits
