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

OUTSIDE = "O"


@dataclass(frozen=True)
class Scheme:
    """Which prefix a tag carries for each position of an entity."""

    name: str
    begin: str
    inside: str
    end: str
    single: str

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The distinct prefixes, in label order (BIO: B, I; BMES: B, M, E, S)."""
        return tuple(dict.fromkeys((self.begin, self.inside, self.end, self.single)))

    def prefix(self, starts: bool, ends: bool) -> str:
        if starts:
            return self.single if ends else self.begin
        return self.end if ends else self.inside

    @property
    def closing(self) -> frozenset[str]:
        """Prefixes that end an entity (none in BIO, where B and I also play the single and end roles)."""
        return frozenset({self.end, self.single} - {self.begin, self.inside})


SCHEMES: dict[str, Scheme] = {
    "BIO": Scheme("BIO", begin="B", inside="I", end="I", single="B"),
    "BMES": Scheme("BMES", begin="B", inside="M", end="E", single="S"),
    "BIOES": Scheme("BIOES", begin="B", inside="I", end="E", single="S"),
}


@dataclass(frozen=True)
class Span:
    """An entity over ``[start, end)`` in whatever unit the tags are in (characters or tokens)."""

    label: str
    start: int
    end: int


def tags_to_spans(tags: Sequence[str], scheme: Scheme) -> list[Span]:
    """Entity spans of a tag sequence (lenient decoding, see the module docstring)."""
    spans: list[Span] = []
    current: tuple[str, int] | None = None  # (label, start) of the open entity

    def close(end: int) -> None:
        nonlocal current
        if current is not None:
            spans.append(Span(current[0], current[1], end))
            current = None

    for i, tag in enumerate(tags):
        if tag == OUTSIDE or "-" not in tag:
            close(i)
            continue
        prefix, label = tag.split("-", 1)
        if prefix in (scheme.begin, scheme.single) or current is None or current[0] != label:
            close(i)
            current = (label, i)
        if prefix in scheme.closing:
            close(i + 1)
    close(len(tags))
    return spans


def spans_to_tags(spans: Sequence[Span], length: int, scheme: Scheme) -> list[str]:
    """Tags over ``length`` positions under `scheme`; a span overlapping an earlier one is dropped."""
    tags = [OUTSIDE] * length
    for span in spans:
        start, end = max(0, span.start), min(length, span.end)
        if start >= end or any(tag != OUTSIDE for tag in tags[start:end]):
            continue
        for i in range(start, end):
            tags[i] = f"{scheme.prefix(i == start, i == end - 1)}-{span.label}"
    return tags


def spans_to_bio(spans: Sequence[Span], length: int) -> list[str]:
    """BIO tags over ``length`` positions; a span overlapping an earlier one is dropped."""
    return spans_to_tags(spans, length, SCHEMES["BIO"])


def is_marker(offsets: Sequence[tuple[int, int]], index: int) -> bool:
    """True for a token that adds no character: its span lies inside the next real token's span."""
    start, end = offsets[index]
    for next_start, next_end in offsets[index + 1 :]:
        if next_end > next_start:
            return next_start <= start and end <= next_end
    return False


def token_tags(offsets: Sequence[tuple[int, int]], spans: Sequence[Span], scheme: Scheme) -> list[str | None]:
    """One tag per token from character-level entity spans; ``None`` for tokens without characters."""
    tags: list[str | None] = []
    for index, (start, end) in enumerate(offsets):
        if end <= start:
            tags.append(None)  # special tokens: (0, 0)
            continue
        if is_marker(offsets, index):
            tags.append(OUTSIDE)
            continue
        best: Span | None = None
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
            tags.append(f"{scheme.prefix(starts, ends)}-{best.label}")
    return tags


def token_spans_to_chars(
    token_spans: Sequence[Span], offsets: Sequence[tuple[int, int]]
) -> list[Span]:
    """Token-index spans -> character spans, from the first token's start to the last token's end."""
    return [Span(s.label, offsets[s.start][0], offsets[s.end - 1][1]) for s in token_spans]
