"""Code-point offsets -> UTF-8 byte / UTF-16 code unit offsets (hypothesis is not installed: seeded loop)."""

from __future__ import annotations

import itertools
import random

import pytest

from ner_gateway.domain import Entity, OffsetUnit
from ner_gateway.offsets import convert_entities, convert_offset


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
    assert [convert_offset(text, i, OffsetUnit.CODE_POINT) for i in range(len(text) + 1)] == [0, 1, 2, 3, 4, 5, 6]
    assert [convert_offset(text, i, OffsetUnit.UTF16_CODE_UNIT) for i in range(len(text) + 1)] == [
        0, 1, 3, 4, 5, 6, 7
    ]
    assert [convert_offset(text, i, OffsetUnit.UTF8_BYTE) for i in range(len(text) + 1)] == [0, 1, 5, 6, 7, 9, 12]


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
        assert convert_offset("", 0, unit) == 0


ALPHABET = (
    "abcXYZ 019.,!?-'\t\n"  # ASCII
    "éüñßÅçø"  # Latin-1 / 2-byte UTF-8
    "\u0301\u0308\u0303"  # combining marks
    "東京北京서울Ωж"  # BMP, 3-byte UTF-8
    "\u200b\u200d\ufeff\uffff"  # zero-width, BOM, last BMP
    "😀🍕🇮🇹👍🏽𝔘\U0010ffff"  # astral: 4-byte UTF-8, surrogate pairs in UTF-16
)


@pytest.mark.parametrize("unit", [OffsetUnit.UTF8_BYTE, OffsetUnit.UTF16_CODE_UNIT])
def test_random_texts_and_spans(unit: OffsetUnit) -> None:
    rng = random.Random(20240517)
    for _ in range(500):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))
        entities = []
        for _ in range(rng.randint(0, 5)):
            start = rng.randint(0, len(text))
            end = rng.randint(start, len(text))
            entities.append(Entity("X", start, end, text[start:end], rng.random()))
        converted = convert_entities(text, entities, unit)
        encoded_length = len(text.encode("utf-8" if unit is OffsetUnit.UTF8_BYTE else "utf-16-le"))
        for before, after in zip(entities, converted, strict=True):
            assert _slice(text, after.start, after.end, unit) == before.text == after.text
            assert _slice(text, 0, after.start, unit) == text[: before.start]
            assert after.start <= after.end
        assert convert_offset(text, len(text), unit) * (1 if unit is OffsetUnit.UTF8_BYTE else 2) == encoded_length
        # monotone, and strictly so: every code point is at least one unit
        positions = [convert_offset(text, i, unit) for i in range(len(text) + 1)]
        assert all(b > a for a, b in itertools.pairwise(positions))
