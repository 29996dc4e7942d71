"""The one tagging-scheme model (ner_gateway.artifact.schemes): prefixes and roles, the prefix written per position,
tag parsing, and that the manifest still reads and writes schemes by the same strings."""

from __future__ import annotations

import json

import pytest

from ner_builder.spans import Span, spans_to_tags, tags_to_spans, token_tags
from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.artifact.schemes import Role, TaggingScheme, detect_tagging_scheme, split_tag


@pytest.mark.parametrize(
    ("scheme", "prefixes"),
    [
        (TaggingScheme.BIO, ("B", "I")),
        (TaggingScheme.IOB1, ("B", "I")),
        (TaggingScheme.BIOES, ("B", "I", "E", "S")),
        (TaggingScheme.BILOU, ("B", "I", "L", "U")),
        (TaggingScheme.BMES, ("B", "M", "E", "S")),
    ],
)
def test_prefixes_in_label_order(scheme: TaggingScheme, prefixes: tuple[str, ...]) -> None:
    assert scheme.prefixes == prefixes
    assert [scheme.roles[p] for p in prefixes][:2] == [Role.BEGIN, Role.INSIDE]


@pytest.mark.parametrize(
    ("scheme", "single", "begin", "inside", "end"),
    [
        (TaggingScheme.BIO, "B", "B", "I", "I"),  # no end or single prefix: inside and begin stand in
        (TaggingScheme.BIOES, "S", "B", "I", "E"),
        (TaggingScheme.BILOU, "U", "B", "I", "L"),
        (TaggingScheme.BMES, "S", "B", "M", "E"),
        (TaggingScheme.IOB1, "I", "I", "I", "I"),  # B- only after an entity of the same type
    ],
)
def test_prefix_per_position(scheme: TaggingScheme, single: str, begin: str, inside: str, end: str) -> None:
    assert [scheme.prefix(True, True), scheme.prefix(True, False), scheme.prefix(False, False),
            scheme.prefix(False, True)] == [single, begin, inside, end]


def test_iob1_marks_only_a_boundary_between_entities_of_one_type() -> None:
    iob1 = TaggingScheme.IOB1
    assert (iob1.prefix(True, False, follows_same_type=True), iob1.prefix(True, True, follows_same_type=True)) == (
        "B", "B")
    spans = [Span("PER", 0, 2), Span("PER", 2, 3), Span("LOC", 3, 4), Span("LOC", 5, 6)]
    tags = spans_to_tags(spans, 6, iob1)
    assert tags == ["I-PER", "I-PER", "B-PER", "I-LOC", "O", "I-LOC"]
    assert tags_to_spans(tags, iob1) == spans
    # Tokens: the second PER token starts a new PER entity right after the first.
    offsets = [(0, 0), (0, 2), (2, 4), (4, 6), (0, 0)]
    assert token_tags(offsets, [Span("PER", 0, 2), Span("PER", 2, 6)], iob1) == [
        None, "I-PER", "B-PER", "I-PER", None]


@pytest.mark.parametrize("scheme", list(TaggingScheme))
def test_spans_round_trip_under_every_scheme(scheme: TaggingScheme) -> None:
    spans = [Span("PER", 0, 1), Span("LOC", 1, 4), Span("LOC", 4, 5), Span("ORG", 6, 8)]
    assert tags_to_spans(spans_to_tags(spans, 9, scheme), scheme) == spans


def test_split_tag() -> None:
    assert split_tag("B-geo-loc") == ("B", "geo-loc")
    assert split_tag("O") is None
    assert split_tag("MISC") is None
    assert split_tag("B-") == ("B", "")


def test_detect_accepts_any_iterable() -> None:
    assert detect_tagging_scheme(iter(["O", "B-PER", "M-PER"])) is TaggingScheme.BMES


@pytest.mark.parametrize("scheme", ["BIO", "IOB1", "BIOES", "BILOU", "BMES"])
def test_manifest_reads_and_writes_the_same_strings(scheme: str) -> None:
    stored = {
        "name": "m", "version": "1", "labels": ["O", "B-PER"], "tagging_scheme": scheme, "max_sequence_length": 16,
        "precision": "fp32", "model_sha256": "0", "opset": 17, "inputs": ["input_ids"], "tokenizer_sha256": "0",
        "source_checkpoint": "c", "package_versions": {}, "created_at": "2024-01-01T00:00:00Z",
        "parity": {"texts": 1, "tokens": 2, "max_abs_logit_diff": 0.0, "argmax_agreement": 1.0},
    }
    manifest = ModelManifest.model_validate_json(json.dumps(stored))
    assert manifest.tagging_scheme is TaggingScheme(scheme)
    assert json.loads(manifest.model_dump_json())["tagging_scheme"] == scheme
