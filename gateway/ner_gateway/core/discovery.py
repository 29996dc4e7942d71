"""Which models to serve: the ner-builder models in the repository that the inference server has READY, each
checked (core/compatibility.py, and its tensors by the model source) before it may serve."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import ValidationError

from ner_gateway.artifact.manifest import MANIFEST_FILE, ModelManifest, latest_version_dir
from ner_gateway.core.batching import InputEncoder
from ner_gateway.core.compatibility import EngineRuntime, check_engine, load_tokenizer, window_stride
from ner_gateway.core.decoding import LabelTable
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.core.ports import ModelSource
from ner_gateway.core.registry import ModelRegistry, NerModel

LOGGER = logging.getLogger(__name__)


def read_manifests(repository: Path) -> list[tuple[Path, ModelManifest]]:
    if not repository.is_dir():
        raise ConfigurationError(f"model repository {repository} does not exist; build one with ner-builder build")
    found = []
    for model_dir in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()):
        version_dir = latest_version_dir(model_dir)
        if version_dir is None or not (version_dir / MANIFEST_FILE).is_file():
            LOGGER.warning("skipping %s: no ner-builder manifest in its latest version", model_dir)
            continue
        try:
            manifest = ModelManifest.read(version_dir)
        except ValidationError as e:
            raise ConfigurationError(f"invalid manifest in {version_dir}: {e}") from e
        if manifest.name != model_dir.name or manifest.version != version_dir.name:
            raise ConfigurationError(
                f"{version_dir}/{MANIFEST_FILE} describes {manifest.name} version {manifest.version}"
            )
        found.append((version_dir, manifest))
    if not found:
        raise ConfigurationError(f"no ner-builder models in {repository}")
    return found


async def load_models(repository: Path, source: ModelSource, default_model: str | None, stride: int | None = None,
                      engines: EngineRuntime | None = None) -> ModelRegistry:
    """Models the source has READY; others are skipped with a log line (e.g. TensorRT engines on a CPU Triton).

    ``engines`` (NER_TENSORRT_VERSION / NER_GPU_COMPUTE_CAPABILITY; None: nothing to check) is checked against
    every TensorRT engine's manifest, loaded or not: a mismatch refuses the startup.
    """
    engines = engines or EngineRuntime()
    models, skipped = [], []
    for version_dir, manifest in read_manifests(repository):
        if manifest.engine is not None or manifest.model_format != "onnx":
            check_engine(manifest, engines)
        if not await source.is_model_ready(manifest.name, manifest.version):
            hint = " (TensorRT engines need NVIDIA's Triton on a GPU: deploy/README.md)" if manifest.engine else ""
            LOGGER.warning("skipping model %s version %s: Triton at %s does not have it READY%s", manifest.name,
                           manifest.version, source.url, hint)
            skipped.append(manifest.name)
            continue
        tokenizer = load_tokenizer(version_dir, manifest)
        encoder = InputEncoder(tokenizer.special, manifest.inputs)
        served = await source.check_model(manifest)
        source.watch(served)
        table = LabelTable.from_labels(manifest.labels, manifest.tagging_scheme)
        models.append(NerModel(manifest, tokenizer, encoder, table, served,
                               window_stride(tokenizer, stride, manifest.name)))
        LOGGER.info("serving %s version %s (%d labels, max %d tokens)", manifest.name, manifest.version,
                    len(manifest.labels), manifest.max_sequence_length)
    if not models:
        raise ConfigurationError(f"Triton at {source.url} has none of the models in {repository} READY "
                                 f"(skipped: {', '.join(skipped)})")
    return ModelRegistry(models, default_model)
