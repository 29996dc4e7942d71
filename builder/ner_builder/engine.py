"""TensorRT engines (``model.plan``) from the fp32 / fp16 / Q/DQ-int8 ONNX graphs.

One code path for NVIDIA TensorRT (``tensorrt``, GPU hosts and NVIDIA's containers: the engines Triton's
TensorRT backend serves) and TensorRT-RTX (``tensorrt_rtx``, installs from PyPI and builds without a
GPU: CI proves with it that our graphs parse and the profiles are valid). The network is strongly
typed: precision comes from the graph (fp16 tensors, Q/DQ nodes), not from builder flags (implicit
int8 calibration is deprecated since TensorRT 10.1; TensorRT-RTX has no precision flags at all).

A plan runs only on the TensorRT version that built it and on a GPU it was built for: the manifest
records both and the gateway refuses a mismatch (see ``ner_gateway.core.models.check_engine``).
Running an engine needs a GPU; nothing here runs one.
"""

from __future__ import annotations

import importlib
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from ner_builder.errors import BuildError
from ner_gateway.artifact.manifest import EngineInfo, OptimizationProfile, sha256_file

LOGGER = logging.getLogger(__name__)

LIBRARIES = ("tensorrt", "tensorrt_rtx")
DEFAULT_SEQ_BUCKETS = (32, 64, 128, 256)
# TensorRT-RTX builds ahead of time, without a GPU, for these compute capabilities unless told otherwise
# (its documentation: Ampere and later; Turing 7.5 only on request).
RTX_DEFAULT_COMPUTE_CAPABILITIES = ["8.0", "8.6", "8.9", "12.0"]
INSTALL_HINT = (
    "TensorRT targets need TensorRT's Python API. On a GPU host or in NVIDIA's TensorRT/Triton container: "
    "pip install 'triton-ner[tensorrt]' with the same TensorRT version as the Triton that will serve the "
    "engines (see deploy/README.md); to check the graphs and profiles on a CPU-only machine: "
    "pip install 'triton-ner[tensorrt-rtx]'"
)


@dataclass(frozen=True)
class EngineOptions:
    seq_buckets: tuple[int, ...] = DEFAULT_SEQ_BUCKETS
    max_batch_size: int = 32
    opt_batch_size: int = 8
    library: str = "auto"  # auto: tensorrt if importable, else tensorrt_rtx
    workspace_mib: int = 2048


@dataclass(frozen=True)
class Engine:
    plan: bytes
    info: EngineInfo
    max_sequence_length: int


def import_library(preference: str = "auto") -> tuple[ModuleType, str]:
    """The TensorRT Python module to build with, and its distribution name."""
    if preference not in ("auto", *LIBRARIES):
        raise BuildError(f"unknown TensorRT library {preference!r}; choose auto, {', '.join(LIBRARIES)}")
    candidates = LIBRARIES if preference == "auto" else (preference,)
    problems = []
    for name in candidates:
        try:
            module = importlib.import_module(name)
            module.Builder  # noqa: B018 - the PyPI placeholder packages import but lack the API
        except (ImportError, OSError, AttributeError) as e:
            problems.append(f"{name}: {e}")
            continue
        return module, name
    raise BuildError(f"{INSTALL_HINT} ({'; '.join(problems)})")


def profile_shapes(seq_buckets: tuple[int, ...], max_length: int, max_batch: int, opt_batch: int
                   ) -> list[OptimizationProfile]:
    """One profile per sequence bucket: batch 1..max_batch, sequence 1..bucket, optimized for (opt_batch, bucket).

    Buckets above the model's maximum length are capped to it; the largest bucket becomes the engine's
    (and so the manifest's) maximum sequence length. Triton picks, per batch, the profile whose opt shape
    is nearest among those that fit.
    """
    if not seq_buckets or min(seq_buckets) < 1:
        raise BuildError(f"sequence buckets must be positive, got {list(seq_buckets)}")
    sizes = sorted({min(bucket, max_length) for bucket in seq_buckets})
    opt = max(1, min(opt_batch, max_batch))
    return [OptimizationProfile(min=[1, 1], opt=[opt, size], max=[max_batch, size]) for size in sizes]


def build_engine(onnx_path: Path, max_length: int, options: EngineOptions) -> Engine:
    trt, library = import_library(options.library)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise BuildError(f"{library} cannot parse {onnx_path.name}: {errors}")
    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    for tensor in inputs:
        if len(tensor.shape) != 2:
            raise BuildError(f"engine input {tensor.name} has shape {tensor.shape}, expected [batch, sequence]")

    config = builder.create_builder_config()
    if hasattr(trt, "MemoryPoolType"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    profiles = profile_shapes(options.seq_buckets, max_length, options.max_batch_size, options.opt_batch_size)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for tensor in inputs:
            profile.set_shape(tensor.name, shapes.min, shapes.opt, shapes.max)
        config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError(f"{library} failed to build an engine from {onnx_path.name} (see the log above)")
    data = bytes(memoryview(plan))
    info = EngineInfo(
        library=library, version=str(trt.__version__), compute_capabilities=_compute_capabilities(library),
        strongly_typed=True, profiles=profiles, onnx_file="model.onnx", onnx_sha256=sha256_file(onnx_path),
    )
    LOGGER.info("%s %s engine from %s: %d profiles (sequence %s), %.1f MB", library, info.version, onnx_path.name,
                len(profiles), [p.max[1] for p in profiles], len(data) / 1e6)
    return Engine(plan=data, info=info, max_sequence_length=profiles[-1].max[1])


def _compute_capabilities(library: str) -> list[str]:
    if library == "tensorrt_rtx":
        return list(RTX_DEFAULT_COMPUTE_CAPABILITIES)
    # TensorRT builds for the GPU it runs on.
    found = detect_compute_capability()
    if found is None:
        LOGGER.warning("could not detect the GPU's compute capability; the manifest records none")
    return [found] if found else []


def detect_compute_capability() -> str | None:
    """The first GPU's compute capability ('9.0'), from nvidia-smi; None without one."""
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return None
    try:
        out = subprocess.run([nvidia_smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None
