"""``ner-builder build``: checkpoint -> ONNX -> parity check -> Triton model entry with manifest."""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tokenizers import Tokenizer

from ner_builder import export, repository
from ner_builder.checkpoint import load_checkpoint
from ner_builder.errors import BuildError
from ner_builder.triton_config import ServingOptions, python_onnx_config, to_pbtxt
from ner_gateway.manifest import (
    TOKENIZER_FILE,
    ModelManifest,
    Precision,
    TaggingScheme,
    detect_tagging_scheme,
    sha256_file,
)

LOGGER = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RECORDED_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "tokenizers")


@dataclass(frozen=True)
class BuildOptions:
    version: int | None = None
    opset: int = 17
    atol: float = 1e-3
    min_argmax_agreement: float = 0.99
    sample_texts: tuple[str, ...] = tuple(export.SAMPLE_TEXTS)
    tagging_scheme: TaggingScheme | None = None
    max_length: int | None = None
    serving: ServingOptions = field(default_factory=ServingOptions)


@dataclass(frozen=True)
class BuildResult:
    version_dir: Path
    manifest: ModelManifest


def save_serving_tokenizer(tokenizer_json: str, path: Path) -> None:
    """Save the fast tokenizer with truncation and padding off: the gateway never truncates silently."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.save(str(path))


def build_model(checkpoint_path: Path, repository_path: Path, name: str, options: BuildOptions) -> BuildResult:
    if not MODEL_NAME.match(name):
        raise BuildError(f"invalid model name {name!r}: use letters, digits, '_', '.', '-'")
    checkpoint = load_checkpoint(checkpoint_path)
    max_length = options.max_length or checkpoint.max_length
    if max_length > checkpoint.max_length:
        raise BuildError(f"--max-length {max_length} exceeds the model's limit {checkpoint.max_length}")
    model_dir = repository_path / name
    version = options.version or repository.next_version(model_dir)

    staged = repository.staging_dir(repository_path)
    try:
        onnx_path = staged / "model.onnx"
        input_names = export.export_onnx(checkpoint, onnx_path, options.opset)
        parity = export.check_parity(checkpoint, onnx_path, input_names, list(options.sample_texts),
                                     options.atol, options.min_argmax_agreement)
        save_serving_tokenizer(checkpoint.tokenizer.backend_tokenizer.to_str(), staged / TOKENIZER_FILE)
        repository.write_python_model(staged)
        repository.write_label_map(staged, checkpoint.labels)
        manifest = ModelManifest(
            name=name,
            version=str(version),
            labels=checkpoint.labels,
            tagging_scheme=options.tagging_scheme or detect_tagging_scheme(checkpoint.labels),
            max_sequence_length=max_length,
            precision=Precision.FP32,
            model_sha256=sha256_file(onnx_path),
            opset=options.opset,
            inputs=input_names,
            output=export.OUTPUT_NAME,
            tokenizer_sha256=sha256_file(staged / TOKENIZER_FILE),
            source_checkpoint=str(checkpoint_path.resolve()),
            package_versions={p: importlib.metadata.version(p) for p in RECORDED_PACKAGES},
            parity=parity,
            created_at=datetime.now(UTC),
        )
        manifest.write(staged)
        config = python_onnx_config(name, input_names, export.OUTPUT_NAME, len(checkpoint.labels),
                                    options.serving)
        version_dir = repository.install_version(staged, model_dir, version, to_pbtxt(config))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    LOGGER.info("installed %s", version_dir)
    return BuildResult(version_dir=version_dir, manifest=manifest)
