"""The models the gateway serves: manifest + tokenizer + label table from the repository, checked against Triton."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from ner_gateway.decoding import LabelTable
from ner_gateway.errors import ConfigurationError, ModelNotFound
from ner_gateway.manifest import MANIFEST_FILE, ModelManifest, sha256_file
from ner_gateway.tokenization import TextTokenizer
from ner_gateway.triton_backend import ServedModel, TritonBackend

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


def latest_version_dir(model_dir: Path) -> Path | None:
    """Triton's default version policy serves the highest numeric version."""
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name), default=None)


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


def load_tokenizer(version_dir: Path, manifest: ModelManifest) -> TextTokenizer:
    path = version_dir / manifest.tokenizer_file
    if not path.is_file():
        raise ConfigurationError(f"{manifest.name}: tokenizer file {path} is missing")
    if sha256_file(path) != manifest.tokenizer_sha256:
        raise ConfigurationError(
            f"{manifest.name}: {path} does not match the manifest's tokenizer checksum; rebuild the model"
        )
    return TextTokenizer(path, manifest.max_sequence_length, manifest.inputs)


class ModelRegistry:
    def __init__(self, models: list[NerModel], default_model: str | None = None) -> None:
        self._models = {m.name: m for m in models}
        self.default_name = default_model or sorted(self._models)[0]
        if self.default_name not in self._models:
            raise ConfigurationError(f"default model {self.default_name!r} is not in the repository "
                                     f"(found: {', '.join(sorted(self._models))})")

    @classmethod
    async def load(cls, repository: Path, backend: TritonBackend, default_model: str | None,
                   stride: int | None = None) -> ModelRegistry:
        models = []
        for version_dir, manifest in read_manifests(repository):
            tokenizer = load_tokenizer(version_dir, manifest)
            served = await backend.check_model(manifest)
            table = LabelTable.from_labels(manifest.labels, manifest.tagging_scheme)
            models.append(NerModel(manifest, tokenizer, table, served, window_stride(tokenizer, stride, manifest.name)))
            LOGGER.info("serving %s version %s (%d labels, max %d tokens)", manifest.name, manifest.version,
                        len(manifest.labels), manifest.max_sequence_length)
        return cls(models, default_model)

    def get(self, name: str) -> NerModel:
        model = self._models.get(name or self.default_name)
        if model is None:
            raise ModelNotFound(f"model {name!r} not found; available: {', '.join(sorted(self._models))}")
        return model

    def __iter__(self) -> Iterator[NerModel]:
        return iter(self._models[name] for name in sorted(self._models))
