"""``trt-*``: a TensorRT plan for Triton's tensorrt_plan backend (NVIDIA's Triton on a GPU).

    REPOSITORY/NAME/VERSION/{model.plan, model.onnx, tokenizer.json, labels.json, manifest.json}

``ner_builder.engine`` builds the plan from the gated ONNX graph, which stays beside it: nothing here can run
the engine, so the gate and `verify` score that graph instead and the manifest says so.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from ner_builder.engine import build_engine
from ner_builder.runtimes.base import ONNX_FILE, ArtifactRequest, Built, Int8Graph, Runtime
from ner_builder.triton_config import TENSORRT_PLATFORM, ServingOptions, tensorrt_plan_config
from ner_gateway.artifact.manifest import MANIFEST_FILE, ModelManifest, Precision

PLAN_FILE = "model.plan"


class TensorRtRuntime(Runtime):
    name = "trt"
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    model_format = TENSORRT_PLATFORM
    model_file = PLAN_FILE
    required_files = (PLAN_FILE, ONNX_FILE, MANIFEST_FILE)
    embedded_triton = False
    runs_on_cpu = False
    measured_on = "onnx graph (onnxruntime CPU); the engine itself was not run (needs a GPU)"

    def int8_graph(self, int8_mode: str) -> Int8Graph:
        # TensorRT has no dynamic quantization and needs symmetric (s8) activations: always static Q/DQ.
        return Int8Graph("static", "s8")

    def build(self, request: ArtifactRequest) -> Built:
        shutil.copyfile(request.graph, request.directory / ONNX_FILE)
        # The profiles' batch maximum is the served one: Triton never sends a larger batch.
        options = replace(request.engine, max_batch_size=request.serving.max_batch_size)
        engine = build_engine(request.graph, request.max_length, options)
        (request.directory / PLAN_FILE).write_bytes(engine.plan)
        return Built(engine.max_sequence_length, engine.info)

    def config(self, manifest: ModelManifest, serving: ServingOptions) -> model_config_pb2.ModelConfig:
        return tensorrt_plan_config(manifest.name, manifest.inputs, manifest.output, len(manifest.labels), serving)

    def scored_graph(self, version_dir: Path, manifest: ModelManifest) -> Path:
        return version_dir / (manifest.engine.onnx_file if manifest.engine else ONNX_FILE)

    def describe(self, manifest: ModelManifest) -> str:
        engine = manifest.engine
        return f"{manifest.model_format} ({engine.library} {engine.version})" if engine else manifest.model_format
