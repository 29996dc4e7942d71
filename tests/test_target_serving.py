"""Serving a repository built for every target: the embedded CPU Triton loads the ONNX entries only, the gateway
skips what Triton does not have READY and refuses engines built for another TensorRT or GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ner_gateway.artifact.manifest import EngineInfo, ModelManifest
from ner_gateway.core.compatibility import EngineRuntime, check_engine
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.net import free_port
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.triton.process import loadable_models

from conftest import TINY_MODEL

ONNX_MODELS = ["tiny", "tiny-onnx-fp16", "tiny-onnx-int8"]
TEXT = "Ada Lovelace met Charles Babbage in London and Paris"


def test_embedded_triton_loads_only_python_backend_entries(target_repository: Path, tmp_path: Path) -> None:
    assert loadable_models(target_repository) == ONNX_MODELS
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.pbtxt").write_text("name: {")
    assert loadable_models(tmp_path) == []


def engine_manifest(target_repository: Path, **engine: object) -> ModelManifest:
    manifest = ModelManifest.read(target_repository / "tiny-trt-fp16" / "1")
    assert manifest.engine is not None
    return manifest.model_copy(update={"engine": manifest.engine.model_copy(update=engine)})


def test_engine_checks(target_repository: Path) -> None:
    rtx = engine_manifest(target_repository)
    check_engine(rtx, EngineRuntime())  # nothing configured: nothing to check
    check_engine(rtx, EngineRuntime(gpu_compute_capability="sm_89"))
    with pytest.raises(ConfigurationError, match=r"tiny-trt-fp16: its engine was built with tensorrt_rtx 1\..*"
                                                 r"Triton's TensorRT backend \(TensorRT 10.5.0\) cannot load"):
        check_engine(rtx, EngineRuntime(tensorrt_version="10.5.0"))
    with pytest.raises(ConfigurationError, match=r"built for GPU compute capability 8.0, 8.6, 8.9, 12.0, but the "
                                                 r"serving GPU is 9.0 \(NER_GPU_COMPUTE_CAPABILITY\)"):
        check_engine(rtx, EngineRuntime(gpu_compute_capability="90"))
    trt = engine_manifest(target_repository, library="tensorrt", version="10.5.0.18", compute_capabilities=["9.0"])
    check_engine(trt, EngineRuntime(tensorrt_version="10.5.0.18", gpu_compute_capability="9.0"))
    check_engine(trt, EngineRuntime(tensorrt_version="10.5"))  # a prefix pins major.minor only
    with pytest.raises(ConfigurationError, match=r"built with TensorRT 10.5.0.18, but the server runs TensorRT "
                                                 r"10.8.0.43 \(NER_TENSORRT_VERSION\)"):
        check_engine(trt, EngineRuntime(tensorrt_version="10.8.0.43"))
    with pytest.raises(ConfigurationError, match="does not say what built the engine"):
        check_engine(trt.model_copy(update={"engine": None}), EngineRuntime())
    assert isinstance(trt.engine, EngineInfo)


def test_gateway_serves_the_onnx_targets_and_skips_the_engines(start_gateway, target_repository: Path) -> None:
    gateway = start_gateway(target_repository, "--default-model", TINY_MODEL)
    stub = ner_pb2_grpc.NerServiceStub(gateway.channel())
    listed = stub.ListModels(ner_pb2.ListModelsRequest(), timeout=10).models
    assert [(m.name, m.precision) for m in listed] == [
        ("tiny", ner_pb2.PRECISION_FP32), ("tiny-onnx-fp16", ner_pb2.PRECISION_FP16),
        ("tiny-onnx-int8", ner_pb2.PRECISION_INT8)]
    reference = stub.Recognize(ner_pb2.RecognizeRequest(texts=[TEXT]), timeout=30).documents[0].entities
    assert reference
    for name in ONNX_MODELS[1:]:
        response = stub.Recognize(ner_pb2.RecognizeRequest(texts=[TEXT], model=name), timeout=30)
        assert response.model == name and response.documents[0].entities
        if name.endswith("fp16"):
            assert [(e.label, e.start, e.end) for e in response.documents[0].entities] == [
                (e.label, e.start, e.end) for e in reference]
    log = gateway.output()
    for name in ("tiny-trt-fp16", "tiny-trt-int8"):
        assert f"skipping model {name} version 1: Triton at" in log
        assert "does not have it READY (TensorRT engines need NVIDIA's Triton on a GPU" in log
        assert f"embedded Triton skips {name}: tensorrt_plan needs NVIDIA's Triton" in log


def test_gateway_refuses_engines_built_for_another_tensorrt(target_repository: Path) -> None:
    env = {**os.environ, "NER_TENSORRT_VERSION": "10.5.0.18"}
    result = subprocess.run(
        [str(Path(sys.executable).parent / "ner-gateway"), "serve", "--model-repository", str(target_repository),
         "--port", str(free_port())], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "Error: tiny-trt-fp16: its engine was built with tensorrt_rtx" in result.stderr
    assert "rebuild it with `ner-builder build --target trt-...`" in result.stderr
