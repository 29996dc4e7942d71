"""Code-point offsets -> UTF-8 byte / UTF-16 code unit offsets: exact cases and a property over the decode path."""

from __future__ import annotations

import gc
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ner_gateway.core.decoding import LabelTable, decode
from ner_gateway.core.domain import Aggregation, Entity, OffsetUnit
from ner_gateway.core.offsets import convert_entities, unit_prefix
from ner_gateway.core.tokenizing import TextTokenizer

from conftest import TINY_LABELS


def _slice(text: str, start: int, end: int, unit: OffsetUnit) -> str:
    if unit is OffsetUnit.UTF8_BYTE:
        return text.encode("utf-8")[start:end].decode("utf-8")
    if unit is OffsetUnit.UTF16_CODE_UNIT:
        return text.encode("utf-16-le")[2 * start:2 * end].decode("utf-16-le")
    return text[start:end]


def _entity(text: str, fragment: str, label: str = "X", occurrence: int = 0) -> Entity:
    start = -1
    for _ in range(occurrence + 1):
        start = text.index(fragment, start + 1)
    return Entity(label, start, start + len(fragment), fragment, 0.5)


CASES = [
    # (text, fragments that are entities)
    ("I ❤ 🍕 in Napoli 🇮🇹!", ["🍕", "Napoli", "🇮🇹", "!"]),
    ("😀😀 Ann 😀 Lee", ["Ann", "😀 Lee", "😀😀"]),
    ("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math 𝐁𝐨𝐥𝐝", ["𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "math", "𝐁𝐨𝐥𝐝"]),
    ("e\u0301cole and Zu\u0308rich", ["e\u0301cole", "Zu\u0308rich", "\u0301"]),
    ("東京と北京、서울 and Ελλάδα", ["東京", "北京", "서울", "Ελλάδα"]),
    ("family 👨‍👩‍👧 at Café Zürich", ["👨‍👩‍👧", "Café Zürich"]),
    ("plain ascii text", ["plain", "text"]),
]


@pytest.mark.parametrize("unit", list(OffsetUnit))
@pytest.mark.parametrize(("text", "fragments"), CASES)
def test_converted_offsets_slice_the_entity(text: str, fragments: list[str], unit: OffsetUnit) -> None:
    entities = [_entity(text, f) for f in fragments]
    converted = convert_entities(text, entities, unit)
    assert len(converted) == len(entities)
    for before, after in zip(entities, converted, strict=True):
        assert (after.label, after.text, after.score) == (before.label, before.text, before.score)
        assert _slice(text, after.start, after.end, unit) == before.text


def test_exact_values() -> None:
    text = "a😀b \u00e9東"  # 😀 = U+1F600: 1 code point, 2 UTF-16 units, 4 UTF-8 bytes; é precomposed
    assert unit_prefix(text, OffsetUnit.CODE_POINT).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert unit_prefix(text, OffsetUnit.UTF16_CODE_UNIT).tolist() == [0, 1, 3, 4, 5, 6, 7]
    assert unit_prefix(text, OffsetUnit.UTF8_BYTE).tolist() == [0, 1, 5, 6, 7, 9, 12]


def test_emoji_entity() -> None:
    text = "x 🍕 y"
    (entity,) = convert_entities(text, [Entity("FOOD", 2, 3, "🍕", 0.9)], OffsetUnit.UTF16_CODE_UNIT)
    assert (entity.start, entity.end) == (2, 4)
    (entity,) = convert_entities(text, [Entity("FOOD", 2, 3, "🍕", 0.9)], OffsetUnit.UTF8_BYTE)
    assert (entity.start, entity.end) == (2, 6)


def test_code_point_is_identity_and_empty() -> None:
    entities = [Entity("X", 0, 1, "a", 1.0)]
    assert convert_entities("ab", entities, OffsetUnit.CODE_POINT) == entities
    for unit in OffsetUnit:
        assert convert_entities("", [], unit) == []
        assert unit_prefix("", unit).tolist() == [0]


ALPHABET = (
    "abcXYZ 019.,!?-'\t\n"  # ASCII
    "éüñßÅçø"  # Latin-1 / 2-byte UTF-8
    "\u0301\u0308\u0303"  # combining marks
    "東京北京서울Ωж"  # BMP, 3-byte UTF-8
    "\u200b\u200d\ufeff\uffff"  # zero-width, BOM, last BMP
    "😀🍕🇮🇹👍🏽𝔘\U0010ffff"  # astral: 4-byte UTF-8, surrogate pairs in UTF-16
)


# --- property: the whole decode path, random texts, every unit --------------------------------------------

TOKEN_LOGITS = np.random.default_rng(0).normal(size=(40_000, len(TINY_LABELS))).astype(np.float32)


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> TextTokenizer:
    return TextTokenizer(tiny_checkpoint / "tokenizer.json", 64)


def test_entities_slice_exactly_in_every_unit(tokenizer: TextTokenizer) -> None:
    table = LabelTable.from_labels(TINY_LABELS)

    @settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.text(st.characters(exclude_categories=("Cs",)), max_size=80), st.sampled_from(list(Aggregation)))
    def check(text: str, aggregation: Aggregation) -> None:
        (tokens,) = tokenizer.tokenize([text])
        logits = TOKEN_LOGITS[np.asarray(tokens.encoding.ids, dtype=np.int64)]  # context-free "model"
        entities = decode(text, logits, tokens.view, table, aggregation)
        for unit in OffsetUnit:
            converted = convert_entities(text, entities, unit)
            previous_end = 0
            for entity in converted:
                assert _slice(text, entity.start, entity.end, unit) == entity.text
                assert previous_end <= entity.start < entity.end  # sorted, non-overlapping, non-empty
                previous_end = entity.end

    check()


def _many_entities(repeats: int) -> tuple[str, list[Entity]]:
    text = "😀 Zürich 東京 " * repeats  # 12 code points: 1 astral (a surrogate pair), 1 two-byte, 2 three-byte UTF-8
    # An entity every 13 code points: they start and end at every position of the 12-code-point pattern.
    return text, [Entity("X", i, i + 6, text[i : i + 6], 0.5) for i in range(0, len(text) - 6, 13)]


def _cpu_seconds(text: str, entities: list[Entity], unit: OffsetUnit) -> float:
    started = time.process_time()  # this process's CPU time: other processes on the machine do not count
    convert_entities(text, entities, unit)
    return time.process_time() - started


@pytest.mark.parametrize("unit", [OffsetUnit.UTF8_BYTE, OffsetUnit.UTF16_CODE_UNIT])
def test_long_text_conversion_is_linear(unit: OffsetUnit) -> None:
    """8x the text and the entities costs ~8x (measured ~9), not ~64x as a re-encode of the prefix per entity
    does (measured ~60 at these sizes: 12k and 96k code points, 0.9k and 7.4k entities). Medians of interleaved
    runs of CPU time with the garbage collector off; the bound (24) is far from both."""
    small, large = _many_entities(1_000), _many_entities(8_000)
    encoding, width = ("utf-8", 1) if unit is OffsetUnit.UTF8_BYTE else ("utf-16-le", 2)
    encoded = large[0].encode(encoding)
    converted = convert_entities(*large, unit)
    assert len(converted) == len(large[1]) > 7_000
    for entity, original in zip(converted, large[1], strict=True):  # exact all the way to the end of the text
        assert encoded[entity.start * width : entity.end * width].decode(encoding) == original.text
    small_s: list[float] = []
    large_s: list[float] = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(7):
            small_s.append(_cpu_seconds(*small, unit))
            large_s.append(_cpu_seconds(*large, unit))
    finally:
        gc.enable()
    ratio = statistics.median(large_s) / statistics.median(small_s)
    assert ratio < 24, f"8x the entities took {ratio:.1f}x the CPU time (linear: ~8, quadratic: ~64): " \
                       f"{small_s=} {large_s=}"
