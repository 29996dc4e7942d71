"""``ner-gateway``: serve the gRPC API, or call it (query, models)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import click
import grpc
from google.protobuf import json_format
from pydantic import ValidationError

from ner_gateway.errors import ConfigurationError
from ner_gateway.settings import GatewaySettings

AGGREGATIONS = ["none", "simple", "first", "average", "max"]
OFFSET_UNITS = ["code_point", "utf8_byte", "utf16_code_unit"]


@click.group()
def main() -> None:
    """gRPC named-entity recognition in front of Triton Inference Server."""


@main.command()
@click.option("--model-repository", type=click.Path(path_type=Path), help="[NER_MODEL_REPOSITORY]")
@click.option("--triton-url", help="Use a running Triton (host:port, gRPC) instead of the embedded one. "
              "[NER_TRITON_URL]")
@click.option("--host", help="Bind address. [NER_HOST]")
@click.option("--port", type=int, help="gRPC port (0 = free port). [NER_PORT]")
@click.option("--default-model", help="[NER_DEFAULT_MODEL]")
@click.option("--max-texts-per-request", type=int, help="[NER_MAX_TEXTS_PER_REQUEST]")
@click.option("--max-text-chars", type=int, help="[NER_MAX_TEXT_CHARS]")
@click.option("--log-level", type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]), help="[NER_LOG_LEVEL]")
def serve(**flags: Any) -> None:
    """Serve ner.v1.NerService (settings: flag > NER_* environment > .env > default)."""
    try:
        settings = GatewaySettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        raise click.ClickException(str(e)) from e
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ner_gateway.server import serve as run_server

    try:
        asyncio.run(run_server(settings))
    except ConfigurationError as e:
        raise click.ClickException(str(e)) from e


def _stub(address: str):  # type: ignore[no-untyped-def]
    from ner_gateway.pb.ner.v1 import ner_pb2_grpc

    return ner_pb2_grpc.NerServiceStub(grpc.insecure_channel(address))


def _print(message: Any) -> None:
    click.echo(json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), indent=2,
                          ensure_ascii=False))


@main.command()
@click.argument("texts", nargs=-1)
@click.option("--address", default="127.0.0.1:50051", show_default=True)
@click.option("--model", default="", help="Model name (default: the gateway's default model).")
@click.option("--aggregation", type=click.Choice(AGGREGATIONS), default="simple", show_default=True)
@click.option("--offset-unit", type=click.Choice(OFFSET_UNITS), default="code_point", show_default=True)
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Deadline in seconds.")
def query(texts: tuple[str, ...], address: str, model: str, aggregation: str, offset_unit: str,
          timeout: float) -> None:
    """Recognize entities in TEXTS (or in stdin lines when none are given) and print JSON."""
    from ner_gateway.pb.ner.v1 import ner_pb2

    lines = list(texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    request = ner_pb2.RecognizeRequest(
        texts=lines, model=model,
        aggregation=ner_pb2.AggregationStrategy.Value(f"AGGREGATION_STRATEGY_{aggregation.upper()}"),
        offset_unit=ner_pb2.OffsetUnit.Value(f"OFFSET_UNIT_{offset_unit.upper()}"),
    )
    try:
        _print(_stub(address).Recognize(request, timeout=timeout))
    except grpc.RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from e


@main.command()
@click.option("--address", default="127.0.0.1:50051", show_default=True)
def models(address: str) -> None:
    """List the models the gateway serves."""
    from ner_gateway.pb.ner.v1 import ner_pb2

    try:
        _print(_stub(address).ListModels(ner_pb2.ListModelsRequest(), timeout=10))
    except grpc.RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from e


@main.command()
@click.option("--address", default="127.0.0.1:50051", show_default=True)
@click.option("--service", default="", help="Service to check ('' = the whole server).")
@click.option("--wait", type=float, default=0.0, show_default=True,
              help="Keep checking for up to this many seconds until SERVING.")
def health(address: str, service: str, wait: float) -> None:
    """grpc.health.v1 check: exit 0 when SERVING, 1 otherwise."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + wait
    status = "UNREACHABLE"
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as e:
                status = e.code().name
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    click.echo(status)
    if status != "SERVING":
        sys.exit(1)
