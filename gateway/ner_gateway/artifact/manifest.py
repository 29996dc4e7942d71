"""The model manifest: what the builder promises about an artifact and the gateway relies on.

Written by ``ner-builder build`` next to the model file in each Triton version directory
(``REPOSITORY/NAME/VERSION/manifest.json``) and read by the gateway at startup.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ner_gateway.artifact.cjk import CjkPieces
from ner_gateway.artifact.schemes import TaggingScheme

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


class Precision(StrEnum):
    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"


class ParityReport(BaseModel):
    """How the exported artifact compares with the PyTorch checkpoint it came from."""

    texts: int
    tokens: int
    max_abs_logit_diff: float
    argmax_agreement: float
    measured_on: str = Field("artifact", description="'artifact', or what stood in for it (an engine's ONNX graph).")


class OptimizationProfile(BaseModel):
    """One TensorRT optimization profile: [batch, sequence] shapes of every input."""

    min: list[int]
    opt: list[int]
    max: list[int]


class EngineInfo(BaseModel):
    """What a TensorRT engine was built with: a plan runs only on the same TensorRT and a matching GPU."""

    library: str = Field(description="'tensorrt' (NVIDIA's Triton container) or 'tensorrt_rtx'.")
    version: str
    compute_capabilities: list[str] = Field(
        default_factory=list, description="GPU compute capabilities the plan was built for, e.g. ['9.0']; [] unknown."
    )
    strongly_typed: bool = True
    profiles: list[OptimizationProfile] = Field(default_factory=list)
    onnx_file: str = Field("model.onnx", description="The ONNX graph the engine was built from (kept beside it).")
    onnx_sha256: str = ""

    @property
    def sequence_buckets(self) -> tuple[int, ...]:
        """The sequence lengths of the profiles (``--seq-buckets`` capped by the model), ascending."""
        return tuple(sorted({profile.max[1] for profile in self.profiles}))


class CalibrationInfo(BaseModel):
    """How an int8 graph was calibrated (or that it was quantized dynamically)."""

    mode: str = Field(description="'static' (Q/DQ, calibrated activation ranges) or 'dynamic'.")
    method: str = ""
    per_channel: bool = True
    texts: int = 0
    source: str = Field("", description="Where the calibration texts came from.")
    excluded_nodes: int = 0
    activations: str = Field("", description="Static: 's8' (symmetric, for TensorRT) or 'u8' (asymmetric, fast "
                                             "on x86 CPUs) activations; weights are always s8 per channel.")

    @property
    def rows_alone(self) -> bool:
        """Dynamic quantization computes activation scales at run time over the whole input, padding and
        neighbours included: such a graph is served and scored one unpadded row at a time, so that a row's
        result never depends on its batch."""
        return self.mode == "dynamic"


class PruningInfo(BaseModel):
    heads_pruned: int
    heads_total: int
    method: str
    per_layer: dict[str, list[int]] = Field(default_factory=dict, description="Layer index -> pruned head indices.")


class AccuracyReport(BaseModel):
    """The build's accuracy gate: entity-level F1 on a labelled held-out split, against the PyTorch checkpoint."""

    dataset: str
    sentences: int
    f1: float
    reference_f1: float = Field(description="F1 of the (unpruned) PyTorch checkpoint on the same sentences.")
    max_f1_drop: float = Field(description="Largest accepted drop, in F1 points (x100).")
    measured_on: str = "artifact"


class Fallback(BaseModel):
    """The build installed a higher precision than the target asked for, because the gate refused the lower one."""

    requested_precision: Precision
    reason: str


class ModelManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    name: str
    version: str
    labels: list[str] = Field(min_length=2, description="Class index -> tag, e.g. ['O', 'B-person', ...].")
    tagging_scheme: TaggingScheme
    max_sequence_length: int = Field(gt=2, description="Longest input in tokens, special tokens included.")
    precision: Precision
    model_format: str = "onnx"
    model_file: str = "model.onnx"
    model_sha256: str
    opset: int
    inputs: list[str] = Field(description="Triton input tensors, all INT64 [batch, sequence].")
    output: str = "logits"
    tokenizer_file: str = TOKENIZER_FILE
    tokenizer_sha256: str
    cjk_pieces: CjkPieces | None = Field(
        None, description="How the tokenizer cuts CJK ideographs (isolated: one piece each, exact spans); "
        "checked at gateway start. Absent in manifests built before it was recorded.")
    source_checkpoint: str
    package_versions: dict[str, str]
    parity: ParityReport
    created_at: datetime
    # Added with the build targets (issue 4); defaults keep older manifests loadable.
    target: str = Field("onnx-fp32", description="Build target, e.g. onnx-int8 or trt-fp16.")
    onnxruntime_version: str | None = None
    engine: EngineInfo | None = Field(None, description="Set for tensorrt_plan artifacts.")
    calibration: CalibrationInfo | None = None
    pruning: PruningInfo | None = None
    accuracy: AccuracyReport | None = None
    fallback: Fallback | None = None

    @property
    def rows_alone(self) -> bool:
        """Whether the graph is served (and scored) one unpadded row at a time: CalibrationInfo.rows_alone."""
        return self.calibration is not None and self.calibration.rows_alone

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> ModelManifest:
        return cls.model_validate_json((directory / MANIFEST_FILE).read_text())


def latest_version_dir(model_dir: Path) -> Path | None:
    """Triton's default version policy serves the highest numeric version."""
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, key=lambda p: int(p.name), default=None)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

