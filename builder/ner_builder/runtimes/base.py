"""What a runtime declares: how a target's gated ONNX graph becomes a Triton model entry, and how it is checked.

A runtime is one module of this package (registered in ``runtimes/__init__.py``); build, verify and the
repository layout ask it and never name it. Its targets are ``<name>-<precision>`` for each of its precisions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from tritonclient.grpc import model_config_pb2

from ner_builder.engine import EngineOptions
from ner_builder.triton_config import ServingOptions
from ner_gateway.artifact.manifest import EngineInfo, ModelManifest, Precision

ONNX_FILE = "model.onnx"


@dataclass(frozen=True)
class Int8Graph:
    """The int8 graph a runtime serves: quantization mode ("static" Q/DQ, "dynamic") and activation type."""

    mode: str
    activation: str  # "s8" or "u8"; weights are always s8

    @property
    def key(self) -> str:
        return f"int8-{self.mode}-{self.activation}"


@dataclass(frozen=True)
class ArtifactRequest:
    """What a runtime builds one artifact from."""

    graph: Path  # the ONNX graph that passed the accuracy gate
    directory: Path  # the staged version folder to write the artifact's files into
    max_length: int  # the longest input in tokens the gateway may send
    serving: ServingOptions
    engine: EngineOptions


@dataclass(frozen=True)
class Built:
    """What building the artifact adds to its manifest."""

    max_sequence_length: int  # may be below the request's when the artifact was built for less
    engine: EngineInfo | None = None


class Runtime(ABC):
    name: ClassVar[str]  # target prefix: <name>-<precision>; never renamed (models and manifests carry it)
    precisions: ClassVar[tuple[Precision, ...]]  # fp32 first: the order targets are listed in
    # manifest.model_format: what the gateway keys on (it never imports ner_builder)
    model_format: ClassVar[str]
    model_file: ClassVar[str]  # the file Triton serves (manifest.model_file, hashed into model_sha256)
    required_files: ClassVar[tuple[str, ...]]  # what an installed version folder must hold
    # Whether the gateway's embedded CPU Triton (Python backend only) serves it; otherwise it needs NVIDIA's
    # Triton, and the embedded one skips its entry by its config.pbtxt.
    embedded_triton: ClassVar[bool]
    # Whether ONNX Runtime on this CPU runs the artifact itself. If not, the gate and `verify` score the ONNX
    # graph it was built from instead, and the manifest's parity and accuracy say so in ``measured_on``.
    runs_on_cpu: ClassVar[bool]
    measured_on: ClassVar[str] = "artifact"

    @abstractmethod
    def int8_graph(self, int8_mode: str) -> Int8Graph:
        """The int8 graph this runtime needs, given ``--int8-mode``."""

    @abstractmethod
    def build(self, request: ArtifactRequest) -> Built:
        """Write the artifact's files (``required_files`` but the manifest) into ``request.directory``."""

    @abstractmethod
    def config(self, manifest: ModelManifest, serving: ServingOptions) -> model_config_pb2.ModelConfig:
        """The model's config.pbtxt, from its manifest."""

    @abstractmethod
    def scored_graph(self, version_dir: Path, manifest: ModelManifest) -> Path:
        """The ONNX file `verify` scores: the artifact, or the graph it was built from."""

    @abstractmethod
    def describe(self, manifest: ModelManifest) -> str:
        """What runs the artifact, for `verify`'s runtime column."""

    def __repr__(self) -> str:
        return f"<runtime {self.name}>"
