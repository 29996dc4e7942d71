"""Bearer-token authentication: one server interceptor, tokens from the settings and a file re-read on change.

Tokens are kept only as SHA-256 digests and compared in constant time; no token (accepted or presented) is
ever logged, counted or sent back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import grpc

from ner_gateway.core.errors import ConfigurationError
from ner_gateway.observability.metrics import GatewayMetrics
from ner_gateway.secret_files import FileStamp, file_stamp, parse_tokens
from ner_gateway.settings import GatewaySettings
from ner_gateway.transport.interceptors import rebuilt
from ner_gateway.transport.rpc_types import Context, Continuation, Handler

LOGGER = logging.getLogger(__name__)

MISSING = "missing bearer token: send 'authorization: Bearer <token>'"
REJECTED = "bearer token not accepted"
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIX = "/grpc.reflection."


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then takes as long for any presented token, whatever its length.
    return hashlib.sha256(token.encode()).digest()


class BearerTokens:
    """The accepted tokens: fixed ones plus those of a file, re-read when its mtime, size or inode changes."""

    def __init__(self, tokens: Iterable[str] = (), file: Path | None = None) -> None:
        self._fixed = [_digest(t) for t in tokens]
        self.file = file
        self._file_digests: list[bytes] = []
        self._stamp: FileStamp | None = None
        if file is not None:
            try:
                self._reload()
            except OSError as e:
                raise ConfigurationError(f"cannot read the bearer token file {file}: {e.strerror}") from e
        if not self._fixed and not self._file_digests:
            raise ConfigurationError(f"no bearer tokens in {file or 'NER_AUTH_TOKENS'}")
        LOGGER.info("bearer-token authentication on: %d tokens", len(self._fixed) + len(self._file_digests))

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> BearerTokens | None:
        """None when authentication is off (neither ``auth_tokens`` nor ``auth_tokens_file`` is set)."""
        if settings.auth_tokens is None and settings.auth_tokens_file is None:
            return None
        fixed = settings.auth_tokens.get_secret_value().split(",") if settings.auth_tokens else []
        return cls([t.strip() for t in fixed if t.strip()], settings.auth_tokens_file)

    def _reload(self) -> bool:
        """Re-read the file if it changed since last read; True if it did."""
        assert self.file is not None
        stamp = file_stamp(self.file)
        if stamp == self._stamp:
            return False
        self._file_digests = [_digest(t) for t in parse_tokens(self.file.read_text())]
        self._stamp = stamp
        return True

    def accepts(self, token: str) -> bool:
        if self.file is not None:
            try:
                if self._reload():
                    LOGGER.info("bearer token file %s changed: %d tokens", self.file, len(self._file_digests))
                    if not self._fixed and not self._file_digests:
                        LOGGER.warning("no bearer tokens left: every authenticated RPC is refused")
            except OSError as e:  # e.g. the Secret deleted: keep the tokens last read
                LOGGER.warning("cannot re-read the bearer token file %s (%s); keeping its previous tokens",
                               self.file, e.strerror)
        presented = _digest(token)
        accepted = False
        for digest in (*self._fixed, *self._file_digests):  # no early exit: the time says nothing of which matched
            accepted |= hmac.compare_digest(presented, digest)
        return accepted


def _refusal(handler: Handler | None, code: grpc.StatusCode, details: str) -> Handler:
    """A handler of the RPC's own kind that ends it with ``code``, before any behaviour runs."""

    async def abort(request: Any, context: Context) -> None:
        await context.abort(code, details)

    if handler is None:  # unknown method: refused all the same, so that its absence is not disclosed
        return grpc.unary_unary_rpc_method_handler(abort)
    return rebuilt(handler, abort, handler.request_deserializer)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but health checks (and reflection, if exempt) needs ``authorization: Bearer <token>``.

    Both refusals are UNAUTHENTICATED: a wrong token identifies no caller, and PERMISSION_DENIED is for a known
    caller without the right (there are no per-token permissions)."""

    def __init__(self, tokens: BearerTokens, metrics: GatewayMetrics, exempt_reflection: bool = False) -> None:
        self.tokens = tokens
        self.metrics = metrics
        self.exempt = (HEALTH_PREFIX, REFLECTION_PREFIX) if exempt_reflection else (HEALTH_PREFIX,)

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        method = handler_call_details.method
        if method.startswith(self.exempt):
            return await continuation(handler_call_details)
        reason = self._refusal_reason(handler_call_details.invocation_metadata or ())
        if reason is None:
            return await continuation(handler_call_details)
        self.metrics.auth_failures.labels(reason).inc()
        LOGGER.debug("refused %s: %s bearer token", method, reason)
        details = REJECTED if reason == "rejected" else MISSING
        return _refusal(await continuation(handler_call_details), grpc.StatusCode.UNAUTHENTICATED, details)

    def _refusal_reason(self, metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
        """None (accepted), or the ``reason`` label: missing, malformed or rejected."""
        values = [value for key, value in metadata if key == "authorization"]
        if not values:
            return "missing"
        if len(values) > 1 or not isinstance(values[0], str):  # bytes only under a -bin key: not this one
            return "malformed"
        scheme, _, token = values[0].partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return "malformed"
        return None if self.tokens.accepts(token) else "rejected"
