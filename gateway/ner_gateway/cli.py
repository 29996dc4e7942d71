"""``ner-gateway``: serve the gRPC API, or call it (query, models)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import click
import grpc
from google.protobuf import json_format
from pydantic import ValidationError

from ner_gateway.core.domain import Aggregation, OffsetUnit
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.settings import GatewaySettings, LogLevel

if TYPE_CHECKING:
    from ner_gateway.client import NerClient


@click.group()
def main() -> None:
    """gRPC named-entity recognition in front of Triton Inference Server."""


@main.command()
@click.option("--model-repository", type=click.Path(path_type=Path), help="[NER_MODEL_REPOSITORY]")
@click.option("--triton-url", help="Use running Triton(s) over gRPC instead of the embedded one: host:port, a "
              "comma-separated list, and/or dns:///name:port. [NER_TRITON_URL]")
@click.option("--host", help="Bind address. [NER_HOST]")
@click.option("--port", type=int, help="gRPC port (0 = free port). [NER_PORT]")
@click.option("--default-model", help="[NER_DEFAULT_MODEL]")
@click.option("--max-texts-per-request", type=int, help="[NER_MAX_TEXTS_PER_REQUEST]")
@click.option("--max-text-chars", type=int, help="[NER_MAX_TEXT_CHARS]")
@click.option("--log-level", type=click.Choice(get_args(LogLevel)), help="[NER_LOG_LEVEL]")
@click.option("--workers", type=int, help="Gateway processes on the port, in front of one Triton. [NER_WORKERS]")
def serve(**flags: Any) -> None:
    """Serve ner.v1.NerService (settings: flag > NER_* environment > .env > default)."""
    try:
        settings = GatewaySettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        raise click.ClickException(str(e)) from e
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ner_gateway.transport.server import serve as run_server
    from ner_gateway.transport.workers import WorkerFailed, serve_workers

    try:
        asyncio.run(serve_workers(settings) if settings.workers > 1 else run_server(settings))
    except (ConfigurationError, WorkerFailed) as e:
        raise click.ClickException(str(e)) from e


def _client_options(command: Callable[..., None]) -> Callable[..., None]:
    """--address, TLS and the bearer token, for the commands that call a gateway (through NerClient)."""
    file = click.Path(exists=True, dir_okay=False, path_type=Path)
    options = [
        click.option("--address", default="127.0.0.1:50051", show_default=True,
                     help="host:port, several ip:port comma-separated (round robin), or dns:///name:port."),
        click.option("--tls", is_flag=True, help="TLS, verified against the system's CA roots."),
        click.option("--tls-ca", type=file, help="CA (PEM) that signed the gateway's certificate; implies TLS."),
        click.option("--tls-cert", type=file, help="Client certificate (PEM) for mutual TLS; implies TLS."),
        click.option("--tls-key", type=file, help="Key (PEM) of --tls-cert."),
        click.option("--tls-server-name", help="Name to check the gateway's certificate against (default: the "
                     "address's host)."),
        # No --token flag: a token on the command line lands in shell history and in `ps`.
        click.option("--token-file", type=file, envvar="NER_CLIENT_TOKEN_FILE",
                     help="File holding the bearer token [NER_CLIENT_TOKEN_FILE]; or pass the token itself in "
                     "NER_CLIENT_TOKEN."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _client(address: str, tls: bool, tls_ca: Path | None, tls_cert: Path | None, tls_key: Path | None,
            tls_server_name: str | None, token_file: Path | None) -> NerClient:
    from ner_gateway.client import NerClient

    try:
        return NerClient(address, tls=tls or None, ca_file=tls_ca, cert_file=tls_cert, key_file=tls_key,
                         server_name=tls_server_name, token_file=token_file,
                         token=os.environ.get("NER_CLIENT_TOKEN") or None)
    except (OSError, ValueError) as e:
        raise click.UsageError(str(e)) from e


def _print(message: Any) -> None:
    """The message as JSON with every field, zero values included (proto3 JSON would drop ``"start": 0``), in the
    proto's field order (json_format puts the zero-valued ones last)."""
    fields = json_format.MessageToDict(message, preserving_proto_field_name=True,
                                       always_print_fields_with_no_presence=True)
    click.echo(json.dumps(_in_field_order(message, fields), indent=2, ensure_ascii=False))


def _in_field_order(message: Any, fields: dict[str, Any]) -> dict[str, Any]:
    ordered: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.name not in fields:
            continue
        value, sub = fields[field.name], getattr(message, field.name)
        if field.message_type is not None and not field.message_type.GetOptions().map_entry:
            is_list = field.label == field.LABEL_REPEATED
            value = [_in_field_order(m, v) for m, v in zip(sub, value, strict=True)] if is_list \
                else _in_field_order(sub, value)
        ordered[field.name] = value
    return ordered


@main.command()
@click.argument("texts", nargs=-1)
@_client_options
@click.option("--model", default="", help="Model name (default: the gateway's default model).")
@click.option("--model-version", default="", help="Pin a served version of the model (`ner-gateway models` lists "
              "them; default: its stable version).")
@click.option("--aggregation", type=click.Choice([a.value for a in Aggregation]),
              default=Aggregation.SIMPLE.value, show_default=True)
@click.option("--offset-unit", type=click.Choice([u.value for u in OffsetUnit]),
              default=OffsetUnit.CODE_POINT.value, show_default=True)
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Deadline in seconds.")
def query(texts: tuple[str, ...], model: str, model_version: str, aggregation: str, offset_unit: str,
          timeout: float, **connection: Any) -> None:
    """Recognize entities in TEXTS (or in stdin lines when none are given) and print JSON."""
    lines = list(texts) or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        with _client(**connection) as client:
            _print(client.recognize(lines, model=model, aggregation=aggregation, offset_unit=offset_unit,
                                    timeout=timeout, model_version=model_version))
    except grpc.RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from e


@main.command()
@_client_options
def models(**connection: Any) -> None:
    """List the models the gateway serves."""
    try:
        with _client(**connection) as client:
            _print(client.list_models(timeout=10))
    except grpc.RpcError as e:
        raise click.ClickException(f"{e.code().name}: {e.details()}") from e


@main.command()
@_client_options
@click.option("--service", default="", help="Service to check ('' = the whole server).")
@click.option("--wait", type=float, default=0.0, show_default=True,
              help="Keep checking for up to this many seconds until SERVING.")
def health(service: str, wait: float, **connection: Any) -> None:
    """grpc.health.v1 check: exit 0 when SERVING, 1 otherwise."""
    import time

    from grpc_health.v1 import health_pb2

    deadline = time.monotonic() + wait
    status = "UNREACHABLE"
    with _client(**connection) as client:
        while True:
            try:
                response = client.health(service, timeout=2)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as e:
                status = e.code().name
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
    click.echo(status)
    if status != "SERVING":
        sys.exit(1)


if __name__ == "__main__":  # python -m ner_gateway.cli: how --workers starts its workers
    main()
