"""Server interceptors: domain errors -> gRPC status codes for every RPC, in one place (a request that does
not parse included: INVALID_ARGUMENT, not grpc's UNKNOWN); and the one way this service wraps an RPC's
behaviour (``GuardInterceptor``, ``wrap_rpc``), shared with the metrics interceptor."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from ner_gateway.core.errors import InvalidRequest, NerError, Overloaded
from ner_gateway.transport.rpc_types import Context, Continuation, Handler
from ner_gateway.transport.status import status_of

LOGGER = logging.getLogger(__name__)
INTERNAL_MESSAGE = "internal error"

Guard = Callable[[Context], AbstractAsyncContextManager[None]]


def wrap_rpc(handler: Handler, guard: Guard) -> Handler:
    """Run the behaviour of an RPC of any kind inside ``guard(context)``."""
    behaviour = _behaviour(handler)
    if handler.response_streaming:

        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            async with guard(context):
                responses = behaviour(request, context)
                if inspect.isawaitable(responses):  # it writes with context.write (health's Watch)
                    await responses
                else:
                    async for response in responses:
                        yield response

        return rebuilt(handler, streaming, handler.request_deserializer)

    async def single(request: Any, context: Context) -> Any:
        async with guard(context):
            return await behaviour(request, context)

    return rebuilt(handler, single, handler.request_deserializer)


def _behaviour(handler: Handler) -> Callable[..., Any]:
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    assert behaviour is not None, "a gRPC method handler has one behaviour"
    return behaviour


def rebuilt(handler: Handler, behaviour: Callable[..., Any],
            deserializer: Callable[[bytes], Any] | None) -> Handler:
    """A handler of ``handler``'s kind with another behaviour and request deserializer."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(behaviour, deserializer, handler.response_serializer)


@dataclass(frozen=True)
class Undecodable:
    """What a request that does not parse deserializes to, with the message the client gets for it."""

    details: str


def reject_undecodable(handler: Handler, method: str) -> Handler:
    """``handler`` whose request deserializer returns ``Undecodable`` for a message that does not parse and
    whose behaviour raises InvalidRequest for it where it reads it: for a stream, at the bad message.

    grpc runs the deserializer outside every interceptor and answers one that raises with UNKNOWN (and a
    traceback in the log); raised in the behaviour instead, the error interceptor maps it like any other and
    the metrics interceptor counts it as INVALID_ARGUMENT."""
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler  # raw bytes: nothing to parse
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    undecodable = Undecodable(f"request is not a valid {descriptor.full_name} message" if descriptor
                              else "request is not a valid protobuf message")

    def tolerant(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError:
            LOGGER.debug("%s: rejected a request of %d bytes that does not parse", method, len(data))
            return undecodable

    behaviour = _behaviour(handler)

    def checked(request: Any, context: Context) -> Any:
        return behaviour(_decoded_stream(request) if handler.request_streaming else _decoded(request), context)

    return rebuilt(handler, checked, tolerant)


def _decoded(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise InvalidRequest(request.details)
    return request


async def _decoded_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


def set_status(context: Context, error: Exception, method: str) -> None:
    """Set the RPC's final status instead of ``context.abort``: abort sends the status at once, before the
    outer interceptors (metrics) have unwound, so a client could see the error before it is counted.
    A status set here goes out when the handler returns, after every interceptor has finished."""
    code = status_of(error)
    if code is not grpc.StatusCode.INTERNAL:
        details = str(error)
    else:
        if isinstance(error, NerError):
            LOGGER.error("%s failed: %s", method, error)
        else:  # anything else is a bug: log the detail, send nothing of it
            LOGGER.exception("%s failed unexpectedly", method, exc_info=error)
        details = INTERNAL_MESSAGE
    if isinstance(error, Overloaded):  # the standard hint, honoured by gRPC's retry policy (gRFC A6)
        context.set_trailing_metadata((("grpc-retry-pushback-ms", str(error.retry_after_ms)),))
    context.set_code(code)
    context.set_details(details)


class GuardInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that runs the behaviour of the RPCs it applies to inside the guard ``guard`` returns."""

    def guard(self, method: str) -> Guard | None:
        """The guard for RPCs of ``method`` (its full name, /package.Service/Method); None leaves them alone."""
        raise NotImplementedError

    def prepare(self, handler: Handler, method: str) -> Handler:
        """The handler to guard, from the service's own (by default that one)."""
        return handler

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:  # no such method: grpc answers UNIMPLEMENTED
            return None
        method = handler_call_details.method
        # Wrapped once per method and handler: the service's handler is the same object on every call, and so is
        # the door's refusal (a handler made for one call, such as an authentication refusal, is wrapped anew).
        key = (method, id(handler))
        wrapped = self._wrapped.get(key)
        if wrapped is not None and wrapped[0] is handler:
            return wrapped[1]
        guard = self.guard(method)
        result = handler if guard is None else wrap_rpc(self.prepare(handler, method), guard)
        if len(self._wrapped) < 64:  # the service's handlers and the door's refusals, not one-off handlers
            self._wrapped[key] = (handler, result)
        return result

    @functools.cached_property
    def _wrapped(self) -> dict[tuple[str, int], tuple[Handler, Handler]]:
        """(method, id of the handler it had) -> (that handler, wrapped)."""
        return {}


class ErrorInterceptor(GuardInterceptor):
    """Maps the errors of every RPC to status codes, a request that does not parse included."""

    def prepare(self, handler: Handler, method: str) -> Handler:
        return reject_undecodable(handler, method)

    def guard(self, method: str) -> Guard:
        @asynccontextmanager
        async def mapped_errors(context: Context) -> AsyncIterator[None]:
            try:
                yield
            except grpc.aio.AbortError:
                raise
            except Exception as e:  # mapped, or reported as INTERNAL; the RPC then ends with that status
                set_status(context, e, method)

        return mapped_errors
