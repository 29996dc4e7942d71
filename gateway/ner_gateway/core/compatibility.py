"""Whether a built model can be served here: its TensorRT engine against the serving TensorRT and GPU, its
tokenizer file against the manifest (checksum, how it cuts CJK ideographs), its window stride against its length.
Each check refuses with a ConfigurationError that says what to rebuild or install."""

from __future__ import annotations

import importlib.metadata
import logging
from dataclasses import dataclass
from pathlib import Path

from ner_gateway.artifact.manifest import ModelManifest, sha256_file
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.core.tokenizing import TextTokenizer
from ner_gateway.core.windowing import stride_for

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRuntime:
    """The TensorRT and GPU behind Triton's tensorrt_plan models; a field left None is not checked."""

    tensorrt_version: str | None = None
    gpu_compute_capability: str | None = None


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
    """The model's tokenizer file, checked against its manifest."""
    path = version_dir / manifest.tokenizer_file
    if not path.is_file():
        raise ConfigurationError(f"{manifest.name}: tokenizer file {path} is missing")
    if sha256_file(path) != manifest.tokenizer_sha256:
        raise ConfigurationError(
            f"{manifest.name}: {path} does not match the manifest's tokenizer checksum; rebuild the model"
        )
    tokenizer = TextTokenizer(path, manifest.max_sequence_length)
    if manifest.cjk_pieces is not None and tokenizer.cjk_pieces is not manifest.cjk_pieces:
        raise ConfigurationError(
            f"{manifest.name}: the tokenizer cuts CJK ideographs as {tokenizer.cjk_pieces} pieces here but was "
            f"built for {manifest.cjk_pieces} pieces (tokenizers {importlib.metadata.version('tokenizers')} "
            f"reads {path} differently from the build's {manifest.package_versions.get('tokenizers', '?')}); "
            "install the build's tokenizers version or rebuild the model"
        )
    return tokenizer


def window_stride(tokenizer: TextTokenizer, configured: int | None, name: str) -> int:
    """The configured stride (NER_WINDOW_STRIDE), or a quarter of the window; must leave each window new tokens."""
    stride = stride_for(tokenizer.window_capacity, configured)
    if stride is None:
        raise ConfigurationError(
            f"window stride {configured} is invalid for model {name!r}: need 0 <= stride < "
            f"{tokenizer.window_capacity} (max length {tokenizer.max_length} - {tokenizer.special.count} special "
            "tokens)"
        )
    return stride
