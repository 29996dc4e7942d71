"""The generated docs cannot drift: every setting, metric, CLI command and option, domain error (with its status
code) and every RPC, message, field and enum value of the proto appears on its page, and the README's benchmark
block is what bench/results says. The pages are rendered here as the MkDocs hook renders them (no site build: that
is ``make docs``, in ``make test``)."""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import click
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "scripts"))
        return importlib.import_module("gen_docs")


def page(gen: ModuleType, uri: str) -> str:
    """A page as the site shows it: generated, or hand-written with its ``<!-- gen:NAME -->`` blocks expanded."""
    render: Callable[[], str] | None = gen.PAGES.get(uri)
    return render() if render is not None else gen.expand((DOCS / uri).read_text())


def missing(names: list[str], text: str, quote: Callable[[str], str] = lambda name: f"`{name}`") -> list[str]:
    return [name for name in names if quote(name) not in text]


def test_every_setting_is_on_the_settings_page(gen: ModuleType) -> None:
    from ner_gateway.settings import GatewaySettings

    variables = [f"NER_{name.upper()}" for name in GatewaySettings.model_fields]
    text = page(gen, "reference/settings.md")
    assert variables and not missing(variables, text)
    rows = {row[0]: row for row in gen.docs_reference.settings_rows()}
    assert set(rows) == set(variables)
    undocumented = [var for var, (_, _, _, _, doc) in rows.items() if not doc.strip()]
    assert not undocumented, f"settings without a docstring: {undocumented}"
    assert "| `NER_PORT` | `int` | `50051` | ≥ 0, ≤ 65535 |" in text  # type, default and bounds as declared


def test_every_metric_is_on_the_metrics_page(gen: ModuleType) -> None:
    from ner_gateway.observability.metrics import GatewayMetrics

    names = [m.name for m in GatewayMetrics().registry.collect()]
    exposed = [name + "_total" if kind == "counter" else name for name, kind in
               ((m.name, m.type) for m in GatewayMetrics().registry.collect())]
    text = page(gen, "reference/metrics.md")
    assert len(names) >= 15 and not missing(exposed, text)


def _commands() -> list[tuple[str, click.Command]]:
    from ner_builder.cli import main as builder
    from ner_gateway.cli import main as gateway

    out: list[tuple[str, click.Command]] = []
    for program, group in (("ner-gateway", gateway), ("ner-builder", builder)):
        assert isinstance(group, click.Group)
        out += [(f"{program} {name}", command) for name, command in group.commands.items()]
    return out


def test_every_cli_command_and_option_is_on_the_cli_page(gen: ModuleType) -> None:
    text = page(gen, "reference/cli.md")
    sections = dict(re.findall(r"^### (ner-\w+ [\w-]+)\n(.*?)(?=^##|\Z)", text, flags=re.M | re.S))
    commands = _commands()
    assert len(commands) >= 7
    for title, command in commands:
        assert title in sections, f"{title} has no section"
        options = [opt for p in command.params if isinstance(p, click.Option) for opt in [*p.opts, *p.secondary_opts]]
        arguments = [p.human_readable_name for p in command.params if isinstance(p, click.Argument)]
        assert not missing(options + arguments, sections[title]), title


def test_every_domain_error_and_its_status_code_is_in_the_api_page(gen: ModuleType) -> None:
    from ner_gateway.core import errors
    from ner_gateway.transport.status import status_of

    classes = [cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.NerError)]
    text = page(gen, "api.md")
    assert len(classes) >= 8
    for cls in classes:
        code = status_of(cls.__new__(cls)).name
        assert f"| `{cls.__name__}` | `{code}` |" in text, cls.__name__


def test_every_rpc_message_field_and_enum_value_is_in_the_api_page(gen: ModuleType) -> None:
    names = gen.docs_reference.proto_names()
    text = page(gen, "api.md")
    assert not missing(names["rpcs"], text)
    assert not missing(names["messages"] + names["enums"], text, lambda name: f"### {name}\n")
    assert not missing([field.split(".")[1] for field in names["fields"]], text)
    assert not missing(names["enum_values"], text)
    assert "Half-open span [start, end)" in text  # the proto's comments come along


def test_client_page_names_every_constructor_argument() -> None:
    from ner_gateway.client import NerClient

    arguments = [name for name in inspect.signature(NerClient.__mro__[1].__init__).parameters if name != "self"]
    assert len(arguments) >= 10 and not missing(arguments, (DOCS / "client.md").read_text())


def test_every_gen_block_is_known_and_every_page_is_in_the_nav(gen: ModuleType) -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for path in DOCS.rglob("*.md"):
        uri = path.relative_to(DOCS).as_posix()
        gen.expand(path.read_text())  # an unknown block raises
        assert f": {uri}\n" in nav, f"{uri} is not in mkdocs.yml's nav"
    for uri in gen.PAGES:
        assert f": {uri}\n" in nav, f"{uri} is not in mkdocs.yml's nav"


def test_readme_benchmark_block_matches_bench_results(gen: ModuleType) -> None:
    current = (ROOT / "README.md").read_text()
    assert gen.readme_text(current) == current, "run: python scripts/gen_docs.py readme"
    assert len(current.splitlines()) <= 150


def test_the_readme_check_fails_on_a_stale_figure(gen: ModuleType) -> None:
    current = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- bench:served-path:start -->.*?<!-- bench:served-path:end -->", current, re.S)
    assert block is not None
    number = re.search(r"\*\*([\d,]+)\*\*", block.group(0))
    assert number is not None
    stale = current.replace(number.group(0), "**1**", 1)
    assert gen.readme_text(stale) != stale


def test_every_element_of_the_proto_has_a_comment(gen: ModuleType) -> None:
    """The API page is the proto's comments: an RPC, message, field, enum or value without one has no docs."""
    assert gen.docs_reference.undocumented_proto_elements() == []
