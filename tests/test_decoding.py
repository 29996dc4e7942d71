"""Logits -> entities on crafted logits: HF grouping, word aggregation, tagging schemes, repair, Viterbi."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from ner_gateway.artifact.schemes import TaggingScheme
from ner_gateway.core.decoding import LabelTable, decode, decode_texts, viterbi
from ner_gateway.core.domain import Aggregation, Entity
from ner_gateway.core.tokenizing import TokenView

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "MISC"]
TABLE = LabelTable.from_labels(LABELS)

# One token per word; specials ([CLS]/[SEP]) are added around them by _case.
TEXT = "Ann Lee met Bob in New York City"
WORDS = [(0, 3), (4, 7), (8, 11), (12, 15), (16, 18), (19, 22), (23, 27), (28, 32)]


def _row(labels: list[str], label: str, p: float) -> np.ndarray:
    """Logits whose softmax gives ``label`` probability ``p`` and shares the rest evenly."""
    probs = np.full(len(labels), (1.0 - p) / (len(labels) - 1))
    probs[labels.index(label)] = p
    return np.log(probs).astype(np.float32)


def _case(tags: list[tuple[str, float]], labels: list[str] = LABELS, special: tuple[str, str] = ("O", "O"),
          words: list[tuple[int, int]] | None = None,
          subword: list[bool] | None = None) -> tuple[np.ndarray, TokenView]:
    words = WORDS[: len(tags)] if words is None else words
    assert len(words) == len(tags)
    logits = np.stack([_row(labels, special[0], 0.9)] + [_row(labels, t, p) for t, p in tags]
                      + [_row(labels, special[1], 0.9)])
    view = TokenView(
        offsets=np.array([(0, 0), *words, (0, 0)], dtype=np.int64).reshape(-1, 2),
        special=np.array([True] + [False] * len(tags) + [True]),
        is_subword=np.array([False, *(subword or [False] * len(tags)), False]),
    )
    return logits, view


def _decode(tags: list[tuple[str, float]], aggregation: Aggregation = Aggregation.SIMPLE,
            table: LabelTable = TABLE, constrained: bool = False, **kwargs) -> list[tuple]:
    logits, view = _case(tags, labels=table.labels, **kwargs)
    entities = decode(TEXT, logits, view, table, aggregation, constrained)
    for e in entities:
        assert isinstance(e, Entity)
        assert e.text == TEXT[e.start : e.end]
    return [(e.label, e.start, e.end, e.text, round(e.score, 5)) for e in entities]


# --- BIO, Hugging Face semantics -------------------------------------------------------------------------

def test_b_after_same_type_starts_new_entity() -> None:
    assert _decode([("B-PER", 0.9), ("B-PER", 0.8)]) == [("PER", 0, 3, "Ann", 0.9), ("PER", 4, 7, "Lee", 0.8)]


def test_i_continues_and_score_is_mean() -> None:
    assert _decode([("B-PER", 0.9), ("I-PER", 0.6), ("I-PER", 0.75), ("O", 0.9)]) == [
        ("PER", 0, 11, "Ann Lee met", 0.75)
    ]


def test_i_after_o_or_other_type_starts_entity() -> None:
    assert _decode([("O", 0.9), ("I-PER", 0.7), ("I-LOC", 0.5), ("B-ORG", 0.6), ("I-PER", 0.5)]) == [
        ("PER", 4, 7, "Lee", 0.7), ("LOC", 8, 11, "met", 0.5), ("ORG", 12, 15, "Bob", 0.6),
        ("PER", 16, 18, "in", 0.5),
    ]


def test_special_tokens_skipped() -> None:
    assert _decode([("I-PER", 0.8), ("I-PER", 0.6)], special=("B-PER", "I-PER")) == [("PER", 0, 7, "Ann Lee", 0.7)]
    assert _decode([("O", 0.9)], Aggregation.NONE, special=("B-LOC", "B-LOC")) == []


def test_label_without_prefix_continues_its_own_tag() -> None:
    assert _decode([("MISC", 0.9), ("MISC", 0.7), ("B-PER", 0.8), ("MISC", 0.5), ("O", 0.9), ("MISC", 0.6)]) == [
        ("MISC", 0, 7, "Ann Lee", 0.8), ("PER", 8, 11, "met", 0.8), ("MISC", 12, 15, "Bob", 0.5),
        ("MISC", 19, 22, "New", 0.6),
    ]


def test_none_keeps_full_tags_per_token() -> None:
    tags = [("B-PER", 0.9), ("I-PER", 0.6), ("O", 0.9), ("I-LOC", 0.7), ("MISC", 0.55)]
    assert _decode(tags, Aggregation.NONE) == [
        ("B-PER", 0, 3, "Ann", 0.9), ("I-PER", 4, 7, "Lee", 0.6), ("I-LOC", 12, 15, "Bob", 0.7),
        ("MISC", 16, 18, "in", 0.55),
    ]


@pytest.mark.parametrize("aggregation", list(Aggregation))
def test_empty_and_all_o(aggregation: Aggregation) -> None:
    assert _decode([], aggregation) == []
    assert _decode([("O", 0.9)] * 4, aggregation) == []


def test_scores_are_softmax_probabilities() -> None:
    logits = np.array([[0.0, 2.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], np.float32)
    view = TokenView(np.array([[0, 3]]), np.array([False]), np.array([False]))
    (entity,) = decode("Ann", logits, view, TABLE, Aggregation.SIMPLE)
    assert entity.score == pytest.approx(np.exp(2.0) / (np.exp(2.0) + np.exp(1.0) + 6), abs=1e-6)


# --- word aggregation: "New Yo ##rk" = words [New] [Yo ##rk] ----------------------------------------------

SUBWORD_WORDS = [(19, 22), (23, 25), (25, 27)]
SUBWORD_FLAGS = [False, False, True]


def _words(tags: list[tuple[str, float]], aggregation: Aggregation) -> list[tuple]:
    return _decode(tags, aggregation, words=SUBWORD_WORDS, subword=SUBWORD_FLAGS)


def test_first_takes_the_first_token_label() -> None:
    assert _words([("B-LOC", 0.9), ("I-LOC", 0.7), ("B-PER", 0.95)], Aggregation.FIRST) == [
        ("LOC", 19, 27, "New York", 0.8)
    ]


def test_max_takes_the_label_of_the_most_confident_token() -> None:
    assert _words([("B-LOC", 0.9), ("I-LOC", 0.7), ("B-PER", 0.95)], Aggregation.MAX) == [
        ("LOC", 19, 22, "New", 0.9), ("PER", 23, 27, "York", 0.95)
    ]


def test_average_takes_the_best_mean_score() -> None:
    # Word 2 = mean of its token vectors: I-LOC (.5 + .4) / 2 = .45; the entity's score is the mean over words.
    assert _words([("B-LOC", 0.9), ("I-LOC", 0.5), ("I-LOC", 0.4)], Aggregation.AVERAGE) == [
        ("LOC", 19, 27, "New York", 0.675)
    ]
    assert _words([("B-LOC", 0.9), ("B-PER", 0.9), ("O", 0.4)], Aggregation.AVERAGE)[1][:3] == ("PER", 23, 27)


def test_simple_ignores_word_boundaries() -> None:
    assert _words([("B-LOC", 0.9), ("I-LOC", 0.7), ("B-PER", 0.95)], Aggregation.SIMPLE) == [
        ("LOC", 19, 25, "New Yo", 0.8), ("PER", 25, 27, "rk", 0.95)
    ]


# --- other tagging schemes ---------------------------------------------------------------------------------

BIOES = LabelTable.from_labels(["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"],
                               TaggingScheme.BIOES)
BILOU = LabelTable.from_labels(["O", "B-PER", "I-PER", "L-PER", "U-PER"], TaggingScheme.BILOU)
BMES = LabelTable.from_labels(["O", "B-LOC", "M-LOC", "E-LOC", "S-LOC", "B-ORG", "M-ORG", "E-ORG", "S-ORG"],
                              TaggingScheme.BMES)
IOB1 = LabelTable.from_labels(["O", "I-PER", "B-PER", "I-LOC", "B-LOC"], TaggingScheme.IOB1)


def test_bioes_valid_sequence() -> None:
    tags = [("B-PER", 0.9), ("I-PER", 0.8), ("E-PER", 0.7), ("S-LOC", 0.9), ("S-LOC", 0.6), ("O", 0.9)]
    assert _decode(tags, table=BIOES) == [
        ("PER", 0, 11, "Ann Lee met", 0.8), ("LOC", 12, 15, "Bob", 0.9), ("LOC", 16, 18, "in", 0.6)
    ]


def test_bioes_repair_rule() -> None:
    # E- without B- opens (and closes) an entity; I- after E- opens a new one; B- B- are two entities.
    tags = [("E-PER", 0.9), ("I-PER", 0.8), ("E-PER", 0.6), ("B-LOC", 0.9), ("B-LOC", 0.7)]
    assert _decode(tags, table=BIOES) == [
        ("PER", 0, 3, "Ann", 0.9), ("PER", 4, 11, "Lee met", 0.7), ("LOC", 12, 15, "Bob", 0.9),
        ("LOC", 16, 18, "in", 0.7),
    ]


def test_bilou_uses_l_and_u() -> None:
    tags = [("B-PER", 0.9), ("L-PER", 0.7), ("U-PER", 0.8), ("O", 0.9), ("L-PER", 0.6)]
    assert _decode(tags, table=BILOU) == [
        ("PER", 0, 7, "Ann Lee", 0.8), ("PER", 8, 11, "met", 0.8), ("PER", 16, 18, "in", 0.6)
    ]


def test_bmes_like_msra() -> None:
    text = "我在北京大学读书"  # 我 在 北 京 大 学 读 书: 北京大学 = ORG, 北京 alone would be LOC
    chars = [(i, i + 1) for i in range(len(text))]
    tags = [("O", 0.9), ("O", 0.9), ("B-ORG", 0.9), ("M-ORG", 0.8), ("M-ORG", 0.7), ("E-ORG", 0.6), ("O", 0.9),
            ("S-LOC", 0.5)]
    logits, view = _case(tags, labels=BMES.labels, words=chars)
    entities = decode(text, logits, view, BMES, Aggregation.SIMPLE)
    assert [(e.label, e.start, e.end, e.text) for e in entities] == [("ORG", 2, 6, "北京大学"), ("LOC", 7, 8, "书")]


def test_iob1_b_only_separates_adjacent_entities() -> None:
    tags = [("I-PER", 0.9), ("I-PER", 0.8), ("B-PER", 0.7), ("O", 0.9), ("I-LOC", 0.9)]
    assert _decode(tags, table=IOB1) == [
        ("PER", 0, 7, "Ann Lee", 0.85), ("PER", 8, 11, "met", 0.7), ("LOC", 16, 18, "in", 0.9)
    ]


# --- constrained (Viterbi) decoding -----------------------------------------------------------------------

def _is_valid(path: list[str], table: LabelTable) -> bool:
    ids = [table.labels.index(label) for label in path]
    return bool(table.allowed_start[ids[0]] and table.allowed_end[ids[-1]]
                and all(table.allowed[a, b] for a, b in itertools.pairwise(ids)))


def test_viterbi_repairs_i_after_o_in_bio() -> None:
    # argmax: O I-PER I-PER (invalid start of an entity); Viterbi must choose B-PER I-PER or O O.
    tags = [("O", 0.9), ("I-PER", 0.6), ("I-PER", 0.9)]
    logits, _ = _case(tags)
    probs = np.exp(logits[1:-1]) / np.exp(logits[1:-1]).sum(1, keepdims=True)
    labels = [TABLE.labels[i] for i in viterbi(np.log(probs), TABLE)]
    assert labels == ["O", "B-PER", "I-PER"]  # p(O) * p(B-PER) * p(I-PER) beats every other valid path
    # The entity's score is the mean probability of the labels Viterbi chose: (1/14 * .8 + .9) / 2.
    assert _decode(tags, constrained=True) == [("PER", 4, 11, "Lee met", round((0.4 / 7 + 0.9) / 2, 5))]


def test_viterbi_bioes_never_leaves_an_entity_open() -> None:
    tags = [("B-PER", 0.9), ("I-PER", 0.9), ("O", 0.55), ("S-LOC", 0.9)]
    result = _decode(tags, table=BIOES, constrained=True)
    labels = {e[0] for e in result}
    assert labels == {"PER", "LOC"}
    assert result[0][:3] == ("PER", 0, 11)  # O at "met" forced to E-PER: B I E
    assert _decode(tags, table=BIOES) == [("PER", 0, 7, "Ann Lee", 0.9), ("LOC", 12, 15, "Bob", 0.9)]


@pytest.mark.parametrize("table", [TABLE, BIOES, BILOU, BMES, IOB1], ids=["BIO", "BIOES", "BILOU", "BMES", "IOB1"])
def test_viterbi_paths_are_always_valid(table: LabelTable) -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        log_probs = np.log(rng.dirichlet(np.ones(len(table.labels)) * 0.3, size=rng.integers(1, 12)))
        labels = [table.labels[i] for i in viterbi(log_probs, table)]
        assert _is_valid(labels, table), labels


def test_viterbi_keeps_a_valid_argmax_path() -> None:
    tags = [("B-PER", 0.9), ("I-PER", 0.8), ("O", 0.9), ("B-LOC", 0.7)]
    assert _decode(tags, constrained=True) == _decode(tags)


@pytest.mark.parametrize("scheme_labels", [
    (TaggingScheme.BIO, LABELS),
    (TaggingScheme.BIOES, ["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"]),
])
def test_texts_decoded_together_get_exactly_what_each_gets_alone(scheme_labels: tuple[TaggingScheme, list[str]]
                                                                  ) -> None:
    """decode_texts runs a request's texts through numpy at once: entities, offsets and scores (to the last bit)
    are those of decoding each text alone, for texts of any length (none included), and an entity at a text's end
    does not run on into the next text's first token."""
    scheme, labels = scheme_labels
    table = LabelTable.from_labels(labels, scheme)
    rng = np.random.default_rng(7)
    texts, logits, views = [], [], []
    for n in [5, 0, 1, 9, 3, 12, 0, 7] * 4:
        texts.append(" ".join(f"w{i}" for i in range(n)))
        logits.append(rng.normal(0, 3, size=(n, len(labels))).astype(np.float32))
        starts = np.array([3 * i for i in range(n)], dtype=np.int64)
        views.append(TokenView(offsets=np.stack([starts, starts + 2], axis=1).reshape(-1, 2),
                               special=np.zeros(n, dtype=bool), is_subword=rng.random(n) < 0.3))
    logits[0][-1], logits[2][0] = _row(labels, "B-PER", 0.9), _row(labels, "I-PER", 0.9)  # an entity each side
    alone = [decode(text, text_logits, view, table, Aggregation.SIMPLE)
             for text, text_logits, view in zip(texts, logits, views, strict=True)]
    together = decode_texts(texts, logits, views, table, Aggregation.SIMPLE)
    assert together == alone
    assert sum(map(len, alone)) > 50 and alone[1] == [] and alone[2][0].start == 0
