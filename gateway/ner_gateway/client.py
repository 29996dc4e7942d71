"""Python client of ner.v1.NerService for backend services.

TLS (optionally mutual), a bearer token, a default deadline, round-robin balancing over several gateways and
retries of UNAVAILABLE and RESOURCE_EXHAUSTED, the last two done by gRPC itself from the channel's service
config (a retry stays within the call's deadline and stops once a response has arrived)::

    with NerClient("ner-gateway.ner:50051", ca_file="ca.crt", token_file="/var/run/secrets/ner/token") as ner:
        response = ner.recognize(["Angela Merkel visited Paris"])

The token goes out as call credentials on a TLS channel; gRPC sends no call credentials over plaintext, so
there (local development, loopback tests) it is sent as ``authorization`` metadata of each call.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.secret_files import parse_tokens

SERVICE = "ner.v1.NerService"
RETRYABLE = ("UNAVAILABLE", "RESOURCE_EXHAUSTED")
Addresses = str | Sequence[str]


def target(addresses: Addresses) -> str:
    """The gRPC target for one address as given (``host:port``, ``dns:///name:port``, ``ipv4:…``), or for several
    ``ip:port`` (a list, or comma-separated): ``ipv4:a:1,b:2`` / ``ipv6:[a]:1,[b]:2``, balanced round-robin."""
    if isinstance(addresses, str):
        if ":///" in addresses or addresses.startswith(("ipv4:", "ipv6:", "unix:")):
            return addresses
        addresses = addresses.split(",")
    addresses = [a.strip() for a in addresses if a.strip()]
    if len(addresses) == 1:
        return addresses[0]
    hosts = []
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            hosts.append((ipaddress.ip_address(host.strip("[]")), port))
        except ValueError:
            raise ValueError(f"several addresses must be IP addresses ({address!r} is not); for a DNS name with "
                             "several addresses use dns:///name:port") from None
    if len({ip.version for ip, _ in hosts}) > 1:
        raise ValueError("several addresses must all be IPv4 or all IPv6")
    if hosts[0][0].version == 4:
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in hosts)
    return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in hosts)


def service_config(max_attempts: int = 4) -> str:
    """Round-robin over every resolved address; retries (gRPC caps attempts at 5) with exponential backoff."""
    method: dict[str, Any] = {"name": [{"service": SERVICE}]}
    if max_attempts > 1:
        method["retryPolicy"] = {"maxAttempts": max_attempts, "initialBackoff": "0.1s", "maxBackoff": "2s",
                                 "backoffMultiplier": 2, "retryableStatusCodes": list(RETRYABLE)}
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": [method]})


def read_token(file: str | Path) -> str:
    """The first token of a file (blank lines and ``#`` comments skipped), e.g. a mounted Secret."""
    tokens = parse_tokens(Path(file).read_text())
    if not tokens:
        raise ValueError(f"no token in {file}")
    return tokens[0]


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()  # None: gRPC's default roots / no client certificate


def _enum(enum: Any, prefix: str, value: str | int) -> Any:  # an enum number (the stubs type them apart)
    return value if isinstance(value, int) else enum.Value(f"{prefix}_{value.upper()}")


class _ClientBase:
    """What both clients share: the target, credentials, options and per-call metadata."""

    def __init__(self, addresses: Addresses, *, tls: bool | None = None, ca_file: str | Path | None = None,
                 cert_file: str | Path | None = None, key_file: str | Path | None = None,
                 server_name: str | None = None, token: str | None = None, token_file: str | Path | None = None,
                 timeout: float = 30.0, max_attempts: int = 4, options: Sequence[tuple[str, Any]] = ()) -> None:
        if (cert_file is None) != (key_file is None):
            raise ValueError("a client certificate needs its key (cert_file and key_file), or neither")
        if token_file is not None:
            token = read_token(token_file)
        self.target = target(addresses)
        self.timeout = timeout
        self.options = [("grpc.enable_retries", 1), ("grpc.service_config", service_config(max_attempts)),
                        *([("grpc.ssl_target_name_override", server_name)] if server_name else []), *options]
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.credentials: grpc.ChannelCredentials | None = None
        if tls or (tls is None and (ca_file or cert_file or server_name)):
            self.credentials = grpc.ssl_channel_credentials(_read(ca_file), _read(key_file), _read(cert_file))
            if token:
                self.credentials = grpc.composite_channel_credentials(
                    self.credentials, grpc.access_token_call_credentials(token))
        elif token:
            self.metadata = (("authorization", f"Bearer {token}"),)

    def request(self, texts: Sequence[str], model: str, aggregation: str | int, offset_unit: str | int,
                constrained_decoding: bool, model_version: str = "") -> ner_pb2.RecognizeRequest:
        return ner_pb2.RecognizeRequest(
            texts=list(texts), model=model, model_version=model_version, constrained_decoding=constrained_decoding,
            aggregation=_enum(ner_pb2.AggregationStrategy, "AGGREGATION_STRATEGY", aggregation),
            offset_unit=_enum(ner_pb2.OffsetUnit, "OFFSET_UNIT", offset_unit),
        )

    def call(self, timeout: float | None) -> dict[str, Any]:
        return {"timeout": self.timeout if timeout is None else timeout, "metadata": self.metadata}


class NerClient(_ClientBase):
    """Blocking client; thread-safe, keep one per process. ``addresses``: see ``target``."""

    def __init__(self, addresses: Addresses, **kwargs: Any) -> None:
        super().__init__(addresses, **kwargs)
        self.channel = (grpc.secure_channel(self.target, self.credentials, self.options) if self.credentials
                        else grpc.insecure_channel(self.target, self.options))
        self._ner = ner_pb2_grpc.NerServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def recognize(self, texts: Sequence[str], *, model: str = "", aggregation: str | int = "simple",
                  offset_unit: str | int = "code_point", constrained_decoding: bool = False,
                  timeout: float | None = None, model_version: str = "") -> ner_pb2.RecognizeResponse:
        """``model_version``: pin a served version (ListModels' versions); empty: the model's stable version."""
        request = self.request(texts, model, aggregation, offset_unit, constrained_decoding, model_version)
        response: ner_pb2.RecognizeResponse = self._ner.Recognize(request, **self.call(timeout))
        return response

    def list_models(self, *, timeout: float | None = None) -> ner_pb2.ListModelsResponse:
        models: ner_pb2.ListModelsResponse = self._ner.ListModels(ner_pb2.ListModelsRequest(), **self.call(timeout))
        return models

    def health(self, service: str = "", *, timeout: float | None = None) -> health_pb2.HealthCheckResponse:
        return self._health.Check(health_pb2.HealthCheckRequest(service=service), **self.call(timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> NerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncNerClient(_ClientBase):
    """The same for asyncio services (create it inside the running event loop)."""

    def __init__(self, addresses: Addresses, **kwargs: Any) -> None:
        super().__init__(addresses, **kwargs)
        self.channel = (grpc.aio.secure_channel(self.target, self.credentials, self.options) if self.credentials
                        else grpc.aio.insecure_channel(self.target, self.options))
        self._ner = ner_pb2_grpc.NerServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def recognize(self, texts: Sequence[str], *, model: str = "", aggregation: str | int = "simple",
                        offset_unit: str | int = "code_point", constrained_decoding: bool = False,
                        timeout: float | None = None, model_version: str = "") -> ner_pb2.RecognizeResponse:
        """``model_version``: pin a served version (ListModels' versions); empty: the model's stable version."""
        request = self.request(texts, model, aggregation, offset_unit, constrained_decoding, model_version)
        response: ner_pb2.RecognizeResponse = await self._ner.Recognize(request, **self.call(timeout))
        return response

    async def list_models(self, *, timeout: float | None = None) -> ner_pb2.ListModelsResponse:
        models: ner_pb2.ListModelsResponse = await self._ner.ListModels(ner_pb2.ListModelsRequest(),
                                                                        **self.call(timeout))
        return models

    async def health(self, service: str = "", *, timeout: float | None = None) -> health_pb2.HealthCheckResponse:
        return await self._health.Check(health_pb2.HealthCheckRequest(service=service), **self.call(timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncNerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
