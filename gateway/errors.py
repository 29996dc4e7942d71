"""Domain errors. Each carries the gRPC status it maps to; one interceptor does the mapping."""

from __future__ import annotations

import grpc


class NerError(Exception):
    """Base class: ``str(error)`` is safe to send to the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidRequest(NerError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(NerError):
    code = grpc.StatusCode.NOT_FOUND


class TritonUnavailable(NerError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(NerError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InferenceFailed(NerError):
    """Triton rejected or failed the inference: a server-side problem, details logged not sent."""

    code = grpc.StatusCode.INTERNAL


class ConfigurationError(Exception):
    """The gateway cannot start with this repository/settings (reported at startup, not per request)."""
