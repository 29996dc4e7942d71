"""Export a token classifier to ONNX and check the export against PyTorch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ner_builder.checkpoint import Checkpoint
from ner_builder.errors import BuildError
from ner_gateway.artifact.manifest import ParityReport

LOGGER = logging.getLogger(__name__)

# Inputs in the order the exported graph takes them; a model uses the ones its tokenizer produces.
CANDIDATE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"

SAMPLE_TEXTS = [
    "Barack Obama was born in Honolulu, Hawaii and later moved to Chicago.",
    "Apple is looking at buying U.K. startup for $1 billion.",
    "Angela Merkel met Emmanuel Macron at the Élysée Palace in Paris on Tuesday.",
    "The Golden State Warriors beat the Boston Celtics 112-104 at Chase Center.",
    "I'm watching Game of Thrones on HBO tonight with @sarah #excited",
    "Google, Microsoft and Amazon reported earnings; NASDAQ rose 2%.",
    "Tokyo 東京 and Zürich are cities.",
    "hi",
]


class _LogitsOnly(torch.nn.Module):
    """Positional inputs in, logits out: a stable signature for the ONNX graph."""

    def __init__(self, model: torch.nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.input_names = input_names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(**dict(zip(self.input_names, tensors, strict=True))).logits
        return logits


def model_input_names(checkpoint: Checkpoint) -> list[str]:
    produced = set(checkpoint.tokenizer("x").keys())
    return [name for name in CANDIDATE_INPUTS if name in produced]


def export_onnx(checkpoint: Checkpoint, path: Path, names: list[str], opset: int) -> None:
    """Write ``path`` with dynamic batch and sequence axes and ``names`` (``model_input_names``) as inputs."""
    sample = checkpoint.tokenizer(SAMPLE_TEXTS[:2], padding=True, return_tensors="pt")
    dynamic = {name: {0: "batch", 1: "sequence"} for name in [*names, OUTPUT_NAME]}
    # eval() on the wrapper too: the exporter restores the wrapper's train/eval mode afterwards,
    # and a fresh Module is in train mode, which would leave dropout on in the checkpoint's model.
    wrapper = _LogitsOnly(checkpoint.model, names).eval()
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            tuple(sample[name] for name in names),
            str(path),
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )


def measure_parity(checkpoint: Checkpoint, onnx_path: Path, input_names: list[str], texts: list[str],
                   rows_alone: bool = False) -> ParityReport:
    """Compare ONNX Runtime with PyTorch (the in-memory model, pruned or not) on ``texts``, the ONNX graph run
    as served (``rows_alone``: each text alone, see CalibrationInfo.rows_alone)."""
    from ner_builder.evaluate import onnx_runner, parity, torch_runner

    batch = checkpoint.tokenizer(texts, padding=True, truncation=True, max_length=checkpoint.max_length,
                                 return_tensors="np")
    feeds = {name: batch[name].astype(np.int64) for name in input_names}
    measured = parity([batch["attention_mask"]], [onnx_runner(onnx_path, rows_alone)(feeds)],
                      [torch_runner(checkpoint.model, input_names)(feeds)])
    report = ParityReport(texts=len(texts), tokens=measured.tokens, max_abs_logit_diff=measured.max_abs_logit_diff,
                          argmax_agreement=measured.argmax_agreement)
    LOGGER.info("parity of %s on %d texts / %d tokens: max |logit diff| %.2e, argmax agreement %.4f",
                onnx_path.name, report.texts, report.tokens, report.max_abs_logit_diff, report.argmax_agreement)
    return report


def check_parity(
    checkpoint: Checkpoint, onnx_path: Path, input_names: list[str], texts: list[str], atol: float,
    min_argmax_agreement: float,
) -> ParityReport:
    """Compare ONNX Runtime with PyTorch on ``texts``; raise BuildError past the tolerances."""
    report = measure_parity(checkpoint, onnx_path, input_names, texts)
    diff, agreement = report.max_abs_logit_diff, report.argmax_agreement
    if diff > atol:
        raise BuildError(f"ONNX logits differ from PyTorch by {diff:.3g} (> tolerance {atol:g})")
    if agreement < min_argmax_agreement:
        raise BuildError(f"ONNX argmax agrees with PyTorch on {agreement:.2%} of tokens "
                         f"(< {min_argmax_agreement:.2%})")
    return report
