"""Convert code-point offsets (Python str indices) into the unit a client asked for."""

from __future__ import annotations

from ner_gateway.domain import Entity, OffsetUnit

_ENCODINGS = {OffsetUnit.UTF8_BYTE: ("utf-8", 1), OffsetUnit.UTF16_CODE_UNIT: ("utf-16-le", 2)}


def convert_offset(text: str, index: int, unit: OffsetUnit) -> int:
    """Length, in ``unit``, of ``text[:index]``; exact for astral-plane characters."""
    if unit is OffsetUnit.CODE_POINT:
        return index
    encoding, width = _ENCODINGS[unit]
    return len(text[:index].encode(encoding, errors="surrogatepass")) // width


def convert_entities(text: str, entities: list[Entity], unit: OffsetUnit) -> list[Entity]:
    if unit is OffsetUnit.CODE_POINT:
        return entities
    return [
        Entity(e.label, convert_offset(text, e.start, unit), convert_offset(text, e.end, unit), e.text, e.score)
        for e in entities
    ]
