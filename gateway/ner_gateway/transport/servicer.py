"""ner.v1.NerService: converts messages and calls the pipeline, nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from ner_gateway.core.pipeline import RecognitionPipeline
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.transport import convert
from ner_gateway.transport.rpc_types import Context

# Reports the model a call resolved to (MetricsInterceptor.label_model).
ModelLabeller = Callable[[Context, str], None]


class NerServicer(ner_pb2_grpc.NerServiceServicer):
    def __init__(self, pipeline: RecognitionPipeline, label_model: ModelLabeller | None = None) -> None:
        self.pipeline = pipeline
        self.label_model = label_model

    async def _recognize(
        self, request: ner_pb2.RecognizeRequest, context: Context
    ) -> ner_pb2.RecognizeResponse:
        label = self.label_model
        result = await self.pipeline.recognize(
            convert.request_from_pb(request), context.time_remaining(),
            on_model=None if label is None else lambda model: label(context, model))
        return convert.response_to_pb(result)

    async def Recognize(
        self, request: ner_pb2.RecognizeRequest, context: Context
    ) -> ner_pb2.RecognizeResponse:
        return await self._recognize(request, context)

    async def RecognizeStream(
        self, request_iterator: AsyncIterator[ner_pb2.RecognizeRequest], context: Context
    ) -> AsyncIterator[ner_pb2.RecognizeResponse]:
        async for request in request_iterator:
            yield await self._recognize(request, context)

    async def ListModels(
        self, request: ner_pb2.ListModelsRequest, context: Context
    ) -> ner_pb2.ListModelsResponse:
        registry, backend = self.pipeline.registry, self.pipeline.backend
        return ner_pb2.ListModelsResponse(models=[
            convert.model_info_to_pb(m, m.name == registry.default_name, backend.model_ready(m.name)) for m in registry
        ])
