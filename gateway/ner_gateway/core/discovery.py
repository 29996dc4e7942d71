"""Which model versions to serve: the ner-builder versions in the repository that the inference server has READY,
each checked (core/compatibility.py, and its tensors by the model source) before it may serve; at startup
(``load_models``) and while the gateway runs (``LiveVersions``: versions loaded or unloaded in Triton)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from ner_gateway.artifact.manifest import MANIFEST_FILE, ModelManifest
from ner_gateway.core.batching import InputEncoder
from ner_gateway.core.compatibility import EngineRuntime, check_engine, load_tokenizer, window_stride
from ner_gateway.core.decoding import LabelTable
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.core.ports import ModelSource
from ner_gateway.core.registry import ModelRegistry, NerModel
from ner_gateway.core.rollout import RolloutPolicy

LOGGER = logging.getLogger(__name__)

VersionKey = tuple[str, str]  # (model name, version)


def repository_versions(repository: Path) -> dict[VersionKey, Path]:
    """Every ner-builder version folder (one with a manifest) of every model in the repository."""
    if not repository.is_dir():
        raise ConfigurationError(f"model repository {repository} does not exist; build one with ner-builder build")
    found = {}
    for model_dir in sorted(p for p in repository.iterdir() if (p / "config.pbtxt").is_file()):
        for version_dir in model_dir.iterdir():
            if version_dir.name.isdigit() and (version_dir / MANIFEST_FILE).is_file():
                found[(model_dir.name, version_dir.name)] = version_dir
    return found


def read_manifest(version_dir: Path) -> ModelManifest:
    try:
        manifest = ModelManifest.read(version_dir)
    except ValidationError as e:
        raise ConfigurationError(f"invalid manifest in {version_dir}: {e}") from e
    if manifest.name != version_dir.parent.name or manifest.version != version_dir.name:
        raise ConfigurationError(f"{version_dir}/{MANIFEST_FILE} describes {manifest.name} version {manifest.version}")
    return manifest


def read_manifests(repository: Path) -> list[tuple[Path, ModelManifest]]:
    """The manifest of each model's highest version, the one Triton's default version policy serves."""
    latest: dict[str, Path] = {}
    for (name, version), version_dir in repository_versions(repository).items():
        if name not in latest or int(version) > int(latest[name].name):
            latest[name] = version_dir
    if not latest:
        raise ConfigurationError(f"no ner-builder models in {repository}")
    return [(version_dir, read_manifest(version_dir)) for _, version_dir in sorted(latest.items())]


async def check_version(version_dir: Path, manifest: ModelManifest, source: ModelSource, stride: int | None,
                        engines: EngineRuntime) -> NerModel:
    """A READY version, checked as it will serve (engine, tokenizer, tensors); ConfigurationError if it may not."""
    if manifest.engine is not None or manifest.model_format != "onnx":
        check_engine(manifest, engines)
    tokenizer = load_tokenizer(version_dir, manifest)
    served = await source.check_model(manifest)
    return NerModel(manifest, tokenizer, InputEncoder(tokenizer.special, manifest.inputs),
                    LabelTable.from_labels(manifest.labels, manifest.tagging_scheme), served,
                    window_stride(tokenizer, stride, manifest.name))


async def load_models(repository: Path, source: ModelSource, default_model: str | None, stride: int | None = None,
                      engines: EngineRuntime | None = None, policy: RolloutPolicy | None = None) -> ModelRegistry:
    """Every version the source has READY, each checked; a check that fails refuses the startup. Versions not READY
    are skipped (a model's highest one with a log line: e.g. TensorRT engines on a CPU Triton).

    ``engines`` (NER_TENSORRT_VERSION / NER_GPU_COMPUTE_CAPABILITY; None: nothing to check) is checked against
    every TensorRT engine's manifest, loaded or not: a mismatch refuses the startup.
    """
    engines = engines or EngineRuntime()
    latest = {version_dir: manifest for version_dir, manifest in read_manifests(repository)}
    models, skipped = [], []
    for (name, version), version_dir in sorted(repository_versions(repository).items(),
                                               key=lambda item: (item[0][0], -int(item[0][1]))):
        manifest = latest.get(version_dir) or read_manifest(version_dir)
        if version_dir in latest and (manifest.engine is not None or manifest.model_format != "onnx"):
            check_engine(manifest, engines)
        if not await source.is_model_ready(name, version):
            if version_dir in latest:
                hint = " (TensorRT engines need NVIDIA's Triton on a GPU: deploy/README.md)" if manifest.engine else ""
                LOGGER.warning("skipping model %s version %s: Triton at %s does not have it READY%s", name, version,
                               source.url, hint)
                skipped.append(name)
            continue
        model = await check_version(version_dir, manifest, source, stride, engines)
        source.watch(model.served)
        models.append(model)
        LOGGER.info("serving %s version %s (%d labels, max %d tokens)", name, version, len(manifest.labels),
                    manifest.max_sequence_length)
    if not models:
        raise ConfigurationError(f"Triton at {source.url} has none of the models in {repository} READY "
                                 f"(skipped: {', '.join(skipped)})")
    return ModelRegistry(models, default_model, policy, ready=source.model_ready)


class LiveVersions:
    """Follows the repository and the inference server while the gateway runs (``poll``, about once a second):

    - a version (of a served model or a new one) that becomes READY is checked exactly as at startup and serves only
      if it passes; one that fails is refused with a log line and ``on_refused`` (a metric), and the others carry on;
      it is checked again once its files change, or after it leaves READY in Triton;
    - a version that is no longer ready while another version of its model is goes away: no new call resolves to
      it (the registry already passes over versions that are not ready), calls that hold it finish.
    """

    def __init__(self, repository: Path, source: ModelSource, registry: ModelRegistry, stride: int | None = None,
                 engines: EngineRuntime | None = None,
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        self.repository = repository
        self.source = source
        self.registry = registry
        self.stride = stride
        self.engines = engines or EngineRuntime()
        self.on_refused = on_refused
        self._refused: dict[VersionKey, int] = {}  # -> its files' latest mtime when it was refused

    async def poll(self) -> bool:
        """One look; True when the served versions changed."""
        changed = self._retire_gone()
        served = {(m.name, m.version) for m in self.registry.all_versions()}
        for key, version_dir in sorted(repository_versions(self.repository).items()):
            if key in served:
                continue
            if not await self.source.is_model_ready(*key, timeout_s=1.0):
                self._refused.pop(key, None)  # unloaded: loaded again, it is checked again
                continue
            stamp = max(f.stat().st_mtime_ns for f in version_dir.iterdir())
            if self._refused.get(key) == stamp:
                continue
            try:
                model = await check_version(version_dir, read_manifest(version_dir), self.source, self.stride,
                                            self.engines)
            except ConfigurationError as e:
                LOGGER.warning("refusing model %s version %s, READY in Triton: %s; the versions serving carry on",
                               *key, e)
                self._refused[key] = stamp
                if self.on_refused is not None:
                    self.on_refused(*key)
                continue
            self.source.watch(model.served)
            self.registry.add(model)
            self._refused.pop(key, None)
            changed = True
            LOGGER.info("serving %s version %s, loaded while running (%d labels, max %d tokens)", *key,
                        len(model.manifest.labels), model.manifest.max_sequence_length)
        return changed

    def _retire_gone(self) -> bool:
        """Remove the versions no longer ready while another version of their model is ready."""
        changed = False
        for model in self.registry.all_versions():
            ready = self.source.model_ready(model.served)
            others = [m for m in self.registry.versions(model.name) if m is not model
                      and self.source.model_ready(m.served)]
            if not ready and others:
                self.registry.remove(model)
                self.source.unwatch(model.served)
                changed = True
                LOGGER.info("model %s version %s is no longer ready in Triton (%s serves): it takes no new calls",
                            model.name, model.version, ", ".join(m.version for m in others))
        return changed
