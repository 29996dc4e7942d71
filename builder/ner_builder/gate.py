"""The accuracy gate: the labelled held-out split, the PyTorch checkpoint's F1 on it, and the rule an artifact's
graph must pass to be installed. ``verify`` reads the same split."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ner_builder import datasets, evaluate
from ner_builder.checkpoint import Checkpoint
from ner_builder.datasets import NerDataset
from ner_builder.errors import BuildError
from ner_gateway.artifact.manifest import AccuracyReport, ParityReport, Precision

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """A dataset split as ``ner-builder train`` split it (same fraction and seed)."""

    name: str
    data: NerDataset
    train: NerDataset
    held_out: NerDataset

    def labelled_held_out(self, scorer: str) -> NerDataset:
        """The held-out split, for ``scorer`` to score entity F1 on (word-level data only)."""
        if self.data.char_level:
            raise BuildError(f"{scorer} scores word-level datasets; {self.name} is character-level")
        return self.held_out


def load_split(dataset: str, eval_fraction: float, seed: int) -> Split:
    try:
        data = datasets.load_dataset(dataset)
        train, held_out = datasets.held_out_split(data, eval_fraction=eval_fraction, seed=seed)
    except datasets.DatasetError as e:
        raise BuildError(str(e)) from e
    return Split(dataset, data, train, held_out)


@dataclass(frozen=True)
class GateRules:
    """What the gate is measured on and how strict it is (``ner-builder build``'s options of the same names)."""

    dataset: str | None = None  # labelled data for the F1 gate (held-out split)
    eval_fraction: float = 0.15  # same split as `ner-builder train`
    seed: int = 13
    max_f1_drop: float = 1.0  # F1 points below the PyTorch checkpoint
    verify: bool = True  # with a dataset: run the F1 gate (else the dataset only supplies calibration texts)
    min_reduced_agreement: float = 0.95  # gate for fp16/int8 when there is no dataset: argmax agreement


@dataclass(frozen=True)
class Gate:
    """The PyTorch reference on the held-out split and the rule an artifact must pass."""

    ref: evaluate.Reference | None  # None: no --dataset (or --no-verify), so no F1 gate
    options: GateRules
    labels: list[str]
    input_names: list[str]

    @property
    def reference_f1(self) -> float | None:
        return self.ref.f1 if self.ref is not None else None

    @property
    def sentences(self) -> int:
        return len(self.ref.data.sentences) if self.ref is not None else 0

    def score(self, path: Path, rows_alone: bool = False) -> evaluate.Scores | None:
        if self.ref is None:
            return None
        return evaluate.score_onnx(path, self.ref, self.labels, self.input_names, rows_alone)

    def refusal(self, precision: Precision, parity: ParityReport, scores: evaluate.Scores | None) -> str | None:
        """Why a graph with these scores may not be installed, or None when it passes."""
        if scores is not None and (drop := scores.f1_drop(self.reference_f1)) is not None:
            if drop > self.options.max_f1_drop:
                return (f"F1 {scores.f1:.4f} is {drop:.2f} points below the PyTorch checkpoint's "
                        f"{self.reference_f1:.4f} (max drop {self.options.max_f1_drop:.1f})")
            return None
        agreement = parity.argmax_agreement
        if precision is not Precision.FP32 and agreement < self.options.min_reduced_agreement:
            return (f"argmax agreement with PyTorch {agreement:.2%} on {parity.texts} sample texts is below "
                    f"{self.options.min_reduced_agreement:.0%} (no --dataset, so no F1 gate)")
        return None

    def accuracy(self, scores: evaluate.Scores | None, measured_on: str) -> AccuracyReport | None:
        """The manifest's record of the gate, when an F1 gate ran."""
        if scores is None or scores.f1 is None or self.reference_f1 is None:
            return None
        return AccuracyReport(dataset=self.options.dataset or "", sentences=scores.sentences, f1=scores.f1,
                              reference_f1=self.reference_f1, max_f1_drop=self.options.max_f1_drop,
                              measured_on=measured_on)


def make_gate(checkpoint: Checkpoint, input_names: list[str], max_length: int, options: GateRules
              ) -> tuple[Gate, NerDataset | None]:
    """The gate and the training split (which calibrates int8), computed before any pruning."""
    if options.dataset is None:
        return Gate(None, options, checkpoint.labels, input_names), None
    split = load_split(options.dataset, options.eval_fraction, options.seed)
    if not options.verify:
        return Gate(None, options, checkpoint.labels, input_names), split.train
    held_out = split.labelled_held_out("the accuracy gate")
    missing = sorted(set(split.data.labels) - set(checkpoint.labels))
    if missing:
        raise BuildError(f"{checkpoint.path} was not trained on {options.dataset}: its labels lack {missing[:5]}")
    ref = evaluate.reference(checkpoint, held_out.name, held_out.sentences, held_out.tags, input_names, max_length)
    LOGGER.info("PyTorch checkpoint: entity F1 %.4f on %d held-out %s sentences", ref.f1, len(held_out),
                options.dataset)
    return Gate(ref, options, checkpoint.labels, input_names), split.train
