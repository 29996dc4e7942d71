"""Logits -> entities: a pure numpy module (arrays in, entities out) under the pipeline.

Aggregation follows Hugging Face's ``TokenClassificationPipeline`` exactly for BIO/IOB1 models
(softmax scores; special tokens skipped; word boundaries from the tokenizer as HF finds them;
FIRST/AVERAGE/MAX pick one label per word; ``ignore_labels=["O"]``; labels without a ``B-``/``I-``
prefix continue an entity of the same tag). It extends HF to BIOES, BILOU and BMES.

Repair rule for invalid transitions (argmax decoding): a token labelled inside/end (``I-``, ``M-``,
``E-``, ``L-``) that does not continue an open entity of its type opens a new entity, as ``B-``
would; ``E-``/``L-``/``S-``/``U-`` close the entity, so whatever follows them opens a new one. For
BIO this is HF's grouping (``I-PER`` after ``O`` or after ``B-LOC`` starts an entity). Instead of
repairing, ``constrained=True`` runs Viterbi over the scheme's allowed transitions, so the label
sequence is valid by construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ner_gateway.artifact.schemes import OUTSIDE, Role, TaggingScheme, split_tag
from ner_gateway.core.domain import Aggregation, Entity
from ner_gateway.core.tokenizing import TokenView
from ner_gateway.core.windowing import Window

IGNORE_LABELS = frozenset({OUTSIDE})
_OPENS = (Role.BEGIN, Role.INSIDE)  # roles after which the entity is still open


@dataclass(frozen=True)
class LabelTable:
    """Per-class facts, computed once per model, so decoding is array lookups."""

    labels: list[str]
    scheme: TaggingScheme
    roles: npt.NDArray[np.int8]  # [C]
    type_ids: npt.NDArray[np.int64]  # [C]: the entity type ("O" is a type of its own)
    entity_labels: list[str]  # label reported for an entity opened by class c (HF: split("-", 1)[-1])
    allowed: npt.NDArray[np.bool_]  # [C, C]: class j may follow class i
    allowed_start: npt.NDArray[np.bool_]  # [C]
    allowed_end: npt.NDArray[np.bool_]  # [C]
    opens_entity: npt.NDArray[np.bool_]  # [C]: B-/S- (and U-): always starts a new entity
    closes_entity: npt.NDArray[np.bool_]  # [C]: E-/S- (and L-/U-): whatever follows starts a new one
    ignored: npt.NDArray[np.bool_]  # [C]: an entity opened by class c is not reported (IGNORE_LABELS)

    @classmethod
    def from_labels(cls, labels: list[str], scheme: TaggingScheme = TaggingScheme.BIO) -> LabelTable:
        roles: list[Role] = []
        types: list[str] = []
        free: list[bool] = []
        for label in labels:
            prefix, kind = split_tag(label) or ("", label)
            role = scheme.roles.get(prefix)
            if label in IGNORE_LABELS:
                roles.append(Role.OUTSIDE)
                types.append(label)
            elif role is not None:
                roles.append(role)
                types.append(kind)
            else:  # HF: a label without a known prefix continues an entity of the same (whole) label
                roles.append(Role.INSIDE)
                types.append(label)
            free.append(label in IGNORE_LABELS or role is None)
        type_index = {t: i for i, t in enumerate(dict.fromkeys(types))}
        role_array = np.array(roles, dtype=np.int8)
        type_array = np.array([type_index[t] for t in types], dtype=np.int64)
        allowed, start, end = _transitions(role_array, type_array, scheme, np.array(free, dtype=bool))
        return cls(list(labels), scheme, role_array, type_array, [lb.split("-", 1)[-1] for lb in labels],
                   allowed, start, end, np.isin(role_array, (Role.BEGIN, Role.SINGLE)),
                   np.isin(role_array, (Role.END, Role.SINGLE)),
                   np.array([lb.split("-", 1)[-1] in IGNORE_LABELS for lb in labels], dtype=bool))


def _transitions(
    roles: npt.NDArray[np.int8], types: npt.NDArray[np.int64], scheme: TaggingScheme, free: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Allowed label transitions of a scheme; "free" labels ("O", unprefixed) may follow and precede anything
    except that an open (B-/I-) entity of BIOES-like schemes must still be continued."""
    n = len(roles)
    same_type = types[:, None] == types[None, :]
    prev, nxt = roles[:, None], roles[None, :]
    if scheme is TaggingScheme.BIO:
        # I-X only after B-X or I-X.
        allowed = (nxt != Role.INSIDE) | (np.isin(prev, _OPENS) & same_type)
        start = roles != Role.INSIDE
        end = np.ones(n, dtype=bool)
    elif scheme is TaggingScheme.IOB1:
        # B-X only directly after an X (it separates two adjacent entities of one type).
        allowed = (nxt != Role.BEGIN) | (np.isin(prev, _OPENS) & same_type)
        start = roles != Role.BEGIN
        end = np.ones(n, dtype=bool)
    else:
        # Open (B/I) must be followed by I/E of the same type; closed (O/E/S) by O, B or S.
        prev_open = np.isin(prev, _OPENS)
        continues = np.isin(nxt, (Role.INSIDE, Role.END)) & same_type
        opens = np.isin(nxt, (Role.OUTSIDE, Role.BEGIN, Role.SINGLE))
        allowed = np.where(prev_open, continues, opens)
        start = np.isin(roles, (Role.OUTSIDE, Role.BEGIN, Role.SINGLE))
        end = ~np.isin(roles, _OPENS)
    unprefixed = free & (roles != Role.OUTSIDE)
    allowed = allowed | unprefixed[None, :] | unprefixed[:, None]
    return allowed, start | unprefixed, end | unprefixed


def softmax(logits: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
    """HF's softmax, in float32, so scores match the pipeline's to the last bits."""
    values = logits.astype(np.float32, copy=False)
    shifted = np.exp(values - values.max(axis=-1, keepdims=True))
    probs: npt.NDArray[np.float32] = shifted / shifted.sum(axis=-1, keepdims=True)
    return probs


def _word_vectors(probs: npt.NDArray[np.float32], is_subword: npt.NDArray[np.bool_], aggregation: Aggregation
                  ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.intp]]:
    """One score vector per word (HF ``aggregate_word``); returns (vectors, index of each word's first token)."""
    starts = ~is_subword
    starts[0] = True
    first = np.flatnonzero(starts)
    if aggregation is Aggregation.FIRST:
        return probs[first], first
    if aggregation is Aggregation.AVERAGE:
        counts = np.diff(np.append(first, len(probs)))[:, None]
        return (np.add.reduceat(probs, first, axis=0) / counts).astype(np.float32), first
    # MAX: the vector of the word's token with the highest score (the first such token on ties).
    token_max = probs.max(axis=1)
    word_of_token = np.cumsum(starts) - 1
    is_max = token_max == np.maximum.reduceat(token_max, first)[word_of_token]
    candidates = np.flatnonzero(is_max)
    _, first_candidate = np.unique(word_of_token[candidates], return_index=True)
    return probs[candidates[first_candidate]], first


def viterbi(log_probs: npt.NDArray[np.float32], table: LabelTable) -> npt.NDArray[np.int64]:
    """Most probable label sequence that only uses the scheme's allowed transitions."""
    transition = np.where(table.allowed, 0.0, -np.inf)
    score = np.where(table.allowed_start, log_probs[0], -np.inf)
    back = np.zeros((len(log_probs), log_probs.shape[1]), dtype=np.int64)
    for t in range(1, len(log_probs)):
        candidates = score[:, None] + transition
        back[t] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + log_probs[t]
    path = np.empty(len(log_probs), dtype=np.int64)
    path[-1] = int(np.where(table.allowed_end, score, -np.inf).argmax())
    for t in range(len(log_probs) - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path


def decode(
    text: str,
    logits: npt.NDArray[np.floating[Any]],
    tokens: TokenView,
    table: LabelTable,
    aggregation: Aggregation,
    constrained: bool = False,
) -> list[Entity]:
    """Entities of one text from its ``logits`` [tokens, classes], sorted and non-overlapping."""
    if tokens.special.any():
        keep = ~tokens.special
        logits, offsets, is_subword = logits[keep], tokens.offsets[keep], tokens.is_subword[keep]
    else:  # the gateway tokenizes without special tokens: nothing to drop
        offsets, is_subword = tokens.offsets, tokens.is_subword
    probs = softmax(logits)
    if len(probs) == 0:
        return []
    if aggregation in (Aggregation.NONE, Aggregation.SIMPLE):
        vectors, starts, ends = probs, offsets[:, 0], offsets[:, 1]
    else:
        vectors, first = _word_vectors(probs, is_subword.copy(), aggregation)
        starts = offsets[first, 0]
        ends = offsets[np.append(first[1:], len(probs)) - 1, 1]
    if constrained:
        with np.errstate(divide="ignore"):
            label_ids = viterbi(np.log(vectors), table)
    else:
        label_ids = vectors.argmax(axis=1)
    scores = vectors[np.arange(len(vectors)), label_ids]

    if aggregation is Aggregation.NONE:
        return [
            Entity(table.labels[c], int(s), int(e), text[s:e], float(p))
            for c, s, e, p in zip(label_ids, starts, ends, scores, strict=True)
            if table.labels[c] not in IGNORE_LABELS
        ]
    return _group(text, label_ids, scores, starts, ends, table)


def _group(text: str, label_ids: npt.NDArray[np.intp], scores: npt.NDArray[np.float32], starts: npt.NDArray[np.int64],
           ends: npt.NDArray[np.int64], table: LabelTable) -> list[Entity]:
    """Merge consecutive units into entities (HF ``group_entities`` + the repair rule)."""
    return _group_texts([text], None, label_ids, scores, starts, ends, table)[0]


def _group_texts(texts: Sequence[str], owners: npt.NDArray[np.intp] | None, label_ids: npt.NDArray[np.intp],
                 scores: npt.NDArray[np.float32], starts: npt.NDArray[np.int64], ends: npt.NDArray[np.int64],
                 table: LabelTable) -> list[list[Entity]]:
    """``_group`` of several texts' units laid end to end (``owners``: each unit's text; None: one text): a text's
    first unit always opens an entity, so none spans two texts."""
    types = table.type_ids[label_ids]
    opens = np.ones(len(label_ids), dtype=bool)
    opens[1:] = (
        (types[1:] != types[:-1])
        | table.opens_entity[label_ids[1:]]
        | table.closes_entity[label_ids[:-1]]
    )
    if owners is not None:
        opens[1:] |= owners[1:] != owners[:-1]
    first = np.flatnonzero(opens)
    last = np.append(first[1:], len(label_ids)) - 1
    means = np.add.reduceat(scores.astype(np.float64), first) / (last - first + 1)
    kinds = label_ids[first]
    kept = ~table.ignored[kinds]
    labels = table.entity_labels
    opened = first[kept]
    owner_of = owners[opened].tolist() if owners is not None else [0] * len(opened)
    entities: list[list[Entity]] = [[] for _ in texts]
    for owner, kind, start, end, score in zip(owner_of, kinds[kept].tolist(), starts[opened].tolist(),
                                              ends[last[kept]].tolist(), means[kept].tolist(), strict=True):
        entities[owner].append(Entity(labels[kind], start, end, texts[owner][start:end], score))
    return entities


def decode_texts(texts: Sequence[str], logits: Sequence[npt.NDArray[np.floating[Any]]], tokens: Sequence[TokenView],
                 table: LabelTable, aggregation: Aggregation, constrained: bool = False) -> list[list[Entity]]:
    """``decode`` of each text. The common case (argmax, SIMPLE aggregation, no special tokens) runs every text's
    arrays through numpy at once: for tweets numpy's fixed cost per call outweighs its work, and each row's
    softmax, argmax and each entity's mean are the same computation whatever rows sit beside it."""
    if (len(texts) < 2 or constrained or aggregation is not Aggregation.SIMPLE
            or any(view.special.any() for view in tokens)):
        return [decode(text, text_logits, view, table, aggregation, constrained)
                for text, text_logits, view in zip(texts, logits, tokens, strict=True)]
    lengths = [len(text_logits) for text_logits in logits]
    probs = softmax(np.concatenate(logits))
    if len(probs) == 0:
        return [[] for _ in texts]
    offsets = np.concatenate([view.offsets for view in tokens])
    label_ids = probs.argmax(axis=1)
    scores = probs[np.arange(len(probs)), label_ids]
    owners = np.repeat(np.arange(len(texts)), lengths)
    return _group_texts(texts, owners, label_ids, scores, offsets[:, 0], offsets[:, 1], table)


def merge(n_tokens: int, windows: Sequence[Window], logits: Sequence[npt.NDArray[np.float32]], prefix: int
          ) -> npt.NDArray[np.float32]:
    """Content-token logits of one text: each token from the window where it is farthest from a cut edge.

    ``logits`` are the windows' outputs with special tokens (``prefix`` of them before the content), in window
    order. A window edge at the text's own start or end is not a cut (the token has its full context there).
    """
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
