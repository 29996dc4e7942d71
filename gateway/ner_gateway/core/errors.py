"""The domain errors, free of any transport: ``transport/status.py`` maps each to a gRPC status code, in one table."""

from __future__ import annotations

ECHO_CHARS = 64


def echo(value: str) -> str:
    """Client input as an error message shows it: ``repr``, cut to ECHO_CHARS characters with an ellipsis and its
    length, so that no request can make the status details huge (past gRPC's metadata limit, say)."""
    if len(value) <= ECHO_CHARS:
        return repr(value)
    return f"{value[:ECHO_CHARS]!r}… ({len(value)} characters)"


class NerError(Exception):
    """Base class: ``str(error)`` is safe to send to the client."""


class InvalidRequest(NerError):
    """The request breaks a rule of the API or a limit: the caller must change it."""


class ModelNotFound(NerError):
    """The request names a model the gateway does not serve."""


class TritonUnavailable(NerError):
    """No inference server can be reached: retry later."""


class ModelUnavailable(NerError):
    """One model is not ready on any Triton endpoint (e.g. unloaded); the others, and the gateway's health,
    are unaffected (not a TritonUnavailable: that one means the inference servers are gone)."""


class DeadlineExceeded(NerError):
    """The caller's deadline passed before the answer was ready."""


class TooLate(DeadlineExceeded):
    """Refused at once: what is left of the deadline is shorter than the model's fastest call (no wait helps)."""

    reason = "deadline"


class Overloaded(NerError):
    """Refused at once: the gateway holds as much work as it may, or the model's queue would outlast the request's
    deadline (``reason``). ``retry_after_ms`` goes to the client as ``grpc-retry-pushback-ms``, which gRPC's retry
    policy honours."""

    def __init__(self, message: str, reason: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_ms = retry_after_ms


class InferenceFailed(NerError):
    """Triton rejected or failed the inference: a server-side problem, details logged not sent."""


class ConfigurationError(Exception):
    """The gateway cannot start with this repository/settings (reported at startup, not per request)."""
