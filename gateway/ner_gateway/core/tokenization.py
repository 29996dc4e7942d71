"""Fast (Rust) tokenization, sliding windows over long texts, and the padded int64 arrays Triton takes.

Texts are tokenized once without special tokens; every model input is then one window of those
tokens wrapped in the tokenizer's own special tokens (e.g. ``[CLS] … [SEP]``). A text that fits the
model is a single window, so short texts get exactly the input Hugging Face would build.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from tokenizers import Encoding, Tokenizer

from ner_gateway.core.decoding import TokenView
from ner_gateway.errors import ConfigurationError
from ner_gateway.spec.cjk import CjkPieces, cjk_pieces

# Triton input name -> the Encoding attribute that fills it.
_INPUT_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def padded_width(length: int, buckets: tuple[int, ...] = ()) -> int:
    """Width a row of ``length`` tokens (specials included) is padded to: itself, or with ``buckets`` (a TensorRT
    engine's profile lengths) the smallest bucket that holds it."""
    return min((b for b in buckets if b >= length), default=length)


def right_pad(rows: Sequence[Sequence[int]], width: int | None = None, value: int = 0) -> npt.NDArray[np.int64]:
    """The int64 [rows, width] array model inputs are: each row from column 0, then ``value`` up to ``width``
    (default: the longest row)."""
    width = max(map(len, rows), default=0) if width is None else width
    out = np.full((len(rows), width), value, dtype=np.int64)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return out


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
class Window:
    text: int  # index of the text in the request
    start: int  # content token range [start, end)
    end: int


class TextTokenizer:
    def __init__(self, path: Path, max_length: int, input_names: list[str]) -> None:
        unknown = set(input_names) - set(_INPUT_FIELDS)
        if unknown:
            raise ConfigurationError(f"model inputs {sorted(unknown)} cannot be produced by a tokenizer")
        self._tokenizer = Tokenizer.from_file(str(path))
        # Never truncate or pad inside the tokenizer: long texts become windows, padding is ours.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.max_length = max_length
        self.input_names = input_names
        self._prefix, self._suffix, self._content_type_id = self._special_template()
        self._prefix_ids = [i for i, _ in self._prefix]
        self._suffix_ids = [i for i, _ in self._suffix]
        self._prefix_types = [t for _, t in self._prefix]
        self._suffix_types = [t for _, t in self._suffix]
        self._needs_type_ids = "token_type_ids" in input_names
        self.window_capacity = max_length - len(self._prefix) - len(self._suffix)
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

    @property
    def special_tokens(self) -> int:
        return len(self._prefix) + len(self._suffix)

    def _special_template(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]], int]:
        """The (id, type id) pairs the post-processor puts before and after a single sequence."""
        probe = self._tokenizer.encode("a")
        content = [i for i, special in enumerate(probe.special_tokens_mask) if not special]
        pairs = list(zip(probe.ids, probe.type_ids, strict=True))
        if not content:
            raise ConfigurationError("the tokenizer produced no content token for 'a'")
        return pairs[: content[0]], pairs[content[-1] + 1 :], probe.type_ids[content[0]]

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

    def plan_windows(self, tokens: list[TextTokens], stride: int) -> list[Window]:
        """Overlapping windows of at most ``window_capacity`` content tokens, ``stride`` tokens shared."""
        step = self.window_capacity - stride
        windows = []
        for index, text_tokens in enumerate(tokens):
            n = len(text_tokens)
            start = 0
            while True:
                end = min(start + self.window_capacity, n)
                windows.append(Window(index, start, end))
                if end >= n:
                    break
                start += step
        return windows

    def arrays(self, tokens: list[TextTokens], windows: list[Window], buckets: tuple[int, ...] = ()
               ) -> dict[str, npt.NDArray[np.int64]]:
        """Right-padded [windows, width] int64 model inputs of ``windows`` (see ``encode_rows``)."""
        contents = [tokens[w.text].ids[w.start : w.end] for w in windows]
        return self.encode_rows(contents, padded_width(max(map(len, contents)) + self.special_tokens, buckets))

    def encode_rows(self, contents: Sequence[Sequence[int]], width: int) -> dict[str, npt.NDArray[np.int64]]:
        """Right-padded [rows, width] int64 model inputs: each row's content token ids wrapped in the special
        tokens, padding with attention_mask 0.

        The one padding rule: ``width`` is the longest row, or with sequence buckets (a TensorRT engine's
        profile lengths, which take no ragged input) the smallest bucket that holds it (``padded_width``), so
        that calls of one bucket share a shape. Without buckets the model pads each length group itself.
        """
        rows = len(contents)
        ids = np.zeros((rows, width), dtype=np.int64)
        mask = np.zeros((rows, width), dtype=np.int64)
        type_ids = np.zeros((rows, width), dtype=np.int64) if self._needs_type_ids else None
        prefix, suffix = self._prefix_ids, self._suffix_ids
        for row, content in enumerate(contents):
            end = len(prefix) + len(content)
            ids[row, : len(prefix)] = prefix
            ids[row, len(prefix) : end] = content
            ids[row, end : end + len(suffix)] = suffix
            mask[row, : end + len(suffix)] = 1
            if type_ids is not None:
                type_ids[row, : len(prefix)] = self._prefix_types
                type_ids[row, len(prefix) : end] = self._content_type_id
                type_ids[row, end : end + len(suffix)] = self._suffix_types
        by_field = {"ids": ids, "type_ids": type_ids, "attention_mask": mask}
        return {name: by_field[_INPUT_FIELDS[name]] for name in self.input_names}  # type: ignore[misc]

    def merge(self, n_tokens: int, windows: list[Window], logits: list[npt.NDArray[np.float32]]
              ) -> npt.NDArray[np.float32]:
        """Content-token logits of one text: each token from the window where it is farthest from a cut edge.

        ``logits`` are the windows' outputs with special tokens, in window order. A window edge at the
        text's own start or end is not a cut (the token has its full context there).
        """
        prefix = len(self._prefix)
        if len(windows) == 1:  # the whole text in one window: its logits, without the special tokens
            return logits[0][prefix : prefix + n_tokens]
        first = logits[0]
        merged = np.zeros((n_tokens, first.shape[-1]), dtype=first.dtype)
        best = np.full(n_tokens, -1.0)
        for window, window_logits in zip(windows, logits, strict=True):
            positions = np.arange(window.start, window.end)
            left = positions - window.start if window.start > 0 else np.full(len(positions), np.inf)
            right = window.end - 1 - positions if window.end < n_tokens else np.full(len(positions), np.inf)
            distance = np.minimum(left, right)
            better = distance > best[positions]
            merged[positions[better]] = window_logits[prefix : prefix + len(positions)][better]
            best[positions[better]] = distance[better]
        return merged
