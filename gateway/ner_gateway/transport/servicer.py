"""ner.v1.NerService: converts messages and calls the pipeline, nothing else (and starts a shadow call once its
live answer has been sent)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from ner_gateway.core.domain import Recognition, RecognizeRequest
from ner_gateway.core.pipeline import Mirrored, RecognitionPipeline
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.transport import convert
from ner_gateway.transport.background import BackgroundTasks
from ner_gateway.transport.rpc_types import Context

# Reports the model and version a call resolved to (MetricsInterceptor.label_model).
ModelLabeller = Callable[[Context, str, str], None]


class NerServicer(ner_pb2_grpc.NerServiceServicer):
    def __init__(self, pipeline: RecognitionPipeline, label_model: ModelLabeller | None = None,
                 background: BackgroundTasks | None = None) -> None:
        self.pipeline = pipeline
        self.label_model = label_model
        self.background = background or BackgroundTasks()

    async def _recognize(self, request: RecognizeRequest, context: Context) -> Recognition:
        label = self.label_model
        return await self.pipeline.recognize(
            request, context.time_remaining(),
            on_model=None if label is None else lambda model, version: label(context, model, version))

    def _mirror(self, mirrored: Mirrored) -> None:
        self.background.start(mirrored(), name="shadow")

    async def Recognize(
        self, request: ner_pb2.RecognizeRequest, context: Context
    ) -> ner_pb2.RecognizeResponse:
        domain = convert.request_from_pb(request)
        result = await self._recognize(domain, context)
        mirrored = self.pipeline.shadow_of(domain, result)
        if mirrored is not None:  # once the answer is sent (the RPC is done), never before

            def when_done(ctx: Context) -> None:
                self._mirror(mirrored)

            # types-grpcio declares the callback as a class, not a protocol: no function matches it.
            context.add_done_callback(when_done)  # type: ignore[arg-type]
        return convert.response_to_pb(result)

    async def RecognizeStream(
        self, request_iterator: AsyncIterator[ner_pb2.RecognizeRequest], context: Context
    ) -> AsyncIterator[ner_pb2.RecognizeResponse]:
        async for request in request_iterator:
            domain = convert.request_from_pb(request)
            result = await self._recognize(domain, context)
            mirrored = self.pipeline.shadow_of(domain, result)
            yield convert.response_to_pb(result)
            if mirrored is not None:  # the generator resumes once the answer has been written
                self._mirror(mirrored)

    async def ListModels(
        self, request: ner_pb2.ListModelsRequest, context: Context
    ) -> ner_pb2.ListModelsResponse:
        registry = self.pipeline.registry
        return ner_pb2.ListModelsResponse(models=[
            convert.model_info_to_pb(m, m.name == registry.default_name, registry.listing(m.name)) for m in registry
        ])
