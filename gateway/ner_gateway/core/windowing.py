"""Long texts -> overlapping windows the model can take, and each window's row: its content tokens, its length
with the special tokens and the width it is padded to alone.

A window holds at most ``capacity`` content tokens (the model's max length less its special tokens); consecutive
windows of a text share ``stride`` tokens, so that every token is also seen away from a cut edge (decoding keeps
each token from the window where it is farthest from one: ``core.decoding.merge``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ner_gateway.artifact.padding import padded_width
from ner_gateway.core.tokenizing import TextTokens


@dataclass(frozen=True, slots=True)
class Window:
    text: int  # index of the text in the request
    start: int  # content token range [start, end)
    end: int


@dataclass(frozen=True, slots=True)
class WindowRows:
    """The model rows of a request's windows, in window order."""

    contents: list[list[int]]  # content token ids (no special tokens)
    lengths: list[int]  # with the special tokens: the logits of a row that decoding reads
    widths: list[int]  # what each row is padded to alone (with sequence buckets, its bucket)


def plan_windows(tokens: Sequence[TextTokens], capacity: int, stride: int) -> list[Window]:
    """Overlapping windows of at most ``capacity`` content tokens, ``stride`` tokens shared; one per short text."""
    step = capacity - stride
    windows = []
    for index, text_tokens in enumerate(tokens):
        n = len(text_tokens)
        start = 0
        while True:
            end = min(start + capacity, n)
            windows.append(Window(index, start, end))
            if end >= n:
                break
            start += step
    return windows


def window_rows(tokens: Sequence[TextTokens], windows: Sequence[Window], special_tokens: int,
                buckets: tuple[int, ...] = ()) -> WindowRows:
    contents = [tokens[w.text].ids[w.start : w.end] for w in windows]
    lengths = [len(row) + special_tokens for row in contents]
    widths = [padded_width(n, buckets) for n in lengths] if buckets else lengths
    return WindowRows(contents, lengths, widths)


def texts_windows(windows: Sequence[Window]) -> list[tuple[int, int]]:
    """Each text's windows as a [first, last) range into ``windows`` (a text's windows are consecutive)."""
    ranges = []
    first = 0
    while first < len(windows):
        last = first + 1
        while last < len(windows) and windows[last].text == windows[first].text:
            last += 1
        ranges.append((first, last))
        first = last
    return ranges


def stride_for(capacity: int, configured: int | None) -> int | None:
    """The configured stride, or a quarter of the window; None when it would leave a window no new token."""
    stride = capacity // 4 if configured is None else configured
    return stride if 0 <= stride < capacity else None
