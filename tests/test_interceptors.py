"""The error and metrics interceptors on a real in-process grpc.aio server."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest

import ner_gateway.core.errors as domain_errors
from ner_gateway.core.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    NerError,
    Overloaded,
    TooLate,
    TritonUnavailable,
)
from ner_gateway.observability.metrics import GatewayMetrics
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.transport.interceptors import ErrorInterceptor, Guard, GuardInterceptor
from ner_gateway.transport.rpc_metrics import MetricsInterceptor
from ner_gateway.transport.servicer import NerServicer
from ner_gateway.transport.status import STATUS_OF


class FailingPipeline:
    """Stands in for the pipeline: raises whatever the test asks for (the servicer and interceptors are real)."""

    def __init__(self) -> None:
        self.error: BaseException = RuntimeError("secret detail: /etc/passwd")

    async def recognize(self, request, timeout_s, on_model=None):  # type: ignore[no-untyped-def]
        raise self.error


@asynccontextmanager
async def serving(pipeline: FailingPipeline, interceptors: list[grpc.aio.ServerInterceptor]) -> AsyncIterator[int]:
    """A real aio server with the real servicer behind ``interceptors``, on a free loopback port (yielded)."""
    aio_server = grpc.aio.server(interceptors=interceptors)
    ner_pb2_grpc.add_NerServiceServicer_to_server(NerServicer(pipeline), aio_server)  # type: ignore[arg-type]
    port = aio_server.add_insecure_port("127.0.0.1:0")
    await aio_server.start()
    try:
        yield port
    finally:
        await aio_server.stop(0)


@pytest.fixture
async def server():
    pipeline, metrics = FailingPipeline(), GatewayMetrics()
    async with serving(pipeline, [MetricsInterceptor(metrics), ErrorInterceptor()]) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield pipeline, metrics, ner_pb2_grpc.NerServiceStub(channel)


@pytest.mark.parametrize(
    ("error", "code", "details"),
    [
        (RuntimeError("secret detail: /etc/passwd"), grpc.StatusCode.INTERNAL, "internal error"),
        (InferenceFailed("model exploded at layer 3"), grpc.StatusCode.INTERNAL, "internal error"),
        (TritonUnavailable("the inference server is unavailable; retry later"), grpc.StatusCode.UNAVAILABLE,
         "the inference server is unavailable; retry later"),
        (ModelUnavailable("model 'm' is not ready"), grpc.StatusCode.UNAVAILABLE, "model 'm' is not ready"),
        (InvalidRequest("texts must hold at least one text"), grpc.StatusCode.INVALID_ARGUMENT,
         "texts must hold at least one text"),
        (ModelNotFound("model 'x' not found"), grpc.StatusCode.NOT_FOUND, "model 'x' not found"),
        (DeadlineExceeded("deadline exceeded before inference"), grpc.StatusCode.DEADLINE_EXCEEDED,
         "deadline exceeded before inference"),
        (TooLate("not started"), grpc.StatusCode.DEADLINE_EXCEEDED, "not started"),  # by its base class
        (Overloaded("at capacity", "requests", 250), grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else None,
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
        assert sample("ner_requests_total", {"method": method, "model": "", "version": "", "code": code.name}) == 1
        assert sample("ner_inflight_requests", {"method": method}) == 0


def test_every_domain_error_has_its_status_in_the_table() -> None:
    """A new domain error must be given its code (transport/status.py); one without would answer INTERNAL."""
    declared = {value for value in vars(domain_errors).values()
                if isinstance(value, type) and issubclass(value, NerError) and value is not TooLate}
    assert declared == set(STATUS_OF)  # TooLate answers as its base, DeadlineExceeded (asserted above)


class SlowToUnwind(GuardInterceptor):
    """An outer interceptor (like the metrics one) whose exit takes a while and records that it ran."""

    def __init__(self) -> None:
        self.unwound = threading.Event()

    def guard(self, method: str) -> Guard:
        @asynccontextmanager
        async def slow_exit(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            try:
                yield
            finally:
                await asyncio.sleep(0.3)
                self.unwound.set()

        return slow_exit


async def test_error_status_is_sent_only_after_outer_interceptors_unwound() -> None:
    """``context.abort`` would send the status at once, so a client could read the error (and scrape
    /metrics) before the metrics interceptor had counted it: the status must go out after every
    interceptor has finished."""
    pipeline, outer = FailingPipeline(), SlowToUnwind()
    pipeline.error = TritonUnavailable("the inference server is unavailable; retry later")

    def call_from_another_thread(port: int) -> tuple[grpc.StatusCode, bool]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                ner_pb2_grpc.NerServiceStub(channel).Recognize(ner_pb2.RecognizeRequest(texts=["x"]), timeout=5)
            except grpc.RpcError as e:
                return e.code(), outer.unwound.is_set()
        raise AssertionError("the call should have failed")

    async with serving(pipeline, [outer, ErrorInterceptor()]) as port:
        assert await asyncio.to_thread(call_from_another_thread, port) == (grpc.StatusCode.UNAVAILABLE, True)


async def test_undecodable_requests_are_invalid_argument_and_counted(caplog) -> None:
    """grpc deserializes before any interceptor runs and answers a parse failure with UNKNOWN; the error
    interceptor turns it into INVALID_ARGUMENT (for a stream, at the bad message), counted by its real code."""
    metrics, garbage = GatewayMetrics(), b"\x0a\x02\xff\xfe"  # texts = invalid UTF-8
    details = "request is not a valid ner.v1.RecognizeRequest message"
    async with serving(FailingPipeline(), [MetricsInterceptor(metrics), ErrorInterceptor()]) as port:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary = channel.unary_unary("/ner.v1.NerService/Recognize")  # no serializers: bytes on the wire
            stream = channel.stream_stream("/ner.v1.NerService/RecognizeStream")
            for call in (lambda: unary(garbage, timeout=5), lambda: stream(iter([garbage]), timeout=5).read()):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call()
                assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, details)
    sample = metrics.registry.get_sample_value
    for method in ("Recognize", "RecognizeStream"):
        refused = {"method": method, "model": "", "version": "", "code": "INVALID_ARGUMENT"}
        assert sample("ner_requests_total", refused) == 1
        assert sample("ner_inflight_requests", {"method": method}) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
