"""Fast (Rust) tokenization: texts -> their tokens, read once, and the special tokens that wrap a model input.

Texts are tokenized once without special tokens; every model input is then one window of those tokens
(core/windowing.py) wrapped in the tokenizer's own special tokens (e.g. ``[CLS] … [SEP]``) when the batcher builds
the arrays (core/batching.py). A text that fits the model is a single window, so short texts get exactly the input
Hugging Face would build.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from ner_gateway.artifact.cjk import CjkPieces, cjk_pieces
from ner_gateway.core.errors import ConfigurationError


@dataclass(frozen=True)
class TokenView:
    """What decoding needs to know about one text's tokens (special tokens included)."""

    offsets: npt.NDArray[np.int64]  # [N, 2], code points
    special: npt.NDArray[np.bool_]  # [N]
    is_subword: npt.NDArray[np.bool_]  # [N]: continues the previous token's word (HF's rule)


@dataclass(frozen=True, slots=True)
class TextTokens:
    """One text's tokens (no special tokens) and what decoding needs to know about them, read from the
    ``Encoding`` once (each of its properties builds a new Python list on every access)."""

    ids: list[int]
    view: TokenView
    encoding: Encoding

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class SpecialTokens:
    """What the tokenizer's post-processor puts around a single sequence: ids and type ids before and after."""

    prefix_ids: list[int]
    prefix_types: list[int]
    suffix_ids: list[int]
    suffix_types: list[int]
    content_type_id: int  # the type id of the sequence's own tokens

    @property
    def prefix(self) -> int:
        """Special tokens before the content (where a window's logits of its first token start)."""
        return len(self.prefix_ids)

    @property
    def count(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids)


class TextTokenizer:
    def __init__(self, path: Path, max_length: int) -> None:
        self._tokenizer = Tokenizer.from_file(str(path))
        # Never truncate or pad inside the tokenizer: long texts become windows, padding is ours.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.max_length = max_length
        self.special = self._special_template()
        self.window_capacity = max_length - self.special.count
        if self.window_capacity < 1:
            raise ConfigurationError(f"max length {max_length} leaves no room besides the special tokens")
        model = json.loads(self._tokenizer.to_str())["model"]
        # HF decides word boundaries by whether the tokenizer model has a continuing-subword prefix ("##").
        self._word_aware = bool(model.get("continuing_subword_prefix"))
        unk = model.get("unk_token")
        self._unk_id = self._tokenizer.token_to_id(unk) if unk else model.get("unk_id")

    @property
    def cjk_pieces(self) -> CjkPieces:
        return cjk_pieces(self._tokenizer)

    def _special_template(self) -> SpecialTokens:
        probe = self._tokenizer.encode("a")
        content = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        pairs = list(zip(probe.ids, probe.type_ids, strict=True))
        if not content:
            raise ConfigurationError("the tokenizer produced no content token for 'a'")
        prefix, suffix = pairs[: content[0]], pairs[content[-1] + 1 :]
        return SpecialTokens([i for i, _ in prefix], [t for _, t in prefix], [i for i, _ in suffix],
                             [t for _, t in suffix], probe.type_ids[content[0]])

    def tokenize(self, texts: list[str]) -> list[TextTokens]:
        if len(texts) == 1:  # one text: no hop into the tokenizer's thread pool, which costs more than it saves
            encodings = [self._tokenizer.encode(texts[0], add_special_tokens=False)]
        else:
            encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [self._text_tokens(text, e) for text, e in zip(texts, encodings, strict=True)]

    def _text_tokens(self, text: str, encoding: Encoding) -> TextTokens:
        ids = encoding.ids
        offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        if self._word_aware:
            # HF: a token is a subword when its string ("##ing") is longer than the text it covers ("ing").
            token_lengths = np.fromiter(map(len, encoding.tokens), dtype=np.int64, count=len(offsets))
            is_subword = token_lengths != offsets[:, 1] - offsets[:, 0]
        else:
            # HF's fallback: no space just before or at the token's start, and not at the text start.
            is_space = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) == ord(" ")
            is_space = np.append(is_space, False)  # an offset may equal len(text)
            starts = offsets[:, 0]
            is_subword = (starts > 0) & ~is_space[np.maximum(starts - 1, 0)] & ~is_space[starts]
        if self._unk_id is not None:
            is_subword &= np.array(ids) != self._unk_id
        # Tokenized without special tokens: none is special, unless the tokenizer adds some of its own.
        mask = encoding.special_tokens_mask
        special = np.array(mask, dtype=bool) if any(mask) else np.zeros(len(ids), dtype=bool)
        return TextTokens(ids, TokenView(offsets=offsets, special=special, is_subword=is_subword), encoding)
