"""Domain errors. Each carries the gRPC status it maps to; one interceptor does the mapping."""

from __future__ import annotations

import grpc

ECHO_CHARS = 64


def echo(value: str) -> str:
    """Client input as an error message shows it: ``repr``, cut to ECHO_CHARS characters with an ellipsis and its
    length, so that no request can make the status details huge (past gRPC's metadata limit, say)."""
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}… ({len(value)} characters)"


class NerError(Exception):
    """Base class: ``str(error)`` is safe to send to the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(NerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(NerError):
    code = grpc.StatusCode.NOT_FOUND


class TritonUnavailable(NerError):
    code = grpc.StatusCode.UNAVAILABLE


class ModelUnavailable(NerError):
    """One model is not ready on any Triton endpoint (e.g. unloaded); the others, and the gateway's health,
    are unaffected (not a TritonUnavailable: that one means the inference servers are gone)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(NerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class TooLate(DeadlineExceeded):
    """Refused at once: what is left of the deadline is shorter than an inference takes now (load shedding)."""

    reason = "deadline"


class Overloaded(NerError):
    """Refused at the door: the gateway holds as much work as it may. ``retry_after_ms`` goes to the client
    as ``grpc-retry-pushback-ms``, which gRPC's retry policy honours."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, reason: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_ms = retry_after_ms


class InferenceFailed(NerError):
    """Triton rejected or failed the inference: a server-side problem, details logged not sent."""

    code = grpc.StatusCode.INTERNAL


class ConfigurationError(Exception):
    """The gateway cannot start with this repository/settings (reported at startup, not per request)."""
