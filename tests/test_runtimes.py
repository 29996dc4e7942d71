"""The runtime registry: every runtime is one module declaring its targets, graph, files and config, and build,
verify and the repository layout ask it instead of naming it."""

from __future__ import annotations

import inspect
from pathlib import Path
from types import ModuleType

import pytest

from ner_builder import build, gate, repository, targets, verify
from ner_builder.runtimes import RUNTIMES
from ner_builder.runtimes.base import Int8Graph, Runtime
from ner_builder.targets import ALL_TARGETS, DEFAULT_TARGET, TARGET_NAMES, Target, parse_target
from ner_builder.triton_config import ServingOptions, to_pbtxt
from ner_gateway.artifact.manifest import MANIFEST_FILE, ModelManifest, Precision
from ner_gateway.triton.process import loadable_models

DECLARED = ("name", "precisions", "model_format", "model_file", "required_files", "embedded_triton", "runs_on_cpu",
            "measured_on")


def test_every_registered_runtime_is_a_complete_module_of_its_own() -> None:
    assert list(RUNTIMES) == ["onnx", "trt"]  # target names carry these: never renamed
    modules = set()
    for name, runtime in RUNTIMES.items():
        assert isinstance(runtime, Runtime) and not inspect.isabstract(type(runtime))
        assert all(hasattr(runtime, attribute) for attribute in DECLARED)
        assert runtime.name == name and runtime.precisions[0] is Precision.FP32
        assert {runtime.model_file, MANIFEST_FILE} <= set(runtime.required_files)
        assert runtime.runs_on_cpu == (runtime.measured_on == "artifact")
        modules.add(type(runtime).__module__)
    assert len(modules) == len(RUNTIMES) and all(m.startswith("ner_builder.runtimes.") for m in modules)


def test_targets_derive_from_the_registry() -> None:
    assert ALL_TARGETS == [Target(r, p) for r in RUNTIMES.values() for p in r.precisions]
    assert TARGET_NAMES == ["onnx-fp32", "onnx-fp16", "onnx-int8", "trt-fp32", "trt-fp16", "trt-int8"]
    for name in TARGET_NAMES:
        target = parse_target(name)
        assert target.name == name and target.runtime is RUNTIMES[name.split("-")[0]]
        assert all(f.runtime is target.runtime for f in target.fallbacks())
    assert DEFAULT_TARGET == parse_target("onnx-fp32") and DEFAULT_TARGET.model_name("m") == "m"


def test_each_runtime_names_the_int8_graph_it_needs() -> None:
    onnx, trt = RUNTIMES["onnx"], RUNTIMES["trt"]
    assert onnx.int8_graph("dynamic") == Int8Graph("dynamic", "u8")  # --int8-mode, CPU's u8 activations
    assert onnx.int8_graph("static") == Int8Graph("static", "u8")
    assert trt.int8_graph("dynamic") == trt.int8_graph("static") == Int8Graph("static", "s8")


@pytest.mark.parametrize("module", [build, verify, repository, targets, gate])
def test_build_verify_and_the_layout_never_name_a_runtime(module: ModuleType) -> None:
    source = inspect.getsource(module).lower()
    assert not [word for word in ("is_engine", "tensorrt", "model.plan", "trt") if word in source]


def test_each_runtime_installs_its_files_manifest_and_config(target_repository: Path) -> None:
    serving = ServingOptions(max_batch_size=8)  # as the fixture built it
    seen = set()
    for model_dir in sorted(p for p in target_repository.iterdir() if p.is_dir()):
        version_dir = model_dir / "1"
        manifest = ModelManifest.read(version_dir)
        runtime = parse_target(manifest.target).runtime
        seen.add(runtime.name)
        assert set(runtime.required_files) <= {p.name for p in version_dir.iterdir()}
        assert (manifest.model_format, manifest.model_file) == (runtime.model_format, runtime.model_file)
        assert manifest.parity.measured_on == runtime.measured_on
        assert runtime.scored_graph(version_dir, manifest).is_file()
        config = runtime.config(manifest, serving)
        assert to_pbtxt(config) == (model_dir / "config.pbtxt").read_text()
        assert (config.backend == "python") == runtime.embedded_triton
        assert not config.platform or config.default_model_filename == runtime.model_file
    assert seen == set(RUNTIMES)  # the fixture builds a target of every runtime
    # What the gateway's embedded Triton loads (it keys on config.pbtxt, never on ner_builder) matches the flag.
    assert loadable_models(target_repository) == sorted(
        p.parent.name for p in target_repository.glob("*/config.pbtxt")
        if parse_target(ModelManifest.read(p.parent / "1").target).runtime.embedded_triton)


def test_verify_describes_what_runs_each_artifact(target_repository: Path) -> None:
    onnx = ModelManifest.read(target_repository / "tiny" / "1")
    engine = ModelManifest.read(target_repository / "tiny-trt-fp16" / "1")
    assert RUNTIMES["onnx"].describe(onnx) == "onnxruntime"
    assert RUNTIMES["trt"].describe(engine).startswith("tensorrt_plan (tensorrt_rtx 1.")
