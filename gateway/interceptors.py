"""Server interceptors: domain errors -> gRPC status codes for every RPC, in one place; and the one way
this service wraps an RPC's behaviour (``GuardInterceptor``, ``wrap_rpc``), shared with the metrics
interceptor."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc

from ner_gateway.errors import NerError

LOGGER = logging.getLogger(__name__)
INTERNAL_MESSAGE = "internal error"

Guard = Callable[[grpc.aio.ServicerContext], AbstractAsyncContextManager[None]]


def wrap_rpc(handler: grpc.RpcMethodHandler, guard: Guard) -> grpc.RpcMethodHandler:
    """Run a unary-unary or stream-stream behaviour inside ``guard(context)``; other kinds pass through
    (health's Watch is the only unary-stream method this server has)."""
    if handler.unary_unary:
        unary = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with guard(context):
                return await unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.stream_stream:
        stream = handler.stream_stream

        async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            async with guard(context):
                async for response in stream(requests, context):
                    yield response

        return grpc.stream_stream_rpc_method_handler(stream_stream, handler.request_deserializer,
                                                     handler.response_serializer)
    return handler


def _set_status(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    """Set the RPC's final status instead of ``context.abort``: abort sends the status at once, before the
    outer interceptors (metrics) have unwound, so a client could see the error before it is counted.
    A status set here goes out when the handler returns, after every interceptor has finished."""
    if isinstance(error, NerError) and error.code is not grpc.StatusCode.INTERNAL:
        code, details = error.code, str(error)
    else:
        if isinstance(error, NerError):
            LOGGER.error("%s failed: %s", method, error)
        else:  # anything else is a bug: log the detail, send nothing of it
            LOGGER.exception("%s failed unexpectedly", method, exc_info=error)
        code, details = grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE
    context.set_code(code)
    context.set_details(details)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that runs the behaviour of the RPCs it applies to inside the guard ``guard`` returns."""

    def guard(self, method: str) -> Guard | None:
        """The guard for RPCs of ``method`` (its full name, /package.Service/Method); None leaves them alone."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        guard = None if handler is None else self.guard(handler_call_details.method)
        return handler if guard is None else wrap_rpc(handler, guard)


class ErrorInterceptor(GuardInterceptor):
    def guard(self, method: str) -> Guard:
        @asynccontextmanager
        async def mapped_errors(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            try:
                yield
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # mapped, or reported as INTERNAL; the RPC then ends with that status
                _set_status(context, e, method)

        return mapped_errors
