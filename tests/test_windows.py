"""Long texts: overlapping windows, merged at the token level, decoded once.

The stand-in model is right about a token only away from a cut edge: within ``margin`` tokens of a window edge
that cuts the text it answers noise, as a real model does with too little context. Merging must keep every token
from the window where it is farthest from a cut, so with a stride of ``2 * margin + 1`` or more every token is
right and windowed decoding equals decoding the whole text; any other choice (first window, last window, average)
keeps some noise.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from ner_gateway.core.batching import InputEncoder
from ner_gateway.core.compatibility import window_stride
from ner_gateway.core.decoding import LabelTable, decode, merge
from ner_gateway.core.domain import Aggregation
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.core.tokenizing import TextTokenizer
from ner_gateway.core.windowing import Window, plan_windows

from conftest import BERT_INPUTS, TINY_LABELS

TABLE = LabelTable.from_labels(TINY_LABELS)
WORDS = ("Angela Merkel visited Paris and Berlin with Barack Obama before the summit in New York City on Tuesday "
         "antidisestablishmentarianism 東京 😀 ").split()


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> TextTokenizer:
    return TextTokenizer(tiny_checkpoint / "tokenizer.json", 16)  # windows of 14 content tokens


@pytest.fixture(scope="module")
def encoder(tokenizer: TextTokenizer) -> InputEncoder:
    return InputEncoder(tokenizer.special, BERT_INPUTS)


def long_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words))


TOKEN_LOGITS = np.random.default_rng(0).normal(size=(40_000, len(TINY_LABELS))).astype(np.float32)
NOISE_LOGITS = np.random.default_rng(1).normal(size=(40_000, len(TINY_LABELS))).astype(np.float32)


def token_logits(ids: np.ndarray, pattern: str, table: np.ndarray = TOKEN_LOGITS) -> np.ndarray:
    logits = table[ids.astype(np.int64)].copy()
    if pattern == "one-entity":  # B-PER on the first token, I-PER everywhere else: one entity spans it all
        logits[:, 2] += 20.0
    return logits


def edge_sensitive_model(ids: np.ndarray, window: Window, n_tokens: int, margin: int, pattern: str) -> np.ndarray:
    """Logits of one window's row (special tokens included): noise for a content token within ``margin`` tokens of
    a cut edge, the token's own logits elsewhere."""
    logits = token_logits(ids, pattern)
    positions = np.arange(window.start, window.end)
    left = positions - window.start if window.start > 0 else np.full(len(positions), np.inf)
    right = window.end - 1 - positions if window.end < n_tokens else np.full(len(positions), np.inf)
    near_cut = np.minimum(left, right) < margin
    content = logits[1 : 1 + len(positions)]  # after [CLS]
    content[near_cut] = token_logits(ids[1 : 1 + len(positions)][near_cut], pattern, NOISE_LOGITS)
    return logits


def run_windowed(tokenizer: TextTokenizer, encoder: InputEncoder, text: str, stride: int, margin: int = 0,
                 pattern: str = "random"):  # type: ignore[no-untyped-def]
    (tokens,) = tokenizer.tokenize([text])
    windows = plan_windows([tokens], tokenizer.window_capacity, stride)
    arrays = encoder.windows([tokens], windows)
    logits = [edge_sensitive_model(row[mask.astype(bool)], window, len(tokens), margin, pattern)
              for row, mask, window in zip(arrays["input_ids"], arrays["attention_mask"], windows, strict=True)]
    merged = merge(len(tokens), windows, logits, tokenizer.special.prefix)
    direct = token_logits(np.asarray(tokens.encoding.ids), pattern)
    return tokens, windows, merged, direct


def margin_for(stride: int) -> int:
    """The widest noisy edge that a stride still covers: every token has a window where it is this far from a cut."""
    return math.ceil((stride - 1) / 2) if stride > 0 else 0


@pytest.mark.parametrize("stride", [0, 1, 5, 13])
def test_windows_cover_every_token_with_the_configured_overlap(tokenizer: TextTokenizer, encoder: InputEncoder,
                                                              stride: int) -> None:
    (tokens,) = tokenizer.tokenize([long_text(60)])
    windows = plan_windows([tokens], tokenizer.window_capacity, stride)
    assert windows[0].start == 0 and windows[-1].end == len(tokens) and len(windows) > 3
    for before, after in itertools.pairwise(windows):
        assert after.end - after.start <= tokenizer.window_capacity
        assert before.end - after.start == stride  # consecutive windows share exactly `stride` tokens
    arrays = encoder.windows([tokens], windows)
    cls_id, sep_id = tokenizer._tokenizer.token_to_id("[CLS]"), tokenizer._tokenizer.token_to_id("[SEP]")
    for row, window in enumerate(windows):
        length = window.end - window.start + 2
        assert arrays["input_ids"][row, 0] == cls_id and arrays["input_ids"][row, length - 1] == sep_id
        assert arrays["attention_mask"][row].sum() == length <= tokenizer.max_length
        assert list(arrays["input_ids"][row, 1 : length - 1]) == tokens.encoding.ids[window.start : window.end]


@pytest.mark.parametrize("stride", [0, 3, 6, 9, 13])
def test_windowed_decoding_equals_decoding_the_whole_text(tokenizer: TextTokenizer, encoder: InputEncoder,
                                                        stride: int) -> None:
    margin = margin_for(stride)
    for seed in range(4):
        text = long_text(40 + seed * 7, seed)
        tokens, windows, merged, direct = run_windowed(tokenizer, encoder, text, stride, margin)
        assert len(windows) > 2
        np.testing.assert_array_equal(merged, direct)
        for aggregation in Aggregation:
            assert decode(text, merged, tokens.view, TABLE, aggregation) == decode(text, direct, tokens.view, TABLE,
                                                                                 aggregation)


@pytest.mark.parametrize("stride", [3, 9])
def test_a_noisy_edge_wider_than_the_stride_covers_shows_in_the_merge(tokenizer: TextTokenizer,
                                                                      encoder: InputEncoder, stride: int) -> None:
    """The stand-in model's noise is real: one token more of it than the stride covers reaches the merged logits
    (so the equality above is the merge rule at work, not a model that windowing cannot disturb)."""
    text = long_text(60)
    _, windows, merged, direct = run_windowed(tokenizer, encoder, text, stride, margin_for(stride) + 1)
    differs = ~np.all(merged == direct, axis=1)
    assert 0 < differs.sum() <= 2 * (len(windows) - 1)


@pytest.mark.parametrize("stride", [3, 13])
def test_an_entity_across_every_window_boundary_is_kept_whole(tokenizer: TextTokenizer, encoder: InputEncoder,
                                                              stride: int) -> None:
    text = long_text(50, seed=3)
    tokens, windows, merged, _ = run_windowed(tokenizer, encoder, text, stride, margin_for(stride), "one-entity")
    assert len(windows) > 4
    (entity,) = decode(text, merged, tokens.view, TABLE, Aggregation.SIMPLE)  # neither lost nor duplicated
    assert (entity.label, entity.start, entity.end) == ("PER", 0, len(text.rstrip()))


def test_each_token_takes_the_window_where_it_is_farthest_from_a_cut(tokenizer: TextTokenizer) -> None:
    n = 30
    windows = [Window(0, 0, 14), Window(0, 8, 22), Window(0, 16, 30)]  # stride 6
    # Window k's logits are all k (specials included): the merged value names the window a token came from.
    logits = [np.full((w.end - w.start + 2, 1), float(k), np.float32) for k, w in enumerate(windows)]
    chosen = merge(n, windows, logits, tokenizer.special.prefix)[:, 0].astype(int).tolist()
    # Overlap 8..13: distance to window 0's cut at 14 vs window 1's cut at 8 -> 8..10 from 0, 11..13 from 1.
    assert chosen == [0] * 11 + [1] * 8 + [2] * 11


def test_stride_is_validated_against_the_window(tokenizer: TextTokenizer) -> None:
    assert window_stride(tokenizer, None, "m") == 14 // 4
    assert window_stride(tokenizer, 13, "m") == 13
    with pytest.raises(ConfigurationError, match=r"window stride 14 is invalid for model 'm': need 0 <= stride < 14"):
        window_stride(tokenizer, 14, "m")


def test_empty_text_is_one_window_without_entities(tokenizer: TextTokenizer, encoder: InputEncoder) -> None:
    tokens, windows, merged, _ = run_windowed(tokenizer, encoder, "", 2)
    assert windows == [Window(0, 0, 0)] and merged.shape == (0, len(TINY_LABELS))
    assert decode("", merged, tokens.view, TABLE, Aggregation.SIMPLE) == []
