"""Which model versions to serve: the ner-builder versions in the repository that the inference server has READY,
each checked (core/compatibility.py, and its tensors by the model source) before it may serve; at startup
and while the gateway runs (``LiveVersions``: versions loaded or unloaded in Triton)."""

from __future__ import annotations

import asyncio
import logging
import os
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


def files_stamp(version_dir: Path) -> int:
    """The latest modification time (ns) of any file of a version: what changes when it is rebuilt or fixed."""
    return max((Path(root, f).stat().st_mtime_ns for root, _, files in os.walk(version_dir) for f in files),
               default=0)


async def check_version(version_dir: Path, manifest: ModelManifest, source: ModelSource, stride: int | None,
                        engines: EngineRuntime) -> NerModel:
    """A READY version, checked as it will serve (engine, tokenizer, tensors); ConfigurationError if it may not."""
    if manifest.engine is not None or manifest.model_format != "onnx":
        check_engine(manifest, engines)
    tokenizer = await asyncio.to_thread(load_tokenizer, version_dir, manifest)  # hashes and parses its file
    served = await source.check_model(manifest)
    return NerModel(manifest, tokenizer, InputEncoder(tokenizer.special, manifest.inputs),
                    LabelTable.from_labels(manifest.labels, manifest.tagging_scheme), served,
                    window_stride(tokenizer, stride, manifest.name))


class LiveVersions:
    """The versions to serve: at startup (``load``) and while the gateway runs (``poll``, about once a second).

    - Every READY version is checked (engine, tokenizer, tensors) before it serves. One that fails, at startup or
      later, is refused with a log line and ``on_refused`` (a metric), and the others carry on (a pod that starts
      while a broken candidate is loaded serves the rest); at startup, a model none of whose READY versions passes
      refuses the startup with its highest version's error. A refused version is checked again once its files
      change, or after it leaves READY in Triton.
    - A version that Triton reports not ready on two polls in a row, while another version of its model is ready,
      goes away: no new call resolves to it (the registry passes over a version that is not ready at once), calls
      that hold it finish.
    """

    def __init__(self, repository: Path, source: ModelSource, stride: int | None = None,
                 engines: EngineRuntime | None = None,
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        self.repository = repository
        self.source = source
        self.stride = stride
        self.engines = engines or EngineRuntime()
        self.on_refused = on_refused
        self.registry: ModelRegistry | None = None
        self._refused: dict[VersionKey, int] = {}  # -> files_stamp when it was refused
        self._not_ready: dict[VersionKey, int] = {}  # served versions Triton said not ready: polls in a row

    async def load(self, default_model: str | None = None, policy: RolloutPolicy | None = None) -> ModelRegistry:
        """Every version the source has READY, each checked. Versions not READY are skipped (a model's highest one
        with a log line: e.g. TensorRT engines on a CPU Triton). Every TensorRT engine's manifest, loaded or not, is
        checked against ``engines`` (NER_TENSORRT_VERSION / NER_GPU_COMPUTE_CAPABILITY): a mismatch refuses the
        startup."""
        source, engines = self.source, self.engines
        on_disk = repository_versions(self.repository)
        if not on_disk:
            raise ConfigurationError(f"no ner-builder models in {self.repository}")
        models: list[NerModel] = []
        skipped: list[str] = []
        failed: dict[str, Exception] = {}  # model -> its highest READY version's error
        seen: set[str] = set()
        # Each model's versions highest first: the first is the one Triton's default version policy serves.
        for (name, version), version_dir in sorted(on_disk.items(), key=lambda item: (item[0][0], -int(item[0][1]))):
            manifest = read_manifest(version_dir)
            latest = name not in seen
            seen.add(name)
            if latest and (manifest.engine is not None or manifest.model_format != "onnx"):
                check_engine(manifest, engines)
            if not await source.is_model_ready(name, version):
                if latest:
                    hint = " (TensorRT engines need NVIDIA's Triton on a GPU: deploy/README.md)" \
                        if manifest.engine else ""
                    LOGGER.warning("skipping model %s version %s: Triton at %s does not have it READY%s", name,
                                   version, source.url, hint)
                    skipped.append(name)
                continue
            try:
                model = await check_version(version_dir, manifest, source, self.stride, engines)
            except Exception as e:
                failed.setdefault(name, e)
                self._refuse((name, version), files_stamp(version_dir), e)
                continue
            source.watch(model.served)
            models.append(model)
            LOGGER.info("serving %s version %s (%d labels, max %d tokens)", name, version, len(manifest.labels),
                        manifest.max_sequence_length)
        for name, error in failed.items():
            if not any(m.name == name for m in models):
                raise error
        if not models:
            raise ConfigurationError(f"Triton at {source.url} has none of the models in {self.repository} READY "
                                     f"(skipped: {', '.join(skipped)})")
        self.registry = ModelRegistry(models, default_model, policy, ready=source.model_ready)
        return self.registry

    async def poll(self) -> bool:
        """One look; True when the served versions changed."""
        assert self.registry is not None, "load() first"
        changed = await self._retire_gone(self.registry)
        served = {(m.name, m.version) for m in self.registry.all_versions()}
        for key, version_dir in sorted((await asyncio.to_thread(repository_versions, self.repository)).items()):
            if key in served:
                continue
            if not await self.source.is_model_ready(*key, timeout_s=1.0):
                self._refused.pop(key, None)  # unloaded: loaded again, it is checked again
                continue
            try:
                stamp = await asyncio.to_thread(files_stamp, version_dir)
            except OSError:  # its files are being copied or moved: the next poll looks again
                continue
            if self._refused.get(key) == stamp:
                continue
            try:
                manifest = await asyncio.to_thread(read_manifest, version_dir)
                model = await check_version(version_dir, manifest, self.source, self.stride, self.engines)
            except Exception as e:  # whatever it is (a bad manifest, a corrupt tokenizer), only this version
                self._refuse(key, stamp, e)
                continue
            self.source.watch(model.served)
            self.registry.add(model)
            self._refused.pop(key, None)
            changed = True
            LOGGER.info("serving %s version %s, loaded while running (%d labels, max %d tokens)", *key,
                        len(model.manifest.labels), model.manifest.max_sequence_length)
        return changed

    def _refuse(self, key: VersionKey, stamp: int, error: Exception) -> None:
        LOGGER.warning("refusing model %s version %s, READY in Triton: %s; the versions serving carry on", *key,
                       error if isinstance(error, ConfigurationError) else repr(error))
        self._refused[key] = stamp
        if self.on_refused is not None:
            self.on_refused(*key)

    async def _retire_gone(self, registry: ModelRegistry) -> bool:
        changed = False
        for model in registry.all_versions():
            key = model.served.key
            if self.source.model_ready(model.served):
                self._not_ready.pop(key, None)
                continue
            others = [m.version for m in registry.versions(model.name)
                      if m is not model and self.source.model_ready(m.served)]
            # Not ready as the pool last saw it (one failed call is enough for that): asked Triton itself, twice.
            if not others or await self.source.is_model_ready(model.name, model.version, timeout_s=1.0):
                self._not_ready.pop(key, None)
                continue
            self._not_ready[key] = self._not_ready.get(key, 0) + 1
            if self._not_ready[key] < 2:
                continue
            del self._not_ready[key]
            registry.remove(model)
            self.source.unwatch(model.served)
            changed = True
            LOGGER.info("model %s version %s is no longer ready in Triton (%s serves): it takes no new calls",
                        model.name, model.version, ", ".join(others))
        return changed
