"""Sentences <-> model rows: label alignment for training, and predicted rows back to word/character tags.

Word-level datasets (WNUT-16) are tokenized word by word and labelled on each word's first sub-token.
Character-level datasets (MSRA) are tokenized as the gateway will see them, the joined text, and every
token is labelled from the entity spans it overlaps through its offsets (``ner_builder.spans``): a piece
like `在北京` may start before an entity. Evaluation of those is at the character level: the predicted
token tags are decoded into token spans, mapped to characters (first token's start to last token's end,
exactly the span the gateway would return) and scored against the gold character spans by seqeval.

This is the part of training no library does; padding, batching and the loop are transformers'.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ner_builder.datasets import NerDataset
from ner_builder.evaluate import first_subtokens
from ner_builder.spans import as_bio, spans_to_bio, tags_to_spans, token_spans_to_chars, token_tags
from ner_gateway.artifact.schemes import TaggingScheme

LOGGER = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label id that torch's cross-entropy (and DataCollatorForTokenClassification) skips


@dataclass(frozen=True)
class Encoded:
    """One sentence as the model sees it, with what is needed to map predictions back."""

    input_ids: list[int]
    token_type_ids: list[int] | None  # None for models without segment ids (DistilBERT, ...)
    labels: list[int]  # aligned to input_ids; IGNORE_INDEX off the first sub-token of a word / on specials
    word_ids: list[int | None]
    offsets: list[tuple[int, int]] | None = None  # character offsets (character-level datasets only)

    def features(self) -> dict[str, list[int]]:
        """What the data collator pads: the model inputs and the labels."""
        row = {"input_ids": self.input_ids, "attention_mask": [1] * len(self.input_ids), "labels": self.labels}
        if self.token_type_ids is not None:
            row["token_type_ids"] = self.token_type_ids
        return row


def _segment_ids(tokenizer: Any, enc: Any) -> list[int] | None:
    if "token_type_ids" not in tokenizer.model_input_names:
        return None
    return list(enc.get("token_type_ids") or [0] * len(enc["input_ids"]))


def encode_words(
    tokenizer: Any, words: list[str], tags: list[str] | None, label2id: dict[str, int], max_length: int
) -> Encoded:
    enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
    word_ids = enc.word_ids()
    labels = [IGNORE_INDEX] * len(word_ids)
    if tags is not None:
        for position, word_id in first_subtokens(word_ids):
            labels[position] = label2id[tags[word_id]]
    return Encoded(list(enc["input_ids"]), _segment_ids(tokenizer, enc), labels, word_ids)


def encode_chars(
    tokenizer: Any,
    chars: list[str],
    tags: list[str] | None,
    label2id: dict[str, int],
    max_length: int,
    scheme: TaggingScheme,
) -> Encoded:
    """Tokenize the joined text; label each token from the gold character spans it overlaps."""
    enc = tokenizer("".join(chars), truncation=True, max_length=max_length, return_offsets_mapping=True)
    offsets = [(int(start), int(end)) for start, end in enc["offset_mapping"]]
    if tags is None:
        labels = [IGNORE_INDEX] * len(offsets)
    else:
        per_token = token_tags(offsets, tags_to_spans(tags, scheme), scheme)
        labels = [IGNORE_INDEX if tag is None else label2id[tag] for tag in per_token]
    return Encoded(list(enc["input_ids"]), _segment_ids(tokenizer, enc), labels, [None] * len(offsets), offsets)


def encode_dataset(
    tokenizer: Any, dataset: NerDataset, label2id: dict[str, int], max_length: int, with_labels: bool = True
) -> list[Encoded]:
    rows = zip(dataset.sentences, dataset.tags if with_labels else [None] * len(dataset), strict=True)
    if dataset.char_level:
        return [encode_chars(tokenizer, chars, tags, label2id, max_length, dataset.scheme) for chars, tags in rows]
    return [encode_words(tokenizer, words, tags, label2id, max_length) for words, tags in rows]


def word_tags(item: Encoded, row: Sequence[int], n_words: int, id2label: dict[int, str]) -> tuple[list[str], int]:
    """Word-level tags from each word's first sub-token, and how many words had no sub-token."""
    tags = ["O"] * n_words
    firsts = list(first_subtokens(item.word_ids))
    for position, word_id in firsts:
        tags[word_id] = id2label[int(row[position])]
    return tags, n_words - len(firsts)


def char_tags(
    item: Encoded, row: Sequence[int], n_chars: int, id2label: dict[int, str], scheme: TaggingScheme
) -> tuple[list[str], int]:
    """Character-level BIO tags of the entities the token tags decode to, and how many characters no token saw."""
    offsets = item.offsets or []
    real = [i for i, (start, end) in enumerate(offsets) if end > start]
    token_level = tags_to_spans([id2label[int(row[i])] for i in real], scheme)
    chars = token_spans_to_chars(token_level, [offsets[i] for i in real])
    seen_until = max((offsets[i][1] for i in real), default=0)
    return spans_to_bio(chars, n_chars), n_chars - seen_until


def gold_tags(dataset: NerDataset) -> list[list[str]]:
    """What seqeval scores against: the tags as they are for BIO, else BIO tags of the decoded spans."""
    return [as_bio(tags, dataset.scheme) for tags in dataset.tags]


def predicted_tags(
    encoded: Sequence[Encoded], dataset: NerDataset, rows: Sequence[Sequence[int]], id2label: dict[int, str]
) -> list[list[str]]:
    """Predicted tags per word (first sub-token) or per character (spans), in ``gold_tags``' form.

    ``rows`` are the argmax label ids of each encoded sentence, in dataset order (positions past a
    sentence's length are ignored, so rows padded to a batch width are fine). Unseen positions are "O".
    """
    predictions: list[list[str]] = []
    unseen = 0
    for item, row, sentence in zip(encoded, rows, dataset.sentences, strict=True):
        if dataset.char_level:
            tags, missed = char_tags(item, row, len(sentence), id2label, dataset.scheme)
        else:
            tags, missed = word_tags(item, row, len(sentence), id2label)
            tags = as_bio(tags, dataset.scheme)  # score the decoded spans, as gold_tags does
        unseen += missed
        predictions.append(tags)
    if unseen:
        # Over-long sentences (eval is cut at the model's position limit) or words with no sub-tokens.
        LOGGER.warning("%d eval words had no sub-token in the model input; predicted as O", unseen)
    return predictions
