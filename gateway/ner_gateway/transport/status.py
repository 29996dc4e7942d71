"""Domain errors -> gRPC status codes: the one table (the core's errors know nothing of gRPC).

An error class not in the table is looked up by its bases (``TooLate`` answers as ``DeadlineExceeded``); what
maps to INTERNAL, and any exception that is not a domain error, is logged and answered with a fixed message:
its text may hold server detail the caller must not see.
"""

from __future__ import annotations

import grpc

from ner_gateway.core.errors import (
    DeadlineExceeded,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    NerError,
    Overloaded,
    TritonUnavailable,
)

STATUS_OF: dict[type[NerError], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    TritonUnavailable: grpc.StatusCode.UNAVAILABLE,
    ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    NerError: grpc.StatusCode.INTERNAL,
}


def status_of(error: BaseException) -> grpc.StatusCode:
    """The status code an RPC that failed with ``error`` ends with."""
    for cls in type(error).__mro__:
        code = STATUS_OF.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL
