"""Parity with transformers' TokenClassificationPipeline: same model, same texts, every aggregation.

Our side is the gateway's own path (TextTokenizer -> windows -> model inputs -> merge -> decode), with
the PyTorch model standing in for Triton; HF's side is the real pipeline. Entities (label, start, end)
must be identical and scores within 1e-4, for a WordPiece tokenizer (word-aware, "##" subwords) and a
SentencePiece/Unigram one (XLM-R: HF's space heuristic for words), and that one with its CJK ideographs
isolated (what ``ner-builder train`` saves for Chinese), on curated and random texts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from ner_gateway.core.decoding import LabelTable
from ner_gateway.core.domain import Aggregation
from ner_gateway.core.tokenizing import TextTokenizer

from conftest import TINY_LABELS, TINY_MAX_LENGTH, tiny_token_classifier, torch_entities

INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
STRATEGIES = [Aggregation.NONE, Aggregation.SIMPLE, Aggregation.FIRST, Aggregation.AVERAGE, Aggregation.MAX]

CURATED = [
    "Barack Obama was born in Honolulu, Hawaii.",
    "Apple is looking at buying U.K. startup for $1 billion.",
    "Angela Merkel met Emmanuel Macron at the Élysée Palace in Paris on Tuesday.",
    "I'm watching Game of Thrones on HBO tonight with @sarah #excited",
    "Visit https://example.com/path?q=1&x=y or mail info@example.org now!",
    "The 2024-05-17 release (v3.2.1) costs $19.99, i.e. 20% off.",
    "Tokyo 東京 and Zürich are cities; 北京欢迎你！",
    "Emoji test 🙂👍🏽 with flags 🇫🇷 and 👨‍👩‍👧 families.",
    "Tabs\tand\nnewlines\r\nbetween   words   with    spaces.",
    "   leading and trailing spaces   ",
    "naïve café résumé coöperate Ångström",
    "Combining: e\u0301cole, n\u0303, a\u0308bc",
    "ALL CAPS NEW YORK TIMES REPORTS",
    "hyphen-ated well-known state-of-the-art Jean-Luc Picard",
    "#hashtag #AnotherOne @mention @user_name RT",
    "3.14159 1,000,000 42 0x1F 1e-9",
    "Mr. Smith went to Washington D.C. in Jan. 2020.",
    "Don't won't can't shouldn't y'all",
    "Москва и Санкт-Петербург — города России.",
    "Αθήνα είναι η πρωτεύουσα της Ελλάδας.",
    "مرحبا بالعالم من دبي",
    "हिन्दी में नई दिल्ली",
    "한국어 서울 부산",
    "我在北京大学读书，他去了上海。",
    "Quotes “smart” ‘single’ «guillemets» and — dashes – too…",
    "a",
    ".",
    "",
    "unbelievably antidisestablishmentarianism supercalifragilistic",
    "Zero\u200bwidth\u200bspace and soft\u00adhyphen",
    "text with [SEP] and [UNK] and <s> inside",
    "Paris Paris Paris London London Berlin",
]

PIECES = st.sampled_from(
    list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    + list("     \t\n.,;:!?'\"()-#@/&$%")
    + list("éüñçåøÉ北京大学上海東京서울Москваαβγ")
    + ["😀", "👍🏽", "🇫🇷", "e\u0301", "\u200b", "…"]
)


class Reference:
    """One model seen twice: through HF's pipeline and through the gateway's path."""

    def __init__(self, model, hf_tokenizer, tokenizer_file: Path) -> None:  # type: ignore[no-untyped-def]
        from transformers import pipeline

        self.model = model
        self.ours = TextTokenizer(tokenizer_file, TINY_MAX_LENGTH)
        self.hf_tokenizer = hf_tokenizer
        self.table = LabelTable.from_labels(TINY_LABELS)
        self.pipelines = {s: pipeline("token-classification", model=model, tokenizer=hf_tokenizer,
                                      aggregation_strategy=s.value, device="cpu") for s in STRATEGIES}
        self.compared = dict.fromkeys(STRATEGIES, 0)

    def fits(self, text: str) -> bool:
        return len(self.hf_tokenizer(text)["input_ids"]) <= TINY_MAX_LENGTH

    def check(self, text: str, aggregation: Aggregation) -> None:
        expected = self.pipelines[aggregation](text) if text else []
        got = torch_entities(self.ours, self.model, text, self.table, aggregation)
        key = "entity" if aggregation is Aggregation.NONE else "entity_group"
        assert [(e.label, e.start, e.end) for e in got] == [(h[key], h["start"], h["end"]) for h in expected], (
            text, aggregation)
        for entity, reference in zip(got, expected, strict=True):
            assert entity.score == pytest.approx(float(reference["score"]), abs=1e-4)
            assert entity.text == text[entity.start : entity.end]
        self.compared[aggregation] += len(got)


@pytest.fixture(scope="module")
def wordpiece(tiny_checkpoint: Path) -> Reference:
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    model = AutoModelForTokenClassification.from_pretrained(tiny_checkpoint).eval()
    return Reference(model, AutoTokenizer.from_pretrained(tiny_checkpoint), tiny_checkpoint / "tokenizer.json")


@pytest.fixture(scope="module")
def unigram() -> Reference:
    """A tiny random BERT over the real XLM-R SentencePiece vocabulary (multilingual-e5's tokenizer)."""
    from transformers import PreTrainedTokenizerFast

    from ner_builder.e5_import import tokenizer_file

    path = tokenizer_file()
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
                                        cls_token="<s>", sep_token="</s>", model_max_length=TINY_MAX_LENGTH)
    model = tiny_token_classifier(tokenizer, TINY_LABELS, TINY_MAX_LENGTH, seed=1, hidden_size=16, layers=1)
    return Reference(model, tokenizer, path)


@pytest.fixture(scope="module")
def unigram_cjk(unigram: Reference, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The same model and XLM-R vocabulary, CJK ideographs isolated, saved and loaded back as a checkpoint's is."""
    from transformers import AutoTokenizer

    from ner_builder.isolate_cjk import isolate_cjk

    folder = tmp_path_factory.mktemp("xlmr-cjk-isolated")
    isolate_cjk(unigram.hf_tokenizer).save_pretrained(folder)
    return Reference(unigram.model, AutoTokenizer.from_pretrained(folder), folder / "tokenizer.json")


FAMILIES = ["wordpiece", "unigram", "unigram_cjk"]


@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")
@pytest.mark.parametrize("aggregation", STRATEGIES, ids=lambda a: a.name)
@pytest.mark.parametrize("family", FAMILIES)
def test_curated_texts(request: pytest.FixtureRequest, family: str, aggregation: Aggregation) -> None:
    reference: Reference = request.getfixturevalue(family)
    for text in CURATED:
        assert reference.fits(text), text
        reference.check(text, aggregation)
    assert reference.compared[aggregation] > 20  # the random head predicts entities: the comparison has teeth


@pytest.mark.filterwarnings("ignore:Tokenizer does not support real words")
@pytest.mark.parametrize("family", FAMILIES)
def test_random_texts(request: pytest.FixtureRequest, family: str) -> None:
    reference: Reference = request.getfixturevalue(family)

    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(PIECES, min_size=1, max_size=60).map("".join))
    def check(text: str) -> None:
        assume(reference.fits(text))
        for aggregation in STRATEGIES:
            reference.check(text, aggregation)

    check()


def test_word_boundaries_differ_between_tokenizer_families(wordpiece: Reference, unigram: Reference) -> None:
    # The two paths above really are different: WordPiece marks "##" pieces, XLM-R uses HF's space rule.
    (wp,) = wordpiece.ours.tokenize(["unbelievably good"])
    (sp,) = unigram.ours.tokenize(["unbelievably good"])
    assert wp.view.is_subword.any() and sp.view.is_subword.any()
    assert np.array_equal(wp.view.is_subword, [t.startswith("##") for t in wp.encoding.tokens])


def test_the_isolated_family_differs_from_xlmr_only_on_ideographs(unigram: Reference, unigram_cjk: Reference) -> None:
    from ner_gateway.artifact.cjk import is_cjk

    for text in CURATED:
        (merged,), (isolated,) = unigram.ours.tokenize([text]), unigram_cjk.ours.tokenize([text])
        if any(map(is_cjk, text)):
            assert merged.encoding.ids != isolated.encoding.ids, text
        else:
            assert merged.encoding.ids == isolated.encoding.ids, text
    (isolated,) = unigram_cjk.ours.tokenize(["我在北京大学读书"])
    assert isolated.encoding.tokens == ["▁我", "在", "北", "京", "大", "学", "读", "书"]
