"""Logits -> entities: crafted cases, and parity with the real Hugging Face token-classification pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ner_gateway.decoding import LabelTable, decode
from ner_gateway.domain import Aggregation, Entity
from ner_gateway.errors import NotImplementedYet
from ner_gateway.tokenization import TextTokenizer

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "MISC"]
TABLE = LabelTable.from_labels(LABELS)
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]

# One token per word; specials ([CLS]/[SEP]) are added around them by _case.
TEXT = "Ann Lee met Bob in New York City"
WORDS = [(0, 3), (4, 7), (8, 11), (12, 15), (16, 18), (19, 22), (23, 27), (28, 32)]


def _row(label: str, p: float) -> np.ndarray:
    """Logits whose softmax gives ``label`` probability ``p`` and shares the rest evenly."""
    probs = np.full(len(LABELS), (1.0 - p) / (len(LABELS) - 1))
    probs[LABELS.index(label)] = p
    return np.log(probs).astype(np.float32)


def _case(tags: list[tuple[str, float]], special: tuple[str, str] = ("O", "O"),
          words: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    words = WORDS[: len(tags)] if words is None else words
    assert len(words) == len(tags)
    logits = np.stack([_row(special[0], 0.9)] + [_row(t, p) for t, p in tags] + [_row(special[1], 0.9)])
    offsets = np.array([(0, 0), *words, (0, 0)], dtype=np.int64)
    mask = np.array([True] + [False] * len(tags) + [True])
    return logits, offsets, mask


def _decode(tags: list[tuple[str, float]], aggregation: Aggregation = Aggregation.SIMPLE, **kwargs) -> list[tuple]:
    logits, offsets, mask = _case(tags, **kwargs)
    entities = decode(TEXT, logits, offsets, mask, TABLE, aggregation)
    for e in entities:
        assert isinstance(e, Entity)
        assert e.text == TEXT[e.start:e.end]
    return [(e.label, e.start, e.end, e.text, round(e.score, 5)) for e in entities]


def test_b_after_same_type_starts_new_entity() -> None:
    assert _decode([("B-PER", 0.9), ("B-PER", 0.8)]) == [("PER", 0, 3, "Ann", 0.9), ("PER", 4, 7, "Lee", 0.8)]


def test_i_continues_and_score_is_mean() -> None:
    assert _decode([("B-PER", 0.9), ("I-PER", 0.6), ("I-PER", 0.75), ("O", 0.9)]) == [
        ("PER", 0, 11, "Ann Lee met", 0.75)
    ]


def test_i_after_o_starts_entity() -> None:
    assert _decode([("O", 0.9), ("O", 0.9), ("O", 0.9), ("I-PER", 0.7), ("O", 0.9), ("I-LOC", 0.5),
                    ("I-LOC", 0.7), ("I-LOC", 0.9)]) == [
        ("PER", 12, 15, "Bob", 0.7),
        ("LOC", 19, 32, "New York City", 0.7),
    ]


def test_entity_at_start_and_end() -> None:
    assert _decode([("I-ORG", 0.6), ("O", 0.9), ("O", 0.9), ("O", 0.9), ("O", 0.9), ("B-LOC", 0.8),
                    ("I-LOC", 0.8), ("B-LOC", 0.5)]) == [
        ("ORG", 0, 3, "Ann", 0.6),
        ("LOC", 19, 27, "New York", 0.8),
        ("LOC", 28, 32, "City", 0.5),
    ]


def test_different_types_adjacent() -> None:
    assert _decode([("B-PER", 0.9), ("I-LOC", 0.8), ("I-ORG", 0.7), ("B-ORG", 0.6), ("I-PER", 0.5)]) == [
        ("PER", 0, 3, "Ann", 0.9),
        ("LOC", 4, 7, "Lee", 0.8),
        ("ORG", 8, 11, "met", 0.7),
        ("ORG", 12, 15, "Bob", 0.6),
        ("PER", 16, 18, "in", 0.5),
    ]


def test_o_between_same_type_splits() -> None:
    assert _decode([("B-PER", 0.9), ("O", 0.9), ("I-PER", 0.8)]) == [
        ("PER", 0, 3, "Ann", 0.9),
        ("PER", 8, 11, "met", 0.8),
    ]


def test_special_tokens_skipped() -> None:
    # The specials carry entity logits; they must not produce entities nor join groups.
    assert _decode([("I-PER", 0.8), ("I-PER", 0.6)], special=("B-PER", "I-PER")) == [("PER", 0, 7, "Ann Lee", 0.7)]
    assert _decode([("O", 0.9)], special=("B-LOC", "B-LOC")) == []
    assert _decode([("O", 0.9)], Aggregation.NONE, special=("B-LOC", "B-LOC")) == []


def test_label_without_prefix() -> None:
    # HF: a label without B-/I- counts as a continuation of its own tag.
    assert _decode([("MISC", 0.9), ("MISC", 0.7), ("B-PER", 0.8), ("MISC", 0.5), ("O", 0.9), ("MISC", 0.6)]) == [
        ("MISC", 0, 7, "Ann Lee", 0.8),
        ("PER", 8, 11, "met", 0.8),
        ("MISC", 12, 15, "Bob", 0.5),
        ("MISC", 19, 22, "New", 0.6),
    ]


def test_subword_tokens_merge_into_one_span() -> None:
    # "York" as two word pieces "Yo" "##rk": contiguous offsets, one entity covering both.
    words = [(19, 22), (23, 25), (25, 27)]
    assert _decode([("B-LOC", 0.9), ("I-LOC", 0.7), ("I-LOC", 0.8)], words=words) == [
        ("LOC", 19, 27, "New York", 0.8)
    ]


def test_none_keeps_full_tags_per_token() -> None:
    tags = [("B-PER", 0.9), ("I-PER", 0.6), ("O", 0.9), ("I-LOC", 0.7), ("MISC", 0.55)]
    assert _decode(tags, Aggregation.NONE) == [
        ("B-PER", 0, 3, "Ann", 0.9),
        ("I-PER", 4, 7, "Lee", 0.6),
        ("I-LOC", 12, 15, "Bob", 0.7),
        ("MISC", 16, 18, "in", 0.55),
    ]


def test_all_o_gives_nothing() -> None:
    assert _decode([("O", 0.9)] * 4) == []
    assert _decode([("O", 0.9)] * 4, Aggregation.NONE) == []


@pytest.mark.parametrize("aggregation", [Aggregation.SIMPLE, Aggregation.NONE])
def test_empty_input(aggregation: Aggregation) -> None:
    empty = decode("", np.zeros((0, len(LABELS)), np.float32), np.zeros((0, 2), np.int64), np.zeros(0, bool),
                   TABLE, aggregation)
    assert empty == []
    logits, offsets, mask = _case([])  # only [CLS] [SEP]
    assert decode("", logits, offsets, mask, TABLE, aggregation) == []


def test_scores_are_softmax_probabilities() -> None:
    logits = np.array([[0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    (entity,) = decode("Ann", logits, np.array([[0, 3]]), np.array([False]), TABLE, Aggregation.SIMPLE)
    assert entity.label == "PER"
    assert entity.score == pytest.approx(np.exp(2.0) / (np.exp(2.0) + np.exp(1.0) + 6), abs=1e-6)


@pytest.mark.parametrize("aggregation", [Aggregation.FIRST, Aggregation.AVERAGE, Aggregation.MAX])
def test_word_aggregations_not_implemented(aggregation: Aggregation) -> None:
    logits, offsets, mask = _case([("B-PER", 0.9), ("O", 0.9)])
    with pytest.raises(NotImplementedYet, match=aggregation.name):
        decode(TEXT, logits, offsets, mask, TABLE, aggregation)


# --- parity with transformers' TokenClassificationPipeline -----------------------------------------------

PARITY_TEXTS = [
    "Barack Obama was born in Honolulu, Hawaii.",
    "Apple is looking at buying U.K. startup for $1 billion.",
    "Angela Merkel met Emmanuel Macron at the Élysée Palace in Paris on Tuesday.",
    "I'm watching Game of Thrones on HBO tonight with @sarah #excited",
    "Visit https://example.com/path?q=1&x=y or mail info@example.org now!",
    "The 2024-05-17 release (v3.2.1) costs $19.99, i.e. 20% off.",
    "Tokyo 東京 and Zürich are cities; 北京欢迎你！",
    "Emoji test 🙂👍🏽 with flags 🇫🇷 and 👨‍👩‍👧 families.",
    "Tabs\tand\nnewlines\r\nbetween   words   with    spaces.",
    "   leading and trailing spaces   ",
    "naïve café résumé coöperate Ångström",
    "Combining: e\u0301cole, n\u0303, a\u0308bc",
    "ALL CAPS NEW YORK TIMES REPORTS",
    "hyphen-ated well-known state-of-the-art Jean-Luc Picard",
    "#hashtag #AnotherOne @mention @user_name RT",
    "3.14159 1,000,000 42 0x1F 1e-9",
    "Mr. Smith went to Washington D.C. in Jan. 2020.",
    "Don't won't can't shouldn't y'all",
    "Москва и Санкт-Петербург — города России.",
    "Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "مرحبا بالعالم من دبي",
    "हिन्दी में नई दिल्ली",
    "한국어 서울 부산",
    "Quotes “smart” ‘single’ «guillemets» and — dashes – too…",
    "a",
    ".",
    "Microsoft Google Amazon Facebook Netflix Tesla Nvidia Intel",
    "unbelievably antidisestablishmentarianism supercalifragilistic",
    "Zero\u200bwidth\u200bspace and soft\u00adhyphen",
    "Paris Paris Paris London London Berlin",
]


@pytest.fixture(scope="module")
def hf(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    return model, tokenizer


@pytest.fixture(scope="module")
def ours(tiny_checkpoint: Path, hf) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:  # type: ignore[no-untyped-def]
    """(logits, offsets, special mask) per parity text, through the gateway's tokenizer."""
    import torch

    model, _ = hf
    tokenizer = TextTokenizer(tiny_checkpoint / "tokenizer.json", 64, INPUTS)
    out = []
    for text in PARITY_TEXTS:
        batch = tokenizer.encode([text])
        with torch.no_grad():
            logits = model(**{k: torch.from_numpy(v) for k, v in batch.arrays(INPUTS).items()}).logits[0].numpy()
        out.append((logits, batch.offsets(0), batch.special_mask(0)))
    return out


def test_tokenizers_agree(hf, ours) -> None:  # type: ignore[no-untyped-def]
    _, tokenizer = hf
    for text, (_, offsets, special) in zip(PARITY_TEXTS, ours, strict=True):
        encoded = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        assert len(encoded["input_ids"]) <= 64
        assert offsets.tolist() == [list(o) for o in encoded["offset_mapping"]], text
        assert special.tolist() == [bool(s) for s in encoded["special_tokens_mask"]], text


@pytest.mark.parametrize("aggregation", [Aggregation.SIMPLE, Aggregation.NONE])
def test_parity_with_hf_pipeline(hf, ours, aggregation: Aggregation) -> None:  # type: ignore[no-untyped-def]
    from transformers import pipeline

    model, tokenizer = hf
    table = LabelTable.from_labels([model.config.id2label[i] for i in range(model.config.num_labels)])
    ner = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy=aggregation.value,
                   device="cpu")
    key = "entity_group" if aggregation is Aggregation.SIMPLE else "entity"
    total = merged = 0
    for text, (logits, offsets, special) in zip(PARITY_TEXTS, ours, strict=True):
        expected = ner(text)
        got = decode(text, logits, offsets, special, table, aggregation)
        assert [(e.label, e.start, e.end) for e in got] == [(h[key], h["start"], h["end"]) for h in expected], text
        for e, h in zip(got, expected, strict=True):
            assert e.score == pytest.approx(float(h["score"]), abs=1e-4)
            assert e.text == text[e.start:e.end]
        total += len(got)
        merged += sum(len(tokenizer(e.text, add_special_tokens=False)["input_ids"]) > 1 for e in got)
    # the random classifier must actually exercise the paths being compared
    assert total > 30
    if aggregation is Aggregation.SIMPLE:
        assert merged > 0
