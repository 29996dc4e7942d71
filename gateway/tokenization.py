"""Fast (Rust) tokenization into the padded int64 arrays the model takes, keeping char offsets."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Encoding, Tokenizer

from ner_gateway.errors import InvalidRequest

# Triton input name -> the Encoding attribute that fills it.
_INPUT_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


@dataclass(frozen=True)
class EncodedBatch:
    encodings: list[Encoding]

    @property
    def lengths(self) -> list[int]:
        return [len(e.ids) for e in self.encodings]

    def arrays(self, input_names: list[str], rows: slice = slice(None)) -> dict[str, np.ndarray]:
        """Right-padded [rows, longest] int64 arrays (padding has attention_mask 0)."""
        chosen = self.encodings[rows]
        longest = max(len(e.ids) for e in chosen)
        out = {}
        for name in input_names:
            array = np.zeros((len(chosen), longest), dtype=np.int64)
            for row, encoding in enumerate(chosen):
                values = getattr(encoding, _INPUT_FIELDS[name])
                array[row, : len(values)] = values
            out[name] = array
        return out

    def offsets(self, row: int) -> np.ndarray:
        return np.asarray(self.encodings[row].offsets, dtype=np.int64).reshape(-1, 2)

    def special_mask(self, row: int) -> np.ndarray:
        return np.asarray(self.encodings[row].special_tokens_mask, dtype=bool)


class TextTokenizer:
    def __init__(self, path: Path, max_length: int, input_names: list[str]) -> None:
        unknown = set(input_names) - set(_INPUT_FIELDS)
        if unknown:
            raise ValueError(f"model inputs {sorted(unknown)} cannot be produced by a tokenizer")
        self._tokenizer = Tokenizer.from_file(str(path))
        # Never truncate or pad inside the tokenizer: over-long texts are reported, padding is ours.
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self.max_length = max_length
        self.input_names = input_names

    def encode(self, texts: list[str]) -> EncodedBatch:
        batch = EncodedBatch(self._tokenizer.encode_batch(texts, add_special_tokens=True))
        for index, length in enumerate(batch.lengths):
            if length > self.max_length:
                raise InvalidRequest(
                    f"texts[{index}] is {length} tokens long; this model accepts at most {self.max_length} "
                    "tokens per text (split the text)"
                )
        return batch
