"""Give every CJK ideograph a piece of its own in a fast tokenizer that merges them (XLM-R's SentencePiece).

XLM-R cuts `我在北京工作` into `▁我 在北京 工作`, so the entity 北京 can only be served as 在北京. A ``Split``
step appended to the tokenizer's own pre-tokenizer isolates each ideograph, as BERT's basic tokenizer does
for Chinese, and the vocabulary's single-character pieces take over: `▁我 在 北 京 工 作`. A SentencePiece
word marker just before an ideograph stays with it (``▁我``, a piece the model saw in pretraining).
Everything else (Latin, digits, kana, hangul) is cut exactly as before.

The result is a plain ``tokenizer.json`` pipeline: ``train`` saves it with the checkpoint, so training, the
Hugging Face pipeline and the gateway all read the same file. It is saved as a generic fast tokenizer
(``TokenizersBackend``) because transformers' ``XLMRobertaTokenizer`` rebuilds its own pre-tokenizer on load
and would drop the split.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import Regex, Tokenizer, pre_tokenizers

from ner_gateway.artifact.cjk import CJK_RANGES, CjkPieces, cjk_pieces

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SENTENCEPIECE_MARKER = "\u2581"  # what Metaspace puts for a space / a word start


class CjkIsolationError(Exception):
    """The tokenizer's pipeline cannot be made to isolate ideographs (e.g. byte-level pre-tokenizers)."""


def ideograph_pattern() -> str:
    """One ideograph, with the word marker before it if there is one (Oniguruma syntax, as tokenizers reads)."""
    blocks = "".join(f"\\x{{{low:X}}}-\\x{{{high:X}}}" for low, high in CJK_RANGES)
    return f"{SENTENCEPIECE_MARKER}?[{blocks}]"


def isolate_cjk(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """``tokenizer`` itself if it already isolates ideographs, else a copy whose pre-tokenizer does."""
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    if cjk_pieces(backend) is CjkPieces.ISOLATED:
        return tokenizer
    split = pre_tokenizers.Split(Regex(ideograph_pattern()), "isolated")
    current = backend.pre_tokenizer
    backend.pre_tokenizer = split if current is None else pre_tokenizers.Sequence([current, split])
    if cjk_pieces(backend) is not CjkPieces.ISOLATED:
        raise CjkIsolationError(
            f"{type(tokenizer).__name__}'s pre-tokenizer hides the characters from a split (byte-level?); "
            "its CJK pieces cannot be isolated"
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=tokenizer.model_max_length,
        padding_side=tokenizer.padding_side,
        **tokenizer.special_tokens_map,
    )
