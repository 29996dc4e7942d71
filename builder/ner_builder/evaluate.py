"""Run a graph (PyTorch, or an ONNX file in ONNX Runtime) over word-split sentences and score it.

Scoring follows ``ner-builder train``: each word takes the tag of its first sub-token and seqeval
computes entity-level F1. Every artifact is compared with the PyTorch checkpoint on the same padded
batches: max |logit diff| and argmax agreement over the real (unpadded) tokens.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ner_gateway.artifact.padding import right_pad

if TYPE_CHECKING:
    from ner_builder.checkpoint import Checkpoint

LOGGER = logging.getLogger(__name__)

Feeds = dict[str, npt.NDArray[np.int64]]  # input name -> INT64 [batch, sequence]
Logits = npt.NDArray[np.float32]  # [batch, sequence, labels]
Runner = Callable[[Feeds], Logits]


@dataclass(frozen=True)
class Batch:
    feeds: Feeds  # INT64 [batch, sequence], padded
    word_ids: list[list[int | None]]
    indices: list[int]  # positions of these sentences in the evaluated set


@dataclass(frozen=True)
class EvalSet:
    """Sentences encoded once, in length-sorted batches, plus their gold tags when labelled."""

    name: str
    sentences: list[list[str]]
    gold: list[list[str]] | None
    batches: list[Batch]


@dataclass(frozen=True)
class Scores:
    sentences: int
    tokens: int
    max_abs_logit_diff: float
    argmax_agreement: float
    f1: float | None  # entity-level F1 vs the gold tags (None on unlabelled texts)
    f1_vs_reference: float  # entity-level F1 of this graph's tags against the PyTorch checkpoint's

    def f1_drop(self, reference_f1: float | None) -> float | None:
        """F1 points lost against the checkpoint's ``reference_f1`` (None when either is unknown)."""
        if self.f1 is None or reference_f1 is None:
            return None
        return (reference_f1 - self.f1) * 100


@dataclass(frozen=True)
class Reference:
    """The PyTorch checkpoint on an eval set: what every artifact is scored against."""

    data: EvalSet
    logits: list[Logits]
    f1: float | None  # against the gold tags; None on unlabelled sentences


def encode(
    tokenizer: Any, name: str, sentences: list[list[str]], gold: list[list[str]] | None, input_names: list[str],
    max_length: int, batch_size: int = 32,
) -> EvalSet:
    encodings = [tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length)
                 for words in sentences]
    order = sorted(range(len(sentences)), key=lambda i: len(encodings[i]["input_ids"]))
    batches = []
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        feeds = {}
        for input_name in input_names:
            pad = tokenizer.pad_token_id if input_name == "input_ids" else 0
            feeds[input_name] = right_pad([encodings[i][input_name] for i in chunk], value=pad)
        feeds.setdefault("attention_mask", right_pad([[1] * len(encodings[i]["input_ids"]) for i in chunk]))
        batches.append(Batch(feeds, [encodings[i].word_ids() for i in chunk], chunk))
    return EvalSet(name, sentences, gold, batches)


def run(runner: Runner, data: EvalSet, input_names: list[str]) -> list[Logits]:
    return [np.asarray(runner({n: b.feeds[n] for n in input_names}), dtype=np.float32) for b in data.batches]


def first_subtokens(word_ids: Sequence[int | None]) -> Iterator[tuple[int, int]]:
    """(position, word id) of each word's first sub-token: where a word's tag is trained and read."""
    seen: set[int] = set()
    for position, word_id in enumerate(word_ids):
        if word_id is not None and word_id not in seen:
            seen.add(word_id)
            yield position, word_id


def word_tags(data: EvalSet, logits: list[Logits], labels: list[str]) -> list[list[str]]:
    tags: list[list[str]] = [["O"] * len(words) for words in data.sentences]
    for batch, batch_logits in zip(data.batches, logits, strict=True):
        best = batch_logits.argmax(-1)
        for row, (index, word_ids) in enumerate(zip(batch.indices, batch.word_ids, strict=True)):
            for position, word_id in first_subtokens(word_ids):
                tags[index][word_id] = labels[int(best[row, position])]
    return tags


def entity_f1(gold: list[list[str]], predicted: list[list[str]]) -> float:
    from seqeval.metrics import f1_score

    return float(f1_score(gold, predicted, zero_division=0))


@dataclass(frozen=True)
class Parity:
    """Logits against the PyTorch checkpoint's, over the real tokens (attention_mask 1) only."""

    tokens: int
    max_abs_logit_diff: float
    argmax_agreement: float


def parity(masks: Sequence[npt.NDArray[np.int64]], logits: Sequence[Logits], reference: Sequence[Logits]) -> Parity:
    """``logits`` against ``reference``, batch by batch, each batch with its [batch, sequence] attention mask."""
    diffs, agree, total = [0.0], 0, 0
    for mask, got, ref in zip(masks, logits, reference, strict=True):
        valid = mask.astype(bool)
        diffs.append(float(np.abs(got[valid] - ref[valid]).max()))
        agree += int((got[valid].argmax(-1) == ref[valid].argmax(-1)).sum())
        total += int(valid.sum())
    return Parity(tokens=total, max_abs_logit_diff=max(diffs), argmax_agreement=agree / max(total, 1))


def score(data: EvalSet, logits: list[Logits], reference: list[Logits], labels: list[str]) -> Scores:
    measured = parity([batch.feeds["attention_mask"] for batch in data.batches], logits, reference)
    predicted = word_tags(data, logits, labels)
    return Scores(
        sentences=len(data.sentences), tokens=measured.tokens, max_abs_logit_diff=measured.max_abs_logit_diff,
        argmax_agreement=measured.argmax_agreement,
        f1=entity_f1(data.gold, predicted) if data.gold is not None else None,
        f1_vs_reference=entity_f1(word_tags(data, reference, labels), predicted),
    )


def torch_runner(model: Any, input_names: list[str]) -> Runner:
    import torch

    def infer(feeds: Feeds) -> Logits:
        with torch.inference_mode():
            logits: Logits = model(**{n: torch.from_numpy(feeds[n]) for n in input_names}).logits.float().numpy()
            return logits

    return infer


def each_row_alone(runner: Runner, feeds: Feeds) -> Logits:
    """``runner`` on every row of a padded batch alone, cut to its real length (attention_mask), as the
    served model runs a graph whose activation scales span its input (CalibrationInfo.rows_alone)."""
    lengths = feeds["attention_mask"].sum(axis=1)
    rows = [runner({name: np.ascontiguousarray(array[row : row + 1, :length]) for name, array in feeds.items()})[0]
            for row, length in enumerate(lengths)]
    logits = np.zeros((len(rows), feeds["attention_mask"].shape[1], rows[0].shape[-1]), dtype=np.float32)
    for row, (length, values) in enumerate(zip(lengths, rows, strict=True)):
        logits[row, :length] = values
    return logits


def onnx_runner(path: Path, rows_alone: bool = False) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    output = session.get_outputs()[0].name

    def infer(feeds: Feeds) -> Logits:
        (logits,) = session.run([output], feeds)
        return np.asarray(logits, dtype=np.float32)

    return (lambda feeds: each_row_alone(infer, feeds)) if rows_alone else infer


def reference(checkpoint: Checkpoint, name: str, sentences: list[list[str]], gold: list[list[str]] | None,
              input_names: list[str], max_length: int) -> Reference:
    """Encode ``sentences`` once and run the checkpoint's PyTorch model over them."""
    data = encode(checkpoint.tokenizer, name, sentences, gold, input_names, max_length)
    logits = run(torch_runner(checkpoint.model, input_names), data, input_names)
    f1 = entity_f1(gold, word_tags(data, logits, checkpoint.labels)) if gold is not None else None
    return Reference(data, logits, f1)


def score_onnx(path: Path, ref: Reference, labels: list[str], input_names: list[str], rows_alone: bool = False
               ) -> Scores:
    """An ONNX graph in ONNX Runtime on the reference's eval set (run as served), scored against it."""
    return score(ref.data, run(onnx_runner(path, rows_alone), ref.data, input_names), ref.logits, labels)
