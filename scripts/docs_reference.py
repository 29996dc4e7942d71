"""The docs' reference pages, generated from the code they describe, so they cannot drift from it.

Each function returns Markdown: the settings from ``GatewaySettings``, the metrics from ``GatewayMetrics``'
instruments, the CLIs from their click commands, the error codes from the domain errors and ``STATUS_OF``, and the
API's messages and enums from ``protos/ner/v1/ner.proto`` (its descriptor, comments included, compiled by protoc).
``scripts/gen_docs.py`` puts them into the site; ``tests/test_docs.py`` checks that nothing is missing.
"""

from __future__ import annotations

import inspect
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO = Path("ner/v1/ner.proto")


def _cell(text: str | None) -> str:
    """Text for one Markdown table cell: one line, pipes escaped."""
    return " ".join((text or "").split()).replace("|", "\\|")


# --- settings -------------------------------------------------------------------------------------------------------

def settings_rows() -> Iterator[tuple[str, str, str, str, str]]:
    """(variable, type, default, bounds, doc) of every ``GatewaySettings`` field."""
    from pydantic_core import PydanticUndefined

    from ner_gateway.settings import GatewaySettings

    prefix = GatewaySettings.model_config.get("env_prefix", "")
    for name, field in GatewaySettings.model_fields.items():
        kind = inspect.formatannotation(field.annotation)
        for long, short in (("pathlib.", ""), ("typing.", ""), ("pydantic.types.SecretStr", "secret str"),
                            (" | None", " (optional)")):
            kind = kind.replace(long, short)
        if kind.startswith("Literal["):  # the choices, as they are spelled in the environment
            kind = "one of " + ", ".join(re.findall(r"'([^']*)'", kind))
        default = "(unset)" if field.default in (None, PydanticUndefined) else repr(field.default)
        if isinstance(field.default, Path):
            default = repr(str(field.default))
        bounds = []
        for constraint in field.metadata:
            for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
                if getattr(constraint, attr, None) is not None:
                    bounds.append(f"{sign} {getattr(constraint, attr)}")
        yield f"{prefix}{name}".upper(), kind, default, ", ".join(bounds), field.description or ""


def settings_page() -> str:
    lines = [
        "---", "hide: [toc]", "---",  # one wide table, no sections: give it the page's width
        "# Settings reference",
        "",
        "Generated from `GatewaySettings` (`gateway/ner_gateway/settings.py`). Precedence: a command-line flag of",
        "`ner-gateway serve` > the `NER_*` environment variable > a `.env` file in the working directory > the",
        "default. Unknown `NER_*` keys in `.env` are refused at startup, as are values out of bounds.",
        "",
        "| variable | type | default | bounds | what it does |",
        "| --- | --- | --- | --- | --- |",
    ]
    for var, kind, default, bounds, doc in settings_rows():
        lines.append(f"| `{var}` | `{_cell(kind)}` | `{_cell(default)}` | {_cell(bounds)} | {_cell(doc)} |")
    lines += [
        "",
        "The CLI's client commands (`query`, `models`, `health`) read two variables of their own: "
        "`NER_CLIENT_TOKEN` (the bearer token itself) and `NER_CLIENT_TOKEN_FILE` (a file holding it).",
        "",
    ]
    return "\n".join(lines)


# --- metrics --------------------------------------------------------------------------------------------------------

def metric_rows() -> Iterator[tuple[str, str, str, str]]:
    """(exposed name, type, labels, help) of every instrument of ``GatewayMetrics``."""
    from prometheus_client.metrics import MetricWrapperBase

    from ner_gateway.observability.metrics import GatewayMetrics

    for instrument in vars(GatewayMetrics()).values():
        if not isinstance(instrument, MetricWrapperBase):
            continue
        kind = instrument._type
        name = instrument._name + ("_total" if kind == "counter" else "")
        yield name, kind, ", ".join(instrument._labelnames), instrument._documentation


def metrics_page() -> str:
    from ner_gateway.observability.metrics import COUNT_BUCKETS, LATENCY_BUCKETS

    lines = [
        "---", "hide: [toc]", "---",
        "# Metrics reference",
        "",
        "Generated from the instruments of `GatewayMetrics` (`gateway/ner_gateway/observability/metrics.py`),",
        "served in Prometheus' format on `NER_METRICS_PORT` (default 9464) at `/metrics`. The names are a contract",
        "with `deploy/` (alert rules, dashboard, autoscaler): they change additively only. A histogram `X` is",
        "exposed as `X_bucket`, `X_sum` and `X_count`.",
        "",
        "| metric | type | labels | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for name, kind, labels, doc in metric_rows():
        lines.append(f"| `{name}` | {kind} | {_cell(labels) or '-'} | {_cell(doc)} |")
    lines += [
        "",
        f"Latency histograms' buckets (seconds): {', '.join(map(str, LATENCY_BUCKETS))}.",
        f"Count histograms' buckets: {', '.join(map(str, COUNT_BUCKETS))}.",
        "",
        "Triton's own metrics (`nv_inference_*`: queue and compute time, request and execution counts) are on",
        "Triton's metrics port, not the gateway's.",
        "",
    ]
    return "\n".join(lines)


# --- CLIs -----------------------------------------------------------------------------------------------------------

def cli_groups() -> dict[str, click.Group]:
    from ner_builder.cli import main as builder
    from ner_gateway.cli import main as gateway

    assert isinstance(builder, click.Group) and isinstance(gateway, click.Group)
    return {"ner-gateway": gateway, "ner-builder": builder}


def _param_rows(command: click.Command) -> Iterator[str]:
    ctx = click.Context(command)
    for param in command.params:
        if isinstance(param, click.Argument):
            name = f"`{param.human_readable_name}`" + (" ..." if param.nargs == -1 else "")
            yield f"| {name} (argument) | {_cell(param.type.name)} | | {'required' if param.required else ''} |"
            continue
        assert isinstance(param, click.Option)
        names = ", ".join(f"`{opt}`" for opt in [*param.opts, *param.secondary_opts])
        kind = "flag" if param.is_flag and not param.secondary_opts else param.type.name
        if isinstance(param.type, click.Choice):
            kind = ", ".join(str(c) for c in param.type.choices)
        default = param.get_default(ctx, call=False)
        plain_flag = param.is_flag and not param.secondary_opts
        unset = default is getattr(click.core, "UNSET", None)  # click 8.2+: an option without a default
        default_text = "" if unset or default in (None, (), False) or plain_flag else str(default)
        helptext = param.help or ""
        if param.required:
            helptext = "Required. " + helptext
        if param.envvar:
            helptext += f" [{param.envvar}]"
        yield f"| {names} | {_cell(kind)} | {_cell(default_text) and f'`{_cell(default_text)}`'} | {_cell(helptext)} |"


def cli_page() -> str:
    lines = [
        "# CLI reference",
        "",
        "Generated from the click commands of `ner-gateway` (`gateway/ner_gateway/cli.py`) and `ner-builder`",
        "(`builder/ner_builder/cli.py`). `--help` on any command prints the same.",
        "",
    ]
    for program, group in cli_groups().items():
        lines += [f"## {program}", "", _cell(group.help), ""]
        group_params = [p for p in group.params if p.name != "help"]
        if group_params:
            lines += ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
            lines += [*_param_rows(click.Command(program, params=group_params)), ""]
        for name, command in sorted(group.commands.items()):
            lines += [f"### {program} {name}", "", _cell(command.help), ""]
            if command.params:
                lines += ["| option | type | default | meaning |", "| --- | --- | --- | --- |"]
                lines += [*_param_rows(command), ""]
    return "\n".join(lines)


# --- errors ---------------------------------------------------------------------------------------------------------

def error_rows() -> Iterator[tuple[str, str, str]]:
    """(domain error, gRPC status code, doc) of every ``NerError`` subclass in ``core/errors.py``."""
    from ner_gateway.core import errors
    from ner_gateway.transport.status import status_of

    for name, cls in vars(errors).items():
        if isinstance(cls, type) and issubclass(cls, errors.NerError):
            code = status_of(cls.__new__(cls)).name
            yield name, code, inspect.getdoc(cls) or ""


def errors_table() -> str:
    lines = ["| domain error (`core/errors.py`) | status code | when |", "| --- | --- | --- |"]
    lines += [f"| `{name}` | `{code}` | {_cell(doc)} |" for name, code, doc in error_rows()]
    return "\n".join(lines)


# --- the proto ------------------------------------------------------------------------------------------------------

def proto_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """``ner.proto``'s descriptor with its comments (source info), compiled by protoc from the checkout."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ner.pb"
        args = ["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", "--include_source_info",
                f"--descriptor_set_out={out}", str(PROTO)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO}")
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {tuple(loc.path): " ".join(loc.leading_comments.split()) for loc in file.source_code_info.location
            if loc.leading_comments}


_TYPES = {v: k.removeprefix("TYPE_").lower() for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}


def _field_type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    kind = field.type_name.rsplit(".", 1)[-1] if field.type_name else _TYPES[field.type]
    kind = f"[{kind}](#{kind.lower()})" if field.type_name else f"`{kind}`"
    return ("repeated " if field.label == field.LABEL_REPEATED else "") + kind


def api_reference() -> str:
    """The service's RPCs, every message with its fields and every enum with its values, with the proto's
    comments."""
    file = proto_descriptor()
    doc = _comments(file)
    lines: list[str] = []
    for s, service in enumerate(file.service):
        lines += [f"### {service.name}", "", doc.get((6, s), ""), "",
                  "| RPC | request | response | what it does |", "| --- | --- | --- | --- |"]
        for m, method in enumerate(service.method):
            req = ("stream " if method.client_streaming else "") + method.input_type.rsplit(".", 1)[-1]
            resp = ("stream " if method.server_streaming else "") + method.output_type.rsplit(".", 1)[-1]
            lines.append(f"| `{method.name}` | {req} | {resp} | {_cell(doc.get((6, s, 2, m)))} |")
        lines.append("")
    for i, message in enumerate(file.message_type):
        lines += [f"### {message.name}", "", doc.get((4, i), ""), ""]
        if message.field:
            lines += ["| field | number | type | meaning |", "| --- | --- | --- | --- |"]
            for f, field in enumerate(message.field):
                lines.append(f"| `{field.name}` | {field.number} | {_field_type(field)} | "
                             f"{_cell(doc.get((4, i, 2, f)))} |")
        else:
            lines.append("No fields.")
        lines.append("")
    for e, enum in enumerate(file.enum_type):
        lines += [f"### {enum.name}", "", doc.get((5, e), ""), "",
                  "| value | number | meaning |", "| --- | --- | --- |"]
        for v, value in enumerate(enum.value):
            lines.append(f"| `{value.name}` | {value.number} | {_cell(doc.get((5, e, 2, v)))} |")
        lines.append("")
    return "\n".join(lines)


def proto_names() -> dict[str, list[str]]:
    """Every RPC, message, field, enum and enum value name of the proto (what the API page must show)."""
    file = proto_descriptor()
    names: dict[str, Any] = {"rpcs": [m.name for s in file.service for m in s.method]}
    names["messages"] = [m.name for m in file.message_type]
    names["fields"] = [f"{m.name}.{f.name}" for m in file.message_type for f in m.field]
    names["enums"] = [e.name for e in file.enum_type]
    names["enum_values"] = [v.name for e in file.enum_type for v in e.value]
    return names


# --- the dashboard --------------------------------------------------------------------------------------------------

def dashboard_table(path: str = "deploy/grafana/ner-dashboard.json") -> str:
    """The Grafana dashboard's rows and panels, in order, with their descriptions."""
    import json

    dashboard = json.loads((ROOT / path).read_text())
    lines = [f"`{path}`: *{dashboard['title']}*.", "", "| row | panel | shows |", "| --- | --- | --- |"]
    row = ""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            row = panel["title"]
            continue
        lines.append(f"| {row} | {_cell(panel['title'])} | {_cell(panel.get('description'))} |")
    return "\n".join(lines)


# --- the layers -----------------------------------------------------------------------------------------------------

def contracts_table() -> str:
    """The import-linter contracts of pyproject.toml (what `make lint` proves about the layers)."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    lines = ["| contract | kind | modules |", "| --- | --- | --- |"]
    for contract in config["contracts"]:
        modules = contract.get("layers") or contract.get("source_modules") or contract.get("ancestors") or []
        lines.append(f"| {_cell(contract['name'])} | {contract['type']} | "
                     f"{_cell(', '.join(f'`{m}`' for m in modules))} |")
    return "\n".join(lines)


def undocumented_proto_elements() -> list[str]:
    """Every service, RPC, message, field, enum and enum value of the proto without a leading comment."""
    file = proto_descriptor()
    doc = _comments(file)
    missing = [s.name for i, s in enumerate(file.service) if (6, i) not in doc]
    missing += [f"{s.name}.{m.name}" for i, s in enumerate(file.service) for j, m in enumerate(s.method)
                if (6, i, 2, j) not in doc]
    missing += [m.name for i, m in enumerate(file.message_type) if (4, i) not in doc]
    missing += [f"{m.name}.{f.name}" for i, m in enumerate(file.message_type) for j, f in enumerate(m.field)
                if (4, i, 2, j) not in doc]
    missing += [e.name for i, e in enumerate(file.enum_type) if (5, i) not in doc]
    missing += [v.name for i, e in enumerate(file.enum_type) for j, v in enumerate(e.value) if (5, i, 2, j) not in doc]
    return missing
