"""The error and metrics interceptors on a real in-process grpc.aio server."""

from __future__ import annotations

import grpc
import pytest

from ner_gateway.errors import InferenceFailed, TritonUnavailable
from ner_gateway.interceptors import ErrorInterceptor
from ner_gateway.metrics import GatewayMetrics, MetricsInterceptor
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.servicer import NerServicer


class FailingPipeline:
    """Stands in for the pipeline: raises whatever the test asks for (the servicer and interceptors are real)."""

    def __init__(self) -> None:
        self.error: BaseException = RuntimeError("secret detail: /etc/passwd")

    async def recognize(self, request, timeout_s):  # type: ignore[no-untyped-def]
        raise self.error


@pytest.fixture
async def server():
    pipeline, metrics = FailingPipeline(), GatewayMetrics()
    aio_server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics), ErrorInterceptor()])
    ner_pb2_grpc.add_NerServiceServicer_to_server(NerServicer(pipeline), aio_server)  # type: ignore[arg-type]
    port = aio_server.add_insecure_port("127.0.0.1:0")
    await aio_server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pipeline, metrics, ner_pb2_grpc.NerServiceStub(channel)
    await aio_server.stop(0)


@pytest.mark.parametrize(
    ("error", "code", "details"),
    [
        (RuntimeError("secret detail: /etc/passwd"), grpc.StatusCode.INTERNAL, "internal error"),
        (InferenceFailed("model exploded at layer 3"), grpc.StatusCode.INTERNAL, "internal error"),
        (TritonUnavailable("the inference server is unavailable; retry later"), grpc.StatusCode.UNAVAILABLE,
         "the inference server is unavailable; retry later"),
    ],
)
async def test_errors_map_to_status_and_internal_details_stay_private(server, error, code, details) -> None:
    pipeline, metrics, stub = server
    pipeline.error = error
    for call in (
        lambda: stub.Recognize(ner_pb2.RecognizeRequest(texts=["x"]), timeout=5),
        lambda: stub.RecognizeStream(iter([ner_pb2.RecognizeRequest(texts=["x"])]), timeout=5).read(),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call()
        assert (info.value.code(), info.value.details()) == (code, details)
    sample = metrics.registry.get_sample_value
    for method in ("Recognize", "RecognizeStream"):
        assert sample("ner_requests_total", {"method": method, "model": "", "code": code.name}) == 1
        assert sample("ner_inflight_requests", {"method": method}) == 0
