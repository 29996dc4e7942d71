"""Entity spans <-> tags, and token labels from character spans (for tokenizers that merge characters).

Character-level corpora (MSRA: one Chinese character per "word") are trained on the text exactly as the
gateway will see it: the characters are joined, tokenized once, and every token gets the tag of the entity
span it overlaps, through the tokenizer's character offsets. XLM-R's tokenizer merges characters
(`在北京` is one piece), so a token may start before an entity or end after it; the rules are:

- a token overlapping no entity is ``O``;
- a token overlapping entities takes the one it shares the most characters with (the first on a tie);
- it is ``single`` if it covers that entity's first and last character, ``begin`` if only the first,
  ``end`` if only the last, ``inside`` otherwise (BMES: S/B/E/M; BIO: B/B/I/I);
- a token whose span lies inside the next token's span adds no character of its own (XLM-R's lone ``▁``
  at the start of a text has the offsets of the first character): it is trained as ``O``.

Spans are encoded back into tags under any scheme by ``spans_to_tags`` (``spans_to_bio`` for BIO).
Decoding tags back to spans is lenient, as seqeval's default mode is: a continuation tag (I/M/E) that does
not continue an entity of its type starts a new one; ``O`` ends the current entity, and so do E/S in BMES.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ner_gateway.artifact.schemes import OUTSIDE, Role, TaggingScheme, split_tag


@dataclass(frozen=True)
class Span:
    """An entity over ``[start, end)`` in whatever unit the tags are in (characters or tokens)."""

    label: str
    start: int
    end: int


def tags_to_spans(tags: Sequence[str], scheme: TaggingScheme) -> list[Span]:
    """Entity spans of a tag sequence (lenient decoding, see the module docstring)."""
    spans: list[Span] = []
    current: tuple[str, int] | None = None  # (label, start) of the open entity

    def close(end: int) -> None:
        nonlocal current
        if current is not None:
            spans.append(Span(current[0], current[1], end))
            current = None

    for i, tag in enumerate(tags):
        parts = split_tag(tag)
        if parts is None:
            close(i)
            continue
        prefix, label = parts
        role = scheme.roles.get(prefix, Role.INSIDE)  # a prefix foreign to the scheme continues, like I-
        if role in (Role.BEGIN, Role.SINGLE) or current is None or current[0] != label:
            close(i)
            current = (label, i)
        if role in (Role.END, Role.SINGLE):
            close(i + 1)
    close(len(tags))
    return spans


def spans_to_tags(spans: Sequence[Span], length: int, scheme: TaggingScheme) -> list[str]:
    """Tags over ``length`` positions under `scheme`; a span overlapping an earlier one is dropped."""
    taken = [False] * length
    kept: list[Span] = []
    for span in spans:
        start, end = max(0, span.start), min(length, span.end)
        if start < end and not any(taken[start:end]):
            taken[start:end] = [True] * (end - start)
            kept.append(Span(span.label, start, end))
    ends = {(span.label, span.end) for span in kept}
    tags = [OUTSIDE] * length
    for span in kept:
        follows = (span.label, span.start) in ends
        for i in range(span.start, span.end):
            tags[i] = f"{scheme.prefix(i == span.start, i == span.end - 1, follows)}-{span.label}"
    return tags


def spans_to_bio(spans: Sequence[Span], length: int) -> list[str]:
    """BIO tags over ``length`` positions; a span overlapping an earlier one is dropped."""
    return spans_to_tags(spans, length, TaggingScheme.BIO)


def as_bio(tags: Sequence[str], scheme: TaggingScheme) -> list[str]:
    """What seqeval scores: BIO tags as they are, another scheme's as the BIO tags of the spans they decode to."""
    if scheme is TaggingScheme.BIO:
        return list(tags)
    return spans_to_bio(tags_to_spans(tags, scheme), len(tags))


def is_marker(offsets: Sequence[tuple[int, int]], index: int) -> bool:
    """True for a token that adds no character: its span lies inside the next real token's span."""
    start, end = offsets[index]
    for next_start, next_end in offsets[index + 1 :]:
        if next_end > next_start:
            return next_start <= start and end <= next_end
    return False


def token_tags(
    offsets: Sequence[tuple[int, int]], spans: Sequence[Span], scheme: TaggingScheme
) -> list[str | None]:
    """One tag per token from character-level entity spans; ``None`` for tokens without characters."""
    tags: list[str | None] = []
    previous: Span | None = None  # the entity the previous token was tagged with
    for index, (start, end) in enumerate(offsets):
        if end <= start:
            tags.append(None)  # special tokens: (0, 0)
            previous = None
            continue
        best: Span | None = None
        if not is_marker(offsets, index):
            best_overlap = 0
            for span in spans:
                overlap = min(end, span.end) - max(start, span.start)
                if overlap > best_overlap:
                    best, best_overlap = span, overlap
        if best is None:
            tags.append(OUTSIDE)
        else:
            starts = start <= best.start < end
            ends = start < best.end <= end
            follows = previous is not None and previous is not best and previous.label == best.label
            tags.append(f"{scheme.prefix(starts, ends, follows)}-{best.label}")
        previous = best
    return tags


def token_spans_to_chars(
    token_spans: Sequence[Span], offsets: Sequence[tuple[int, int]]
) -> list[Span]:
    """Token-index spans -> character spans, from the first token's start to the last token's end."""
    return [Span(s.label, offsets[s.start][0], offsets[s.end - 1][1]) for s in token_spans]
