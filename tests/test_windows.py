"""Long texts: overlapping windows, merged at the token level, decoded once."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from ner_gateway.core.decoding import LabelTable, decode
from ner_gateway.core.domain import Aggregation
from ner_gateway.core.models import window_stride
from ner_gateway.core.tokenization import TextTokenizer, Window
from ner_gateway.errors import ConfigurationError

from conftest import TINY_LABELS

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
TABLE = LabelTable.from_labels(TINY_LABELS)
WORDS = ("Angela Merkel visited Paris and Berlin with Barack Obama before the summit in New York City on Tuesday "
         "antidisestablishmentarianism 東京 😀 ").split()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> TextTokenizer:
    return TextTokenizer(tiny_checkpoint / "tokenizer.json", 16, INPUTS)  # windows of 14 content tokens


def long_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))


TOKEN_LOGITS = np.random.default_rng(0).normal(size=(40_000, len(TINY_LABELS))).astype(np.float32)


def context_free_logits(ids: np.ndarray, pattern: str) -> np.ndarray:
    """A 'model' whose logits depend on the token id alone, so windowing must not change any entity."""
    logits = TOKEN_LOGITS[ids.astype(np.int64)].copy()
    if pattern == "one-entity":  # B-PER on the first token, I-PER everywhere else: one entity spans it all
        logits[:, 2] += 20.0
    return logits


def run_windowed(tokenizer: TextTokenizer, text: str, stride: int, pattern: str = "random"):  # type: ignore[no-untyped-def]
    (tokens,) = tokenizer.tokenize([text])
    windows = tokenizer.plan_windows([tokens], stride)
    arrays = tokenizer.arrays([tokens], windows)
    logits = [context_free_logits(row[mask.astype(bool)], pattern)
              for row, mask in zip(arrays["input_ids"], arrays["attention_mask"], strict=True)]
    merged = tokenizer.merge(len(tokens), windows, logits)
    direct = context_free_logits(np.asarray(tokens.encoding.ids), pattern)
    return tokens, windows, merged, direct


@pytest.mark.parametrize("stride", [0, 1, 5, 13])
def test_windows_cover_every_token_with_the_configured_overlap(tokenizer: TextTokenizer, stride: int) -> None:
    (tokens,) = tokenizer.tokenize([long_text(60)])
    windows = tokenizer.plan_windows([tokens], stride)
    assert windows[0].start == 0 and windows[-1].end == len(tokens) and len(windows) > 3
    for before, after in itertools.pairwise(windows):
        assert after.end - after.start <= tokenizer.window_capacity
        assert before.end - after.start == stride  # consecutive windows share exactly `stride` tokens
    arrays = tokenizer.arrays([tokens], windows)
    cls_id, sep_id = tokenizer._tokenizer.token_to_id("[CLS]"), tokenizer._tokenizer.token_to_id("[SEP]")
    for row, window in enumerate(windows):
        length = window.end - window.start + 2
        assert arrays["input_ids"][row, 0] == cls_id and arrays["input_ids"][row, length - 1] == sep_id
        assert arrays["attention_mask"][row].sum() == length <= tokenizer.max_length
        assert list(arrays["input_ids"][row, 1 : length - 1]) == tokens.encoding.ids[window.start : window.end]


@pytest.mark.parametrize("stride", [0, 1, 4, 7, 13])
@pytest.mark.parametrize("aggregation", list(Aggregation), ids=lambda a: a.name)
def test_windowed_decoding_equals_decoding_the_whole_text(tokenizer: TextTokenizer, stride: int,
                                                        aggregation: Aggregation) -> None:
    for seed in range(5):
        text = long_text(40 + seed * 7, seed)
        tokens, windows, merged, direct = run_windowed(tokenizer, text, stride)
        assert len(windows) > 2
        np.testing.assert_array_equal(merged, direct)
        assert decode(text, merged, tokens.view, TABLE, aggregation) == decode(text, direct, tokens.view, TABLE,
                                                                             aggregation)


@pytest.mark.parametrize("stride", [0, 3, 13])
def test_an_entity_across_every_window_boundary_is_kept_whole(tokenizer: TextTokenizer, stride: int) -> None:
    text = long_text(50, seed=3)
    tokens, windows, merged, _ = run_windowed(tokenizer, text, stride, pattern="one-entity")
    assert len(windows) > 4
    (entity,) = decode(text, merged, tokens.view, TABLE, Aggregation.SIMPLE)  # neither lost nor duplicated
    assert (entity.label, entity.start, entity.end) == ("PER", 0, len(text.rstrip()))


def test_each_token_takes_the_window_where_it_is_farthest_from_a_cut(tokenizer: TextTokenizer) -> None:
    n = 30
    windows = [Window(0, 0, 14), Window(0, 8, 22), Window(0, 16, 30)]  # stride 6
    # Window k's logits are all k (specials included): the merged value names the window a token came from.
    logits = [np.full((w.end - w.start + 2, 1), float(k), np.float32) for k, w in enumerate(windows)]
    chosen = tokenizer.merge(n, windows, logits)[:, 0].astype(int).tolist()
    # Overlap 8..13: distance to window 0's cut at 14 vs window 1's cut at 8 -> 8..10 from 0, 11..13 from 1.
    assert chosen == [0] * 11 + [1] * 8 + [2] * 11


def test_stride_is_validated_against_the_window(tokenizer: TextTokenizer) -> None:
    assert window_stride(tokenizer, None, "m") == 14 // 4
    assert window_stride(tokenizer, 13, "m") == 13
    with pytest.raises(ConfigurationError, match=r"window stride 14 is invalid for model 'm': need 0 <= stride < 14"):
        window_stride(tokenizer, 14, "m")


def test_empty_text_is_one_window_without_entities(tokenizer: TextTokenizer) -> None:
    tokens, windows, merged, _ = run_windowed(tokenizer, "", 2)
    assert windows == [Window(0, 0, 0)] and merged.shape == (0, len(TINY_LABELS))
    assert decode("", merged, tokens.view, TABLE, Aggregation.SIMPLE) == []
