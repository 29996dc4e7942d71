"""ner.v1.NerService: converts messages and calls the pipeline, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from ner_gateway.core.pipeline import RecognitionPipeline
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.transport import convert


class NerServicer(ner_pb2_grpc.NerServiceServicer):
    def __init__(self, pipeline: RecognitionPipeline) -> None:
        self.pipeline = pipeline

    async def Recognize(
        self, request: ner_pb2.RecognizeRequest, context: grpc.aio.ServicerContext
    ) -> ner_pb2.RecognizeResponse:
        result = await self.pipeline.recognize(convert.request_from_pb(request), context.time_remaining())
        return convert.response_to_pb(result)

    async def RecognizeStream(
        self, request_iterator: AsyncIterator[ner_pb2.RecognizeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ner_pb2.RecognizeResponse]:
        async for request in request_iterator:
            result = await self.pipeline.recognize(convert.request_from_pb(request), context.time_remaining())
            yield convert.response_to_pb(result)

    async def ListModels(
        self, request: ner_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> ner_pb2.ListModelsResponse:
        registry, backend = self.pipeline.registry, self.pipeline.backend
        return ner_pb2.ListModelsResponse(models=[
            convert.model_info_to_pb(m, m.name == registry.default_name, backend.model_ready(m.name)) for m in registry
        ])
