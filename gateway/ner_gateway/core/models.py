"""The models the gateway serves: manifest + tokenizer + label table from the repository, checked against Triton."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ner_gateway.core.decoding import LabelTable
from ner_gateway.core.ports import ModelSource, ServedModel
from ner_gateway.core.tokenization import TextTokenizer
from ner_gateway.errors import ConfigurationError, ModelNotFound, echo
from ner_gateway.settings import GatewaySettings
from ner_gateway.spec.manifest import MANIFEST_FILE, ModelManifest, latest_version_dir, sha256_file

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class NerModel:
    manifest: ModelManifest
    tokenizer: TextTokenizer
    labels: LabelTable
    served: ServedModel
    window_stride: int  # tokens shared by consecutive windows of a long text

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def sequence_buckets(self) -> tuple[int, ...]:
        """Lengths every input is padded up to: a TensorRT engine's profile maxima; () for ragged models."""
        engine = self.manifest.engine
        return engine.sequence_buckets if engine is not None else ()


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


def window_stride(tokenizer: TextTokenizer, configured: int | None, name: str) -> int:
    """The configured stride, or a quarter of the window; must leave each window new tokens."""
    stride = tokenizer.window_capacity // 4 if configured is None else configured
    if not 0 <= stride < tokenizer.window_capacity:
        raise ConfigurationError(
            f"window stride {stride} is invalid for model {name!r}: need 0 <= stride < {tokenizer.window_capacity} "
            f"(max length {tokenizer.max_length} - {tokenizer.special_tokens} special tokens)"
        )
    return stride


@dataclass(frozen=True)
class EngineRuntime:
    """The TensorRT and GPU behind Triton's tensorrt_plan models; a field left None is not checked."""

    tensorrt_version: str | None = None
    gpu_compute_capability: str | None = None

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> EngineRuntime:
        return cls(settings.tensorrt_version, settings.gpu_compute_capability)


def _capability(text: str) -> str:
    """'9.0', '90', 'sm_90' -> '9.0'."""
    digits = text.strip().lower().removeprefix("sm_").removeprefix("sm")
    return digits if "." in digits or len(digits) < 2 else f"{digits[:-1]}.{digits[-1]}"


def check_engine(manifest: ModelManifest, runtime: EngineRuntime) -> None:
    """Refuse a TensorRT engine built for another TensorRT version or GPU than the configured ones."""
    engine, name = manifest.engine, manifest.name
    if engine is None:
        raise ConfigurationError(f"{name}: a {manifest.model_format} model whose manifest does not say what "
                                 "built the engine; rebuild it with ner-builder build")
    rebuild = "rebuild it with `ner-builder build --target trt-...` where the serving TensorRT is installed " \
              "(pip install 'triton-ner[tensorrt]' in NVIDIA's container; see deploy/README.md)"
    wanted = runtime.tensorrt_version
    if wanted:
        if engine.library != "tensorrt":
            raise ConfigurationError(f"{name}: its engine was built with {engine.library} {engine.version}, which "
                                     f"Triton's TensorRT backend (TensorRT {wanted}) cannot load; {rebuild}")
        have, want = engine.version.split("."), wanted.strip().split(".")
        if have[: len(want)] != want:
            raise ConfigurationError(f"{name}: its engine was built with TensorRT {engine.version}, but the server "
                                     f"runs TensorRT {wanted} (NER_TENSORRT_VERSION) and a plan loads only in the "
                                     f"TensorRT that built it; {rebuild}")
    gpu = runtime.gpu_compute_capability
    if gpu:
        built_for = [_capability(c) for c in engine.compute_capabilities]
        if not built_for:
            LOGGER.warning("%s: the manifest does not record the engine's GPU; compute capability not checked", name)
        elif _capability(gpu) not in built_for:
            raise ConfigurationError(f"{name}: its engine was built for GPU compute capability "
                                     f"{', '.join(built_for)}, but the serving GPU is {_capability(gpu)} "
                                     f"(NER_GPU_COMPUTE_CAPABILITY); {rebuild} on that GPU")


def load_tokenizer(version_dir: Path, manifest: ModelManifest) -> TextTokenizer:
    path = version_dir / manifest.tokenizer_file
    if not path.is_file():
        raise ConfigurationError(f"{manifest.name}: tokenizer file {path} is missing")
    if sha256_file(path) != manifest.tokenizer_sha256:
        raise ConfigurationError(
            f"{manifest.name}: {path} does not match the manifest's tokenizer checksum; rebuild the model"
        )
    tokenizer = TextTokenizer(path, manifest.max_sequence_length, manifest.inputs)
    if manifest.cjk_pieces is not None and tokenizer.cjk_pieces is not manifest.cjk_pieces:
        raise ConfigurationError(
            f"{manifest.name}: the tokenizer cuts CJK ideographs as {tokenizer.cjk_pieces} pieces here but was "
            f"built for {manifest.cjk_pieces} pieces (tokenizers {importlib.metadata.version('tokenizers')} "
            f"reads {path} differently from the build's {manifest.package_versions.get('tokenizers', '?')}); "
            "install the build's tokenizers version or rebuild the model"
        )
    return tokenizer


class ModelRegistry:
    def __init__(self, models: list[NerModel], default_model: str | None = None) -> None:
        self._models = {m.name: m for m in models}
        self.default_name = default_model or sorted(self._models)[0]
        if self.default_name not in self._models:
            raise ConfigurationError(f"default model {self.default_name!r} is not in the repository "
                                     f"(found: {', '.join(sorted(self._models))})")

    @classmethod
    async def load(cls, repository: Path, backend: ModelSource, default_model: str | None,
                   stride: int | None = None, engines: EngineRuntime | None = None) -> ModelRegistry:
        """Models Triton has READY; others are skipped with a log line (e.g. TensorRT engines on a CPU Triton).

        ``engines`` (the server passes NER_TENSORRT_VERSION / NER_GPU_COMPUTE_CAPABILITY; None: nothing to check)
        is checked against every TensorRT engine's manifest, loaded or not: a mismatch refuses the startup.
        """
        engines = engines or EngineRuntime()
        models, skipped = [], []
        for version_dir, manifest in read_manifests(repository):
            if manifest.engine is not None or manifest.model_format != "onnx":
                check_engine(manifest, engines)
            if not await backend.is_model_ready(manifest.name, manifest.version):
                hint = " (TensorRT engines need NVIDIA's Triton on a GPU: deploy/README.md)" if manifest.engine else ""
                LOGGER.warning("skipping model %s version %s: Triton at %s does not have it READY%s", manifest.name,
                               manifest.version, backend.url, hint)
                skipped.append(manifest.name)
                continue
            tokenizer = load_tokenizer(version_dir, manifest)
            served = await backend.check_model(manifest)
            backend.watch(served)
            table = LabelTable.from_labels(manifest.labels, manifest.tagging_scheme)
            models.append(NerModel(manifest, tokenizer, table, served, window_stride(tokenizer, stride, manifest.name)))
            LOGGER.info("serving %s version %s (%d labels, max %d tokens)", manifest.name, manifest.version,
                        len(manifest.labels), manifest.max_sequence_length)
        if not models:
            raise ConfigurationError(f"Triton at {backend.url} has none of the models in {repository} READY "
                                     f"(skipped: {', '.join(skipped)})")
        return cls(models, default_model)

    def get(self, name: str) -> NerModel:
        model = self._models.get(name or self.default_name)
        if model is None:
            raise ModelNotFound(f"model {echo(name)} not found; available: {', '.join(sorted(self._models))}")
        return model

    def __iter__(self) -> Iterator[NerModel]:
        return iter(self._models[name] for name in sorted(self._models))
