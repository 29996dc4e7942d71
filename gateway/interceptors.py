"""Maps domain errors to gRPC status codes for every RPC, in one place."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from ner_gateway.errors import NerError

LOGGER = logging.getLogger(__name__)
INTERNAL_MESSAGE = "internal error"


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str) -> None:
    if isinstance(error, NerError):
        if error.code is grpc.StatusCode.INTERNAL:
            LOGGER.error("%s failed: %s", method, error)
            await context.abort(error.code, INTERNAL_MESSAGE)
        await context.abort(error.code, str(error))
    # Anything else is a bug: log the detail, send nothing of it.
    LOGGER.exception("%s failed unexpectedly", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        if handler.unary_unary:
            behaviour = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behaviour(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort(context, e, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            stream_behaviour = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for response in stream_behaviour(requests, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort(context, e, method)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler  # unary-stream / stream-unary: none in this service (health Watch passes through)
