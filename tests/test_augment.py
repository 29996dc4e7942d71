"""Label-safe NER augmentation (ner_builder.augment): counts, determinism, well-formed tags, and label
alignment of each operation; plus spans_to_tags under every scheme."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from ner_builder.augment import (
    OPERATIONS,
    augment,
    build_index,
    generate,
    replace_mentions,
    replace_tokens,
    segments,
    shuffle_segments,
)
from ner_builder.datasets import NerDataset, head, load_dataset, sort_labels
from ner_builder.spans import Span, spans_to_bio, spans_to_tags, tags_to_spans
from ner_gateway.artifact.schemes import TaggingScheme

BIO, BMES, BIOES = TaggingScheme.BIO, TaggingScheme.BMES, TaggingScheme.BIOES


@pytest.fixture(scope="module")
def wnut16() -> NerDataset:
    return load_dataset("wnut16")


@pytest.fixture(scope="module")
def msra() -> NerDataset:
    return head(load_dataset("msra"), 3000)


def _dataset(sentences: list[list[str]], tags: list[list[str]], scheme: TaggingScheme) -> NerDataset:
    return NerDataset("tiny", sentences, tags, sort_labels(tags, scheme), scheme)


@pytest.fixture
def tiny_bio() -> NerDataset:
    return _dataset(
        [["John", "Smith", "lives", "in", "New", "York"], ["Mary", "visited", "Paris", "today"],
         ["the", "United", "Nations", "met", "Bob", "Lee", "Jr"]],
        [["B-PER", "I-PER", "O", "O", "B-LOC", "I-LOC"], ["B-PER", "O", "B-LOC", "O"],
         ["O", "B-ORG", "I-ORG", "O", "B-PER", "I-PER", "I-PER"]],
        BIO,
    )


@pytest.fixture
def tiny_bmes() -> NerDataset:
    return _dataset(
        [list("张三在北京"), list("李四去上海市"), list("王在京")],
        [["B-PER", "E-PER", "O", "B-LOC", "E-LOC"], ["B-PER", "E-PER", "O", "B-LOC", "M-LOC", "E-LOC"],
         ["S-PER", "O", "S-LOC"]],
        BMES,
    )


def _mentions(dataset: NerDataset) -> set[tuple[str, tuple[str, ...]]]:
    return {(s.label, tuple(words[s.start : s.end]))
            for words, tags in zip(dataset.sentences, dataset.tags, strict=True)
            for s in tags_to_spans(tags, dataset.scheme)}


def _assert_well_formed(tokens: list[str], tags: list[str], dataset: NerDataset) -> None:
    scheme = dataset.scheme
    assert len(tokens) == len(tags)
    assert spans_to_tags(tags_to_spans(tags, scheme), len(tags), scheme) == tags
    assert set(tags) <= set(dataset.labels)


# --- augment / generate --------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_count_and_originals_first(wnut16: NerDataset, ratio: float) -> None:
    out = augment(wnut16, ratio, seed=13)
    n = len(wnut16)
    assert len(out) == n + round(ratio * n)
    assert out.sentences[:n] == wnut16.sentences and out.tags[:n] == wnut16.tags
    assert (out.labels, out.scheme, out.char_level, out.test) == (
        wnut16.labels, wnut16.scheme, wnut16.char_level, wnut16.test)
    assert len(out.sentences) == len(out.tags)


def test_ratio_zero_and_negative(tiny_bio: NerDataset) -> None:
    assert augment(tiny_bio, 0.0, seed=1) is tiny_bio
    with pytest.raises(ValueError, match="ratio"):
        augment(tiny_bio, -0.5, seed=1)
    with pytest.raises(ValueError, match="probability"):
        augment(tiny_bio, 1.0, seed=1, probability=1.5)


def test_deterministic_per_seed(wnut16: NerDataset) -> None:
    a = augment(wnut16, 0.3, seed=7)
    b = augment(wnut16, 0.3, seed=7)
    c = augment(wnut16, 0.3, seed=8)
    assert (a.sentences, a.tags) == (b.sentences, b.tags)
    assert a.sentences != c.sentences


@pytest.mark.parametrize("name", ["wnut16", "msra"])
def test_augmented_sentences_are_well_formed(name: str, request: pytest.FixtureRequest) -> None:
    dataset: NerDataset = request.getfixturevalue(name)
    out = augment(dataset, 0.5, seed=3)
    extra = list(zip(out.sentences[len(dataset):], out.tags[len(dataset):], strict=True))
    assert extra
    for tokens, tags in extra:
        _assert_well_formed(tokens, tags, dataset)


def test_wnut16_uses_every_operation(wnut16: NerDataset) -> None:
    made = generate(wnut16, len(wnut16), seed=13)
    assert len(made) == len(wnut16)
    assert augment(wnut16, 1.0, seed=13).sentences[len(wnut16):] == [a.tokens for a in made]
    valid = {label.split("-", 1)[1] for label in wnut16.labels if label != "O"}
    for a in made:
        assert (a.tokens, a.tags) != (wnut16.sentences[a.source], wnut16.tags[a.source])
        assert {s.label for s in tags_to_spans(a.tags, BIO)} <= valid
    used = Counter(a.operation for a in made)
    assert set(used) == set(OPERATIONS)
    # Token replacement dominates (a no-op draw falls back to it, and it rarely is one), but none is rare.
    assert min(used.values()) > len(made) // 100
    # Only mention replacement may change a sentence's length or its tags.
    for a in made:
        if a.operation != "mention_replacement":
            assert a.tags == wnut16.tags[a.source] and len(a.tokens) == len(wnut16.sentences[a.source])


def test_unchangeable_sentences_give_fewer_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    changeable = _dataset([["a"], ["b"]], [["O"], ["O"]], BIO)  # token replacement can swap "a" and "b"
    assert len(generate(changeable, 2, seed=0, probability=1.0)) == 2
    frozen = _dataset([["a"], ["a"]], [["O"], ["O"]], BIO)  # nothing to draw but the same token
    with caplog.at_level("WARNING", logger="ner_builder.augment"):
        out = augment(frozen, 1.0, seed=0, probability=1.0)
    assert out is frozen
    assert "made 0 of 2" in caplog.text


def test_ill_formed_source_tags_come_out_canonical() -> None:
    dataset = _dataset([["x", "y", "z"], ["u", "v", "w"]], [["O", "I-PER", "I-PER"], ["B-PER", "O", "O"]], BIO)
    for a in generate(dataset, 6, seed=2, probability=1.0):
        _assert_well_formed(a.tokens, a.tags, dataset)


# --- operations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_bio", "tiny_bmes"])
def test_replace_mentions_keeps_types_and_outside_tokens(name: str, request: pytest.FixtureRequest) -> None:
    dataset: NerDataset = request.getfixturevalue(name)
    index, rng, scheme = build_index(dataset), random.Random(5), dataset.scheme
    known = _mentions(dataset)
    lengths: set[int] = set()
    for _ in range(20):
        for tokens, tags in zip(dataset.sentences, dataset.tags, strict=True):
            out_tokens, out_tags = replace_mentions(tokens, tags, index, rng, 1.0)
            _assert_well_formed(out_tokens, out_tags, dataset)
            before, after = tags_to_spans(tags, scheme), tags_to_spans(out_tags, scheme)
            assert [s.label for s in after] == [s.label for s in before]
            for span in after:
                assert (span.label, tuple(out_tokens[span.start : span.end])) in known
                lengths.add(span.end - span.start)
            # O tokens: the same ones, in the same order
            assert [t for t, g in zip(out_tokens, out_tags, strict=True) if g == "O"] == [
                t for t, g in zip(tokens, tags, strict=True) if g == "O"]
    assert {1, 2, 3} <= lengths  # single- and multi-token mentions were drawn


def test_replace_mentions_regenerates_tags_for_the_new_length(tiny_bmes: NerDataset) -> None:
    index = build_index(tiny_bmes)
    seen: set[tuple[str, ...]] = set()
    rng = random.Random(0)
    for _ in range(50):
        tokens, tags = replace_mentions(list("王在京"), ["S-PER", "O", "S-LOC"], index, rng, 1.0)
        loc = tokens[tokens.index("在") + 1 :]
        seen.add(tuple(tags[tokens.index("在") + 1 :]))
        assert "".join(loc) in {"北京", "上海市", "京"}
    assert seen == {("B-LOC", "E-LOC"), ("B-LOC", "M-LOC", "E-LOC"), ("S-LOC",)}


@pytest.mark.parametrize("name", ["tiny_bio", "tiny_bmes"])
def test_replace_tokens_draws_same_tag_tokens(name: str, request: pytest.FixtureRequest) -> None:
    dataset: NerDataset = request.getfixturevalue(name)
    index, rng = build_index(dataset), random.Random(1)
    pairs = {(t, g) for words, tags in zip(dataset.sentences, dataset.tags, strict=True)
             for t, g in zip(words, tags, strict=True)}
    changed = False
    for tokens, tags in zip(dataset.sentences, dataset.tags, strict=True):
        out_tokens, out_tags = replace_tokens(tokens, tags, index, rng, 1.0)
        assert out_tags == tags
        assert set(zip(out_tokens, out_tags, strict=True)) <= pairs
        changed |= out_tokens != tokens
    assert changed


@pytest.mark.parametrize("name", ["tiny_bio", "tiny_bmes"])
def test_shuffle_keeps_tags_and_segment_tokens(name: str, request: pytest.FixtureRequest) -> None:
    dataset: NerDataset = request.getfixturevalue(name)
    index, rng, scheme = build_index(dataset), random.Random(4), dataset.scheme
    changed = False
    for _ in range(10):
        for tokens, tags in zip(dataset.sentences, dataset.tags, strict=True):
            out_tokens, out_tags = shuffle_segments(tokens, tags, index, rng, 1.0)
            assert out_tags == tags
            for start, end in segments(tags, scheme):
                assert Counter(out_tokens[start:end]) == Counter(tokens[start:end])
            changed |= out_tokens != tokens
    assert changed


def test_segments_are_mentions_and_outside_runs() -> None:
    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "O", "B-ORG"]
    assert segments(tags, BIO) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7)]


def test_probability_zero_changes_nothing(tiny_bio: NerDataset) -> None:
    index, rng = build_index(tiny_bio), random.Random(0)
    for op in OPERATIONS.values():
        for tokens, tags in zip(tiny_bio.sentences, tiny_bio.tags, strict=True):
            assert op(tokens, tags, index, rng, 0.0) == (tokens, tags)


# --- spans_to_tags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spans", "length", "expected"),
    [
        ([Span("LOC", 1, 3), Span("PER", 2, 4), Span("ORG", 4, 5)], 5,
         ["O", "B-LOC", "I-LOC", "O", "B-ORG"]),  # an overlapping span is dropped
        ([Span("PER", 0, 1), Span("LOC", 1, 4)], 4, ["B-PER", "B-LOC", "I-LOC", "I-LOC"]),
        ([Span("PER", -1, 2), Span("LOC", 3, 9)], 5, ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]),  # clipped
        ([], 3, ["O", "O", "O"]),
    ],
)
def test_spans_to_tags_bio_matches_spans_to_bio(spans: list[Span], length: int, expected: list[str]) -> None:
    assert spans_to_tags(spans, length, BIO) == spans_to_bio(spans, length) == expected


def test_spans_to_tags_single_and_multi_token() -> None:
    spans = [Span("PER", 0, 1), Span("LOC", 2, 5), Span("ORG", 5, 7)]
    assert spans_to_tags(spans, 8, BMES) == ["S-PER", "O", "B-LOC", "M-LOC", "E-LOC", "B-ORG", "E-ORG", "O"]
    assert spans_to_tags(spans, 8, BIOES) == ["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "B-ORG", "E-ORG", "O"]
    assert spans_to_tags(spans, 8, BIO) == ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "B-ORG", "I-ORG", "O"]
