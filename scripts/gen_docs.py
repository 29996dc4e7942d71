"""Generated documentation: MkDocs hooks (``hooks:`` in mkdocs.yml) and the README's benchmark table.

At build time the reference pages are made from the code (``docs_reference.py``) and ``<!-- gen:NAME -->`` lines in
the hand-written pages are replaced by tables rendered from the proto, the errors and ``bench/results``
(``docs_bench.py``), so nothing generated is committed and nothing can go stale. The README is read on GitHub, not
built, so its generated blocks are written in place between marker comments:

    python scripts/gen_docs.py readme          # rewrite the block
    python scripts/gen_docs.py readme --check  # exit 1 when it differs from bench/results (make docs, tests)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The hook is loaded by path: its siblings import once its folder is on the path.
import docs_bench
import docs_reference

ROOT = docs_reference.ROOT
README = ROOT / "README.md"

# Whole pages, made from the code or from a README that lives beside what it describes.
PAGES: dict[str, Callable[[], str]] = {
    "reference/settings.md": docs_reference.settings_page,
    "reference/metrics.md": docs_reference.metrics_page,
    "reference/cli.md": docs_reference.cli_page,
    "operations/deploy-reference.md": lambda: _include("deploy/README.md"),
    "observability/runbooks.md": lambda: _include("deploy/prometheus/README.md"),
    "reference/model-repository.md": lambda: _include("model_repository/README.md"),
}

# Blocks that replace a `<!-- gen:NAME -->` line in a hand-written page.
BLOCKS: dict[str, Callable[[], str]] = {
    "api": docs_reference.api_reference,
    "errors": docs_reference.errors_table,
    "dashboard": docs_reference.dashboard_table,
    "contracts": docs_reference.contracts_table,
    "served-path": docs_bench.served_path_table,
    "served-path-cpu": docs_bench.served_path_cpu_table,
    "demo-overlap": docs_bench.demo_overlap_table,
    "served-path-layers": lambda: docs_bench.served_path_table(docs_bench.SERVED_PATH_LAYERS),
    "throughput": lambda: docs_bench.sweep_table("throughput.json"),
    "distill-throughput": lambda: docs_bench.sweep_table("distill_throughput.json"),
    "int8-choice": docs_bench.int8_table,
    "large-requests": lambda: docs_bench.large_requests_table("large_requests.json"),
    "large-requests-fair": lambda: docs_bench.large_requests_table("large_requests_fair.json"),
    "flood": docs_bench.flood_table,
    "soak": docs_bench.soak_table,
    "soak-mixed": lambda: docs_bench.soak_table("served_path/soak-mixed-final.json"),
    "rollout": docs_bench.rollout_table,
    "sizing": docs_bench.sizing,
}
GEN_LINE = re.compile(r"^<!-- gen:([a-z0-9-]+) -->$", re.MULTILINE)

# The README's generated block: name -> renderer.
README_BLOCKS: dict[str, Callable[[], str]] = {"served-path": docs_bench.readme_served_path,
                                              "demo": docs_bench.readme_demo}


def _include(path: str) -> str:
    """A README kept beside the files it describes, as a page (its source named on top)."""
    text = (ROOT / path).read_text()
    title, _, body = text.partition("\n")
    return f"{title}\n\n!!! note \"Source\"\n    This page is `{path}` in the repository.\n{body}"


def expand(markdown: str) -> str:
    """Replace every ``<!-- gen:NAME -->`` line; an unknown NAME fails the build."""
    def block(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block {name!r} (scripts/gen_docs.py BLOCKS)")
        return BLOCKS[name]()

    return GEN_LINE.sub(block, markdown)


# --- MkDocs hooks ---------------------------------------------------------------------------------------------------

def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, render in PAGES.items():
        files.append(File.generated(config, uri, content=render()))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return expand(markdown)


# --- the README -----------------------------------------------------------------------------------------------------

def readme_text(text: str) -> str:
    """``text`` with each README block rewritten from bench/results."""
    for name, render in README_BLOCKS.items():
        start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
        pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"README.md lacks the {start} ... {end} markers")
        block = f"{start}\n{render()}\n{end}"
        text = pattern.sub(lambda _, block=block: block, text)
    return text


def main(argv: list[str]) -> int:
    if argv[:1] != ["readme"]:
        print(__doc__)
        return 2
    current = README.read_text()
    fresh = readme_text(current)
    if "--check" in argv:
        if fresh != current:
            print("README.md's benchmark blocks differ from bench/results: run python scripts/gen_docs.py readme",
                  file=sys.stderr)
            return 1
        return 0
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
