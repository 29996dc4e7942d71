"""Convert code-point offsets (Python str indices) into the unit a client asked for.

One prefix sum over the text's code points per request text, so a long text with many entities
costs O(len(text) + entities), not a re-encode per entity.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ner_gateway.core.domain import Entity, OffsetUnit


def unit_prefix(text: str, unit: OffsetUnit) -> npt.NDArray[np.int64]:
    """``prefix[i]`` = length of ``text[:i]`` in ``unit``; exact for astral-plane characters."""
    code_points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    if unit is OffsetUnit.UTF8_BYTE:
        widths = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    elif unit is OffsetUnit.UTF16_CODE_UNIT:
        widths = 1 + (code_points >= 0x10000)
    else:
        widths = np.ones(len(code_points), dtype=np.int64)
    return np.concatenate([[0], np.cumsum(widths, dtype=np.int64)])


def convert_entities(text: str, entities: list[Entity], unit: OffsetUnit) -> list[Entity]:
    if unit is OffsetUnit.CODE_POINT or not entities:
        return entities
    prefix = unit_prefix(text, unit)
    return [Entity(e.label, int(prefix[e.start]), int(prefix[e.end]), e.text, e.score) for e in entities]
