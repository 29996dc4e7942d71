"""``onnx-*``: the ONNX graph run by a Python-backend model with ONNX Runtime on CPU (the embedded Triton).

    REPOSITORY/NAME/VERSION/{model.onnx, model.py, tokenizer.json, labels.json, manifest.json}
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2

from ner_builder.repository import write_python_model
from ner_builder.runtimes.base import ONNX_FILE, ArtifactRequest, Built, Int8Graph, Runtime
from ner_builder.triton_config import ServingOptions, python_onnx_config
from ner_gateway.artifact.manifest import MANIFEST_FILE, ModelManifest, Precision


class OnnxRuntime(Runtime):
    name = "onnx"
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    model_format = "onnx"
    model_file = ONNX_FILE
    required_files = (ONNX_FILE, "model.py", MANIFEST_FILE)
    embedded_triton = True
    runs_on_cpu = True

    def int8_graph(self, int8_mode: str) -> Int8Graph:
        # CPUs run u8 activations x s8 weights fastest; dynamic (the default) or static as asked.
        return Int8Graph(int8_mode, "u8")

    def build(self, request: ArtifactRequest) -> Built:
        shutil.copyfile(request.graph, request.directory / ONNX_FILE)
        write_python_model(request.directory)
        return Built(request.max_length)

    def config(self, manifest: ModelManifest, serving: ServingOptions) -> model_config_pb2.ModelConfig:
        return python_onnx_config(manifest.name, manifest.inputs, manifest.output, len(manifest.labels), serving,
                                  manifest.rows_alone)

    def scored_graph(self, version_dir: Path, manifest: ModelManifest) -> Path:
        return version_dir / manifest.model_file

    def describe(self, manifest: ModelManifest) -> str:
        return "onnxruntime"
