"""CJK ideographs and how a tokenizer cuts them: one piece per character, or pieces that merge characters.

Chinese NER labels characters. BERT's basic tokenizer puts every CJK ideograph in a piece of its own, so an
entity span is exact; XLM-R's SentencePiece merges characters (`在北京` is one piece), so a span could only
be as exact as the pieces. The builder isolates the ideographs in such tokenizers (``ner_builder
.isolate_cjk``); the manifest records which of the two a model was built with, and the gateway checks it with
:func:`cjk_pieces` at start, since a different ``tokenizers`` release could read the same file another way.
"""

from __future__ import annotations

from enum import StrEnum

from tokenizers import Tokenizer

# BERT's ``_is_chinese_char`` blocks: the CJK Unified Ideographs, their extensions A-E and the compatibility
# ideographs. Not kana, hangul or CJK punctuation: BERT does not isolate those either.
CJK_RANGES: tuple[tuple[int, int], ...] = (
    (0x4E00, 0x9FFF),
    (0x3400, 0x4DBF),
    (0x20000, 0x2A6DF),
    (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F),
    (0x2B820, 0x2CEAF),
    (0xF900, 0xFAFF),
    (0x2F800, 0x2FA1F),
)

# Characters that XLM-R merges into pieces (在北京, 工作, 上海的) at the start, in the middle and after a space.
PROBE_TEXT = "我在北京工作\uff0c他在上海的银行。 中华人民共和国"


class CjkPieces(StrEnum):
    ISOLATED = "isolated"  # every ideograph is a piece of its own: entity spans are exact characters
    MERGED = "merged"  # a piece may hold several ideographs: a span can include a neighbour


def is_cjk(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in CJK_RANGES)


def cjk_pieces(tokenizer: Tokenizer) -> CjkPieces:
    """How ``tokenizer`` cuts the probe text's ideographs."""
    encoding = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    for start, end in encoding.offsets:
        if sum(map(is_cjk, PROBE_TEXT[start:end])) > 1:
            return CjkPieces.MERGED
    return CjkPieces.ISOLATED
