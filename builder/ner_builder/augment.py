"""Label-safe data augmentation for NER (Dai & Adel, COLING 2020, "An Analysis of Simple Data Augmentation
for Named Entity Recognition").

Small NER corpora (WNUT-16: ~2,400 sentences) overfit quickly; the paper shows that three cheap, label-safe
edits of training sentences help most in that low-resource regime. Each edit keeps every tag consistent
with its token, so no new labelling is needed:

- mention replacement: an entity mention is swapped for another mention of the same type from the corpus,
  and its tags are regenerated for the new length under the dataset's scheme;
- label-wise token replacement: a token is swapped for a corpus token that carries the same full tag;
- shuffle within segments: the tokens inside a mention, or inside a run of ``O`` tokens, are shuffled while
  the tags stay in place.

Each augmented sentence comes from one source sentence through one operation, with per-mention / per-token
/ per-segment draws of probability ``probability``. The paper's synonym replacement and back-translation are
not implemented: they need WordNet or a translation model, and neither ships here.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from ner_builder.datasets import NerDataset
from ner_builder.spans import Span, spans_to_tags, tags_to_spans
from ner_gateway.artifact.schemes import TaggingScheme

LOGGER = logging.getLogger(__name__)

Sentence = tuple[list[str], list[str]]  # (tokens, tags)


@dataclass(frozen=True)
class AugmentIndex:
    """What the operations draw from, built once per dataset. Lists keep duplicates, so draws follow the
    corpus frequencies as in the paper."""

    scheme: TaggingScheme
    mentions: dict[str, list[tuple[str, ...]]]  # entity type -> token sequences of its mentions
    tokens: dict[str, list[str]]  # full tag ("I-person") -> tokens carrying it


def build_index(dataset: NerDataset) -> AugmentIndex:
    scheme = dataset.scheme
    mentions: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    tokens: dict[str, list[str]] = defaultdict(list)
    for words, tags in zip(dataset.sentences, dataset.tags, strict=True):
        for word, tag in zip(words, tags, strict=True):
            tokens[tag].append(word)
        for span in tags_to_spans(tags, scheme):
            mentions[span.label].append(tuple(words[span.start : span.end]))
    return AugmentIndex(scheme, dict(mentions), dict(tokens))


def replace_mentions(
    tokens: Sequence[str], tags: Sequence[str], index: AugmentIndex, rng: random.Random, probability: float
) -> Sentence:
    """Each mention, with `probability`, becomes a corpus mention of its type; other tokens are kept."""
    out_tokens: list[str] = []
    out_tags: list[str] = []
    position = 0
    for span in tags_to_spans(tags, index.scheme):
        out_tokens += tokens[position : span.start]
        out_tags += tags[position : span.start]
        pool = index.mentions.get(span.label)
        if pool and rng.random() < probability:
            mention = rng.choice(pool)
            out_tokens += mention
            out_tags += spans_to_tags([Span(span.label, 0, len(mention))], len(mention), index.scheme)
        else:
            out_tokens += tokens[span.start : span.end]
            out_tags += tags[span.start : span.end]
        position = span.end
    out_tokens += tokens[position:]
    out_tags += tags[position:]
    return out_tokens, out_tags


def replace_tokens(
    tokens: Sequence[str], tags: Sequence[str], index: AugmentIndex, rng: random.Random, probability: float
) -> Sentence:
    """Each token, with `probability`, becomes a corpus token with the same tag; tags are unchanged."""
    out = list(tokens)
    for i, tag in enumerate(tags):
        pool = index.tokens.get(tag)
        if pool and rng.random() < probability:
            out[i] = rng.choice(pool)
    return out, list(tags)


def segments(tags: Sequence[str], scheme: TaggingScheme) -> list[tuple[int, int]]:
    """``[start, end)`` of every mention and every maximal run of ``O`` tokens, in order."""
    bounds: list[tuple[int, int]] = []
    position = 0
    for span in tags_to_spans(tags, scheme):
        if position < span.start:
            bounds.append((position, span.start))  # tokens outside every mention are O
        bounds.append((span.start, span.end))
        position = span.end
    if position < len(tags):
        bounds.append((position, len(tags)))
    return bounds


def shuffle_segments(
    tokens: Sequence[str], tags: Sequence[str], index: AugmentIndex, rng: random.Random, probability: float
) -> Sentence:
    """Each segment's tokens, with `probability`, are shuffled in place; tags are unchanged."""
    out = list(tokens)
    for start, end in segments(tags, index.scheme):
        if rng.random() < probability:
            part = out[start:end]
            rng.shuffle(part)
            out[start:end] = part
    return out, list(tags)


Operation = Callable[[Sequence[str], Sequence[str], AugmentIndex, random.Random, float], Sentence]
OPERATIONS: dict[str, Operation] = {
    "mention_replacement": replace_mentions,
    "token_replacement": replace_tokens,
    "segment_shuffle": shuffle_segments,
}


@dataclass(frozen=True)
class Augmented:
    source: int  # index of the sentence it was made from
    operation: str  # a key of OPERATIONS
    tokens: list[str]
    tags: list[str]


def generate(dataset: NerDataset, count: int, *, seed: int, probability: float = 0.3) -> list[Augmented]:
    """Up to `count` augmented sentences, each from one source sentence and one operation that changed it.

    Sources are taken along a seeded permutation, wrapping around; a source that no operation changes is
    skipped, and after ``10 * count`` sources the search stops (fewer sentences, with a warning).
    """
    if count <= 0 or not len(dataset):
        return []
    rng = random.Random(seed)
    index = build_index(dataset)
    scheme = dataset.scheme
    order = list(range(len(dataset)))
    rng.shuffle(order)
    names = list(OPERATIONS)
    made: list[Augmented] = []
    for attempt in range(10 * count):
        if len(made) == count:
            break
        source = order[attempt % len(order)]
        tokens, tags = dataset.sentences[source], dataset.tags[source]
        rng.shuffle(names)  # the first is the chosen operation, the rest the fallbacks in random order
        for name in names:
            new_tokens, new_tags = OPERATIONS[name](tokens, tags, index, rng, probability)
            if (new_tokens, new_tags) != (tokens, tags):
                # Canonical tags: a source with ill-formed tags (decoded leniently) comes out well formed.
                new_tags = spans_to_tags(tags_to_spans(new_tags, scheme), len(new_tags), scheme)
                made.append(Augmented(source, name, new_tokens, new_tags))
                break
    if len(made) < count:
        LOGGER.warning("augmentation of %s: made %d of %d sentences", dataset.name, len(made), count)
    return made


def augment(dataset: NerDataset, ratio: float, *, seed: int, probability: float = 0.3) -> NerDataset:
    """`dataset` followed by ``round(ratio * len(dataset))`` augmented sentences (see `generate`)."""
    if ratio < 0:
        raise ValueError(f"augmentation ratio must be >= 0, got {ratio}")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"augmentation probability must be between 0 and 1, got {probability}")
    made = generate(dataset, round(ratio * len(dataset)), seed=seed, probability=probability)
    if not made:
        return dataset
    return replace(
        dataset,
        sentences=dataset.sentences + [a.tokens for a in made],
        tags=dataset.tags + [a.tags for a in made],
    )

