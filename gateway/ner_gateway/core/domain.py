"""Transport-free request/result types of the recognition pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple


class Aggregation(StrEnum):
    """Hugging Face TokenClassificationPipeline aggregation strategies."""

    NONE = "none"
    SIMPLE = "simple"
    FIRST = "first"
    AVERAGE = "average"
    MAX = "max"


class OffsetUnit(StrEnum):
    CODE_POINT = "code_point"
    UTF8_BYTE = "utf8_byte"
    UTF16_CODE_UNIT = "utf16_code_unit"


class Entity(NamedTuple):
    """One entity; a named tuple: immutable, and made 4x faster than a frozen dataclass (decoding makes one per
    entity, thousands per second)."""

    label: str
    start: int
    end: int
    text: str
    score: float


@dataclass(frozen=True, slots=True)
class RecognizeRequest:
    texts: list[str]
    model: str = ""
    aggregation: Aggregation = Aggregation.SIMPLE
    offset_unit: OffsetUnit = OffsetUnit.CODE_POINT
    request_id: str = ""
    constrained: bool = False  # Viterbi over the tagging scheme's allowed transitions
    model_version: str = ""  # pinned version; "": the rollout policy chooses


@dataclass(frozen=True, slots=True)
class Document:
    entities: list[Entity]
    windows: int  # model inputs the text was split into (1 unless longer than the model's max length)


@dataclass(frozen=True, slots=True)
class StageTimings:
    tokenize_us: int
    infer_us: int
    decode_us: int


@dataclass(frozen=True, slots=True)
class Recognition:
    documents: list[Document]
    model: str
    model_version: str
    request_id: str
    timings: StageTimings
