"""Logits -> entities, with Hugging Face TokenClassificationPipeline semantics (numpy in, entities out).

Implemented: aggregation NONE and SIMPLE, as ``transformers`` does them: softmax scores, argmax
label per token, special tokens skipped, ``ignore_labels=["O"]``; SIMPLE merges consecutive tokens
whose tag (label without ``B-``/``I-``) is equal unless the token is a ``B-``, and scores a merged
entity by the mean of its tokens' scores. Entity text is the exact slice of the input.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ner_gateway.domain import Aggregation, Entity
from ner_gateway.errors import NotImplementedYet

IGNORE_LABELS = frozenset({"O"})


@dataclass(frozen=True)
class LabelTable:
    """Per-class facts precomputed once per model so decoding is array lookups."""

    labels: list[str]
    begins: np.ndarray  # bool[C]: label starts with "B-"
    tag_ids: np.ndarray  # int[C]: id of the label's tag (label without B-/I-; whole label otherwise)
    group_labels: list[str]  # entity label of a group started by class c (HF: split("-", 1)[-1])

    @classmethod
    def from_labels(cls, labels: list[str]) -> LabelTable:
        tags = [label[2:] if label.startswith(("B-", "I-")) else label for label in labels]
        tag_index = {tag: i for i, tag in enumerate(dict.fromkeys(tags))}
        return cls(
            labels=list(labels),
            begins=np.array([label.startswith("B-") for label in labels]),
            tag_ids=np.array([tag_index[tag] for tag in tags]),
            group_labels=[label.split("-", 1)[-1] for label in labels],
        )


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def decode(
    text: str,
    logits: np.ndarray,
    offsets: np.ndarray,
    special_mask: np.ndarray,
    table: LabelTable,
    aggregation: Aggregation,
) -> list[Entity]:
    """Entities of one text from its ``logits`` [tokens, classes] and token ``offsets`` [tokens, 2]."""
    keep = ~special_mask.astype(bool)
    probs = softmax(logits[keep].astype(np.float32))
    offsets = offsets[keep]
    if len(probs) == 0:
        return []
    label_ids = probs.argmax(axis=-1)
    scores = probs[np.arange(len(probs)), label_ids]

    if aggregation is Aggregation.NONE:
        return [
            Entity(table.labels[c], int(s), int(e), text[s:e], float(p))
            for c, (s, e), p in zip(label_ids, offsets, scores, strict=True)
            if table.labels[c] not in IGNORE_LABELS
        ]
    if aggregation is not Aggregation.SIMPLE:
        raise NotImplementedYet(f"aggregation {aggregation.name} is not implemented yet; use SIMPLE or NONE")

    tag_ids = table.tag_ids[label_ids]
    starts = table.begins[label_ids].copy()
    starts[1:] |= tag_ids[1:] != tag_ids[:-1]
    starts[0] = True
    first = np.flatnonzero(starts)
    last = np.append(first[1:], len(label_ids)) - 1
    mean_scores = np.add.reduceat(scores, first) / (last - first + 1)
    entities = []
    for f, lst, score in zip(first, last, mean_scores, strict=True):
        label = table.group_labels[label_ids[f]]
        if label in IGNORE_LABELS:
            continue
        start, end = int(offsets[f, 0]), int(offsets[lst, 1])
        entities.append(Entity(label, start, end, text[start:end], float(score)))
    return entities
