"""``ner-builder``: fine-tune (train) and compile (build) token classifiers for Triton."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from ner_builder.datasets import available_datasets
from ner_builder.errors import BuildError
from ner_builder.triton_config import ServingOptions
from ner_gateway.manifest import TaggingScheme

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach a model hub


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Fine-tune and compile Hugging Face token classifiers into a Triton model repository."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--base", type=click.Path(path_type=Path), required=True,
              help="Local folder of the base encoder (HF format).")
@click.option("--dataset", type=click.Choice(available_datasets()), required=True, help="Labelled NER data set.")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to write.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True,
              help="Training sequence length (truncation applies to training only).")
@click.option("--eval-fraction", type=click.FloatRange(0.01, 0.5), default=0.15, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N training sentences.")
@click.option("--seed", type=int, default=13, show_default=True)
def train(base: Path, dataset: str, output: Path, epochs: int, batch_size: int, max_length: int,
          eval_fraction: float, limit: int | None, seed: int) -> None:
    """Fine-tune a token classifier on DATASET and write an HF checkpoint plus a seqeval report."""
    from ner_builder.datasets import DatasetError, load_dataset
    from ner_builder.train import TrainError, train_token_classifier

    try:
        result = train_token_classifier(
            base, load_dataset(dataset), output, epochs=epochs, batch_size=batch_size, max_length=max_length,
            eval_fraction=eval_fraction, seed=seed, limit=limit,
        )
    except (DatasetError, TrainError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"entity F1 {result.f1:.4f} (P {result.precision:.4f} R {result.recall:.4f}) on "
               f"{result.eval_sentences} held-out sentences; checkpoint in {result.output}")


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--repository", type=click.Path(path_type=Path), default=Path("model_repository"),
              show_default=True, help="Triton model repository to write into.")
@click.option("--name", required=True, help="Model name in the repository.")
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Model version (default: one above the highest present).")
@click.option("--max-length", type=click.IntRange(min=8), default=None,
              help="Longest input in tokens the gateway accepts (default: the model's limit).")
@click.option("--tagging-scheme", type=click.Choice([s.value for s in TaggingScheme]), default=None,
              help="Override the scheme detected from the labels.")
@click.option("--opset", type=click.IntRange(min=14), default=17, show_default=True)
@click.option("--atol", type=float, default=1e-3, show_default=True,
              help="Largest |logit| difference ONNX vs PyTorch that is accepted.")
@click.option("--sample-texts", type=click.File(), default=None,
              help="File of texts (one per line) for the parity check, instead of the built-in ones.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--instances", type=click.IntRange(min=1), default=1, show_default=True,
              help="Triton model instances (CPU).")
@click.option("--ort-threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="ONNX Runtime intra-op threads per instance (0 = automatic).")
def build(checkpoint: Path, repository: Path, name: str, version: int | None, max_length: int | None,
          tagging_scheme: str | None, opset: int, atol: float, sample_texts, max_batch_size: int,
          instances: int, ort_threads: int) -> None:
    """Export CHECKPOINT to ONNX, check it against PyTorch and install it as a Triton model."""
    from ner_builder.build import BuildOptions, build_model
    from ner_builder.export import SAMPLE_TEXTS

    texts = tuple(line.strip() for line in sample_texts if line.strip()) if sample_texts else tuple(SAMPLE_TEXTS)
    if not texts:
        raise click.BadParameter("no texts in the file", param_hint="--sample-texts")
    options = BuildOptions(
        version=version, opset=opset, atol=atol, sample_texts=texts, max_length=max_length,
        tagging_scheme=TaggingScheme(tagging_scheme) if tagging_scheme else None,
        serving=ServingOptions(max_batch_size=max_batch_size, instances=instances, intra_op_threads=ort_threads),
    )
    try:
        result = build_model(checkpoint, repository, name, options)
    except BuildError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps({"installed": str(result.version_dir),
                           "parity": result.manifest.parity.model_dump()}, indent=2))
