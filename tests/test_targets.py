"""Build targets on the tiny checkpoint: fp16/int8 ONNX graphs, TensorRT-RTX engines, the F1 gate and its
fallback, head pruning and ``ner-builder verify``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ner_builder import precision
from ner_builder.build import BuildOptions, build_model
from ner_builder.cli import main
from ner_builder.datasets import NerDataset
from ner_builder.engine import EngineOptions, import_library, profile_shapes
from ner_builder.errors import BuildError
from ner_builder.targets import parse_targets
from ner_builder.triton_config import ServingOptions
from ner_gateway.artifact.manifest import ModelManifest, Precision, sha256_file

from conftest import TINY_LABELS, TINY_MAX_LENGTH, TINY_MODEL

ONNX_FILES = {"model.onnx", "model.py", "tokenizer.json", "labels.json", "manifest.json"}
ENGINE_FILES = {"model.plan", "model.onnx", "tokenizer.json", "labels.json", "manifest.json"}
MODELS = {
    "tiny": ("onnx-fp32", Precision.FP32),
    "tiny-onnx-int8": ("onnx-int8", Precision.INT8),
    "tiny-onnx-fp16": ("onnx-fp16", Precision.FP16),
    "tiny-trt-fp16": ("trt-fp16", Precision.FP16),
    "tiny-trt-int8": ("trt-int8", Precision.INT8),
}


def cli(*args: str) -> tuple[int, str]:
    """Exit code and stdout (on failure: everything, the error is on stderr; progress bars too)."""
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def read_config(model_dir: Path) -> model_config_pb2.ModelConfig:
    text = (model_dir / "config.pbtxt").read_text()
    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert text_format.MessageToString(config) == text  # round trip through Triton's own proto
    return config


def ops(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


# --- targets, profiles, library ---------------------------------------------------------------------------


def test_parse_targets_names_and_fallback_chains() -> None:
    targets = parse_targets("onnx-int8, trt-fp16,onnx-int8,onnx-fp32")
    assert [t.name for t in targets] == ["onnx-int8", "trt-fp16", "onnx-fp32"]
    assert [t.model_name("m") for t in targets] == ["m-onnx-int8", "m-trt-fp16", "m"]
    assert [t.name for t in parse_targets("onnx-int8")[0].fallbacks()] == ["onnx-fp16", "onnx-fp32"]
    assert [t.name for t in parse_targets("trt-int8")[0].fallbacks()] == ["trt-fp16", "trt-fp32"]
    assert parse_targets("onnx-fp32")[0].fallbacks() == []
    with pytest.raises(BuildError, match="unknown target 'onnx-int4'"):
        parse_targets("onnx-int4")
    with pytest.raises(BuildError, match="no build target"):
        parse_targets(" , ")


def test_profiles_one_per_bucket_capped_at_the_model_limit() -> None:
    shapes = profile_shapes((128, 32, 512, 64), max_length=100, max_batch=16, opt_batch=8)
    assert [(p.min, p.opt, p.max) for p in shapes] == [
        ([1, 1], [8, 32], [16, 32]), ([1, 1], [8, 64], [16, 64]), ([1, 1], [8, 100], [16, 100])]
    assert profile_shapes((32,), 64, max_batch=4, opt_batch=8)[0].opt == [4, 32]
    with pytest.raises(BuildError, match="positive"):
        profile_shapes((0, 32), 64, 8, 8)


def test_missing_tensorrt_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    def absent(name: str):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(importlib, "import_module", absent)
    with pytest.raises(BuildError) as info:
        import_library("auto")
    message = str(info.value)
    assert "pip install 'triton-ner[tensorrt]'" in message and "triton-ner[tensorrt-rtx]" in message
    assert "same TensorRT version as the Triton" in message
    with pytest.raises(BuildError, match="unknown TensorRT library"):
        import_library("tensorflow")


# --- the repository every target builds -------------------------------------------------------------------


def test_every_target_is_its_own_model_entry(target_repository: Path) -> None:
    assert {p.name for p in target_repository.iterdir()} == set(MODELS)
    for name, (target, precision_) in MODELS.items():
        version_dir = target_repository / name / "1"
        engine = target.startswith("trt")
        # (__pycache__: Triton's Python backend imported model.py when a serving test ran first)
        files = {p.name for p in version_dir.iterdir()} - {"__pycache__"}
        assert files == (ENGINE_FILES if engine else ONNX_FILES)
        manifest = ModelManifest.read(version_dir)
        assert (manifest.name, manifest.target, manifest.precision) == (name, target, precision_)
        assert manifest.fallback is None and manifest.accuracy is None  # no dataset: no F1 gate
        assert manifest.model_sha256 == sha256_file(version_dir / manifest.model_file)
        assert manifest.onnxruntime_version
        config = read_config(target_repository / name)
        assert config.name == name and config.max_batch_size == 8
        assert [i.name for i in config.input] == manifest.inputs
        assert all(i.data_type == model_config_pb2.TYPE_INT64 and list(i.dims) == [-1] for i in config.input)
        assert config.output[0].data_type == model_config_pb2.TYPE_FP32
        assert list(config.output[0].dims) == [-1, len(TINY_LABELS)]
        assert list(config.dynamic_batching.preferred_batch_size) == [8]
        kind = model_config_pb2.ModelInstanceGroup.KIND_GPU if engine else model_config_pb2.ModelInstanceGroup.KIND_CPU
        assert [(g.kind, g.count) for g in config.instance_group] == [(kind, 2)]
        if engine:
            assert (config.platform, config.backend) == ("tensorrt_plan", "")
            assert config.default_model_filename == "model.plan"
            assert manifest.model_format == "tensorrt_plan"
        else:
            assert (config.backend, config.platform) == ("python", "")
            assert manifest.model_format == "onnx" and manifest.engine is None


def test_engines_are_serialized_with_one_profile_per_bucket(target_repository: Path) -> None:
    for name in ("tiny-trt-fp16", "tiny-trt-int8"):
        version_dir = target_repository / name / "1"
        manifest = ModelManifest.read(version_dir)
        engine = manifest.engine
        assert engine is not None and engine.library == "tensorrt_rtx" and engine.version.startswith("1.")
        assert engine.strongly_typed and engine.compute_capabilities == ["8.0", "8.6", "8.9", "12.0"]
        assert [(p.min, p.opt, p.max) for p in engine.profiles] == [
            ([1, 1], [8, size], [8, size]) for size in (16, 32, TINY_MAX_LENGTH)]
        assert manifest.max_sequence_length == TINY_MAX_LENGTH
        assert engine.onnx_sha256 == sha256_file(version_dir / "model.onnx")
        assert "engine itself was not run" in manifest.parity.measured_on
        plan = (version_dir / "model.plan").read_bytes()
        # A serialized TensorRT(-RTX) plan: magic ("ftrt" TensorRT, "vtrt" TensorRT-RTX), then its own size.
        assert plan[:4] in (b"ftrt", b"vtrt")
        assert struct.unpack_from("<Q", plan, 16)[0] == len(plan)
    fp16_graph = target_repository / "tiny-onnx-fp16" / "1" / "model.onnx"
    assert sha256_file(target_repository / "tiny-trt-fp16" / "1" / "model.onnx") == sha256_file(fp16_graph)
    assert "QuantizeLinear" in ops(target_repository / "tiny-trt-int8" / "1" / "model.onnx")


def test_fp16_graph_keeps_types_at_the_boundary_and_sensitive_ops_in_fp32(target_repository: Path) -> None:
    model = onnx.shape_inference.infer_shapes(onnx.load(str(target_repository / "tiny-onnx-fp16" / "1" / "model.onnx")))
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    assert [types[i.name] for i in graph.input] == [onnx.TensorProto.INT64] * 3
    assert types["logits"] == onnx.TensorProto.FLOAT
    sensitive = [n for n in graph.node if n.op_type in ("LayerNormalization", "Softmax")]
    assert len(sensitive) >= 2 * 2 + 1  # two per layer plus the embeddings' LayerNorm
    assert all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in sensitive)
    matmul_weights = [n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in types]
    assert matmul_weights and any(types[w] == onnx.TensorProto.FLOAT16 for w in matmul_weights)


@pytest.mark.parametrize(("model", "activations"), [("tiny-trt-int8", "s8"), ("tiny-static-onnx-int8", "u8")])
def test_int8_graph_is_per_channel_qdq_with_the_ffn_kept_float(target_repository: Path, int8_repository: Path,
                                                               model: str, activations: str) -> None:
    """Engines get symmetric int8 activations (TensorRT's rule), the static CPU graph (``--int8-mode static``)
    u8 activations; weights s8."""
    repository = target_repository if model.startswith("tiny-trt") else int8_repository
    path = repository / model / "1" / "model.onnx"
    graph = onnx.load(str(path))
    initializers = {i.name: onnx.numpy_helper.to_array(i) for i in graph.graph.initializer}
    quantize = [n for n in graph.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert quantize
    zero_points = [initializers[n.input[2]] for n in quantize if len(n.input) > 2 and n.input[2] in initializers]
    weights = [z for z in zero_points if z.ndim == 1 and z.size > 1]  # per-channel: the weights
    assert weights and all(z.dtype == np.int8 and not z.any() for z in weights)  # symmetric weights
    activation_zero_points = [z for z in zero_points if z.size == 1]
    expected = np.int8 if activations == "s8" else np.uint8
    assert activation_zero_points and all(z.dtype == expected for z in activation_zero_points)
    if activations == "s8":
        assert not any(z.any() for z in activation_zero_points)
    producers = {o: n for n in graph.graph.node for o in n.output}
    ffn = [n for n in graph.graph.node
           if n.op_type == "MatMul" and "output/dense" in n.name and "attention" not in n.name]
    assert len(ffn) == 2 and all(producers[n.input[0]].op_type != "DequantizeLinear" for n in ffn)
    manifest = ModelManifest.read(path.parent)
    assert manifest.calibration is not None
    assert (manifest.calibration.mode, manifest.calibration.method, manifest.calibration.excluded_nodes,
            manifest.calibration.activations) == ("static", "minmax", 2, activations)
    assert "built-in texts" in manifest.calibration.source and manifest.calibration.texts > 20
    assert manifest.parity.argmax_agreement >= 0.95


def test_dynamic_int8_and_calibration_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    texts = tmp_path / "calibration.txt"
    texts.write_text("Paris is nice\n\nAda Lovelace met Charles Babbage in London\n")
    code, output = cli("build", str(tiny_checkpoint), "--repository", str(tmp_path / "repo"), "--name", "m",
                       "--target", "onnx-int8", "--calibration-texts", str(texts))
    assert code == 0, output
    manifest = ModelManifest.read(tmp_path / "repo" / "m-onnx-int8" / "1")
    assert manifest.calibration is not None and manifest.calibration.mode == "dynamic"  # the default
    assert manifest.calibration.rows_alone and manifest.calibration.texts == 0
    assert "MatMulInteger" in ops(tmp_path / "repo" / "m-onnx-int8" / "1" / "model.onnx")
    assert {p.name for p in (tmp_path / "repo").iterdir()} == {"m-onnx-int8"}
    code, output = cli("build", str(tiny_checkpoint), "--repository", str(tmp_path / "repo2"), "--name", "m",
                       "--target", "onnx-int8", "--int8-mode", "static", "--calibration-texts", str(texts))
    assert code == 0, output
    calibration = ModelManifest.read(tmp_path / "repo2" / "m-onnx-int8" / "1").calibration
    assert calibration is not None and calibration.texts == 2 and str(texts) in calibration.source


# --- the F1 gate -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pseudo_wnut16(tiny_checkpoint: Path) -> NerDataset:
    """Sentences labelled with the tiny model's own predictions: the PyTorch checkpoint scores F1 1.0."""
    from ner_builder import evaluate
    from ner_builder.checkpoint import load_checkpoint

    words = "Ada Lovelace met Charles Babbage in London and Paris with Apple Google Tim Cook at Zürich #ner".split()
    rng = np.random.default_rng(7)
    sentences = [list(rng.choice(words, size=int(rng.integers(3, 12)))) for _ in range(160)]
    checkpoint = load_checkpoint(tiny_checkpoint)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    ref = evaluate.reference(checkpoint, "pseudo", sentences, None, names, TINY_MAX_LENGTH)
    return NerDataset("wnut16", sentences, evaluate.word_tags(ref.data, ref.logits, checkpoint.labels), TINY_LABELS)


@pytest.fixture
def gate_dataset(monkeypatch: pytest.MonkeyPatch, pseudo_wnut16: NerDataset) -> NerDataset:
    import ner_builder.datasets

    monkeypatch.setattr(ner_builder.datasets, "load_dataset", lambda name: pseudo_wnut16)
    return pseudo_wnut16


@pytest.fixture
def damaged_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every int8 graph comes out with its quantized weights zeroed: it must fail the gate."""
    original = precision.quantize_int8

    def damaged(source: Path, target: Path, *args, **kwargs):
        info = original(source, target, *args, **kwargs)
        model = onnx.load(str(target))
        for init in model.graph.initializer:
            if init.data_type == onnx.TensorProto.INT8 and len(init.dims) == 2:
                init.CopyFrom(onnx.numpy_helper.from_array(np.zeros(tuple(init.dims), np.int8), init.name))
        onnx.save(model, str(target))
        return info

    monkeypatch.setattr(precision, "quantize_int8", damaged)


def test_damaged_int8_falls_back_to_fp16_and_says_so(tiny_checkpoint: Path, tmp_path: Path, gate_dataset,
                                                      damaged_int8) -> None:
    repository = tmp_path / "repo"
    code, output = cli("build", str(tiny_checkpoint), "--repository", str(repository), "--name", TINY_MODEL,
                       "--target", "onnx-fp32,onnx-int8,trt-int8", "--dataset", "wnut16", "--max-f1-drop", "5",
                       "--seq-buckets", "32,64", "--trt-library", "tensorrt_rtx", "--max-batch-size", "4")
    assert code == 0, output
    fallbacks = [line for line in output.splitlines() if line.startswith("FALLBACK")]
    assert len(fallbacks) == 2
    assert fallbacks[0].startswith("FALLBACK tiny-onnx-int8 (onnx-int8): int8 refused, F1 ")
    assert "points below the PyTorch checkpoint's 1.0000 (max drop 5.0); trying fp16" in fallbacks[0]
    assert fallbacks[1].startswith("FALLBACK tiny-trt-int8 (trt-int8): int8 refused")
    assert "fallback from int8" in output and "not run (needs GPU)" in output  # the verify table
    summary = json.loads(output[output.index("{"):])
    assert [(a["model"], a["precision"]) for a in summary["artifacts"]] == [
        ("tiny", "fp32"), ("tiny-onnx-int8", "fp16"), ("tiny-trt-int8", "fp16")]

    for name in ("tiny-onnx-int8", "tiny-trt-int8"):
        version_dir = repository / name / "1"
        manifest = ModelManifest.read(version_dir)
        assert manifest.target == name.removeprefix("tiny-") and manifest.precision is Precision.FP16
        assert manifest.fallback is not None and manifest.fallback.requested_precision is Precision.INT8
        assert "int8: F1" in manifest.fallback.reason
        assert manifest.accuracy is not None and manifest.accuracy.reference_f1 == 1.0
        assert manifest.accuracy.f1 >= 0.95 and manifest.calibration is None
        assert "QuantizeLinear" not in ops(version_dir / "model.onnx")  # the fp16 graph was installed
    assert ModelManifest.read(repository / "tiny-trt-int8" / "1").engine.profiles[-1].max == [4, 64]
    fp32 = ModelManifest.read(repository / "tiny" / "1")
    assert fp32.fallback is None and fp32.accuracy.f1 == 1.0 and fp32.accuracy.dataset == "wnut16"


def test_undamaged_int8_passes_the_gate(tiny_checkpoint: Path, tmp_path: Path, gate_dataset) -> None:
    result = build_model(tiny_checkpoint, tmp_path, "m", BuildOptions(
        targets=tuple(parse_targets("onnx-int8")), dataset="wnut16", max_f1_drop=5.0, int8_mode="static"))
    (artifact,) = result.artifacts
    assert artifact.manifest.precision is Precision.INT8 and artifact.manifest.fallback is None
    assert result.fallbacks == [] and result.reference_f1 == 1.0
    calibration = artifact.manifest.calibration
    assert calibration is not None and "wnut16 training split" in calibration.source
    assert calibration.texts == 136  # the 85% of 160 sentences training never held out


def test_gate_refuses_when_no_precision_passes_and_installs_nothing(tiny_checkpoint: Path, tmp_path: Path,
                                                                    gate_dataset) -> None:
    options = BuildOptions(targets=tuple(parse_targets("onnx-fp32,onnx-fp16")), dataset="wnut16", max_f1_drop=0.0,
                           prune_heads=6)
    with pytest.raises(BuildError, match=r"tiny \(onnx-fp32\): no precision passes the accuracy gate: fp32: F1"):
        build_model(tiny_checkpoint, tmp_path / "repo", TINY_MODEL, options)
    assert [p.name for p in (tmp_path / "repo").iterdir()] == []


def test_gate_without_dataset_uses_argmax_agreement(tiny_checkpoint: Path, tmp_path: Path, damaged_int8) -> None:
    result = build_model(tiny_checkpoint, tmp_path, "m", BuildOptions(targets=tuple(parse_targets("onnx-int8"))))
    assert result.manifest.precision is Precision.FP16
    assert "argmax agreement with PyTorch" in result.fallbacks[0] and "no --dataset" in result.fallbacks[0]


# --- pruning ----------------------------------------------------------------------------------------------


def test_prune_heads_removes_the_least_important_heads(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from ner_builder.checkpoint import load_checkpoint
    from ner_builder.prune import choose_heads, head_counts, head_importance, prune_heads

    checkpoint = load_checkpoint(tiny_checkpoint)
    feeds = [dict(checkpoint.tokenizer(["Ada Lovelace met Charles Babbage in London"], return_tensors="np"))]
    feeds = [{k: v.astype(np.int64) for k, v in f.items()} for f in feeds]
    importance = head_importance(checkpoint.model, feeds)
    assert [len(s) for s in importance] == [4, 4] and all(float(s.sum()) > 0 for s in importance)
    chosen = choose_heads(importance, 6)
    assert sorted(len(h) for h in chosen.values()) == [3, 3]  # one head stays in each layer
    with pytest.raises(BuildError, match=r"choose 1\.\.6"):
        choose_heads(importance, 7)
    info = prune_heads(checkpoint.model, 2, feeds)
    assert head_counts(checkpoint.model) == [4 - len(info.per_layer.get(str(i), [])) for i in range(2)]
    assert sum(head_counts(checkpoint.model)) == 6 and info.heads_total == 8

    result = build_model(tiny_checkpoint, tmp_path, "pruned", BuildOptions(prune_heads=3))
    manifest = result.manifest
    assert manifest.pruning is not None and manifest.pruning.heads_pruned == 3
    assert manifest.parity.max_abs_logit_diff < 1e-4  # the export matches the pruned PyTorch model
    # The graph's query/key/value weights of a layer that lost k of its 4 heads are [32, 8 * (4 - k)].
    shapes = [tuple(i.dims) for i in onnx.load(str(result.version_dir / "model.onnx")).graph.initializer]
    narrowed = sorted(d[1] for d in shapes if len(d) == 2 and d[0] == 32 and d[1] < 32 and d[1] % 8 == 0)
    assert narrowed == sorted(8 * (4 - len(heads)) for heads in manifest.pruning.per_layer.values() for _ in range(3))
    assert sum(len(heads) for heads in manifest.pruning.per_layer.values()) == 3


# --- verify -----------------------------------------------------------------------------------------------


def test_verify_table_and_json(target_repository: Path, gate_dataset) -> None:
    code, output = cli("verify", str(target_repository / TINY_MODEL), "--dataset", "wnut16", "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["labelled"] and report["reference"]["f1"] == 1.0 and report["sentences"] == 24
    rows = {row["model"]: row for row in report["artifacts"]}
    assert set(rows) == set(MODELS)
    fp32 = rows["tiny"]["scores"]
    assert fp32["max_abs_logit_diff"] < 1e-4 and fp32["argmax_agreement"] == 1.0 and fp32["f1"] == 1.0
    assert rows["tiny-onnx-fp16"]["scores"]["argmax_agreement"] > 0.99
    assert rows["tiny-onnx-int8"]["scores"]["f1"] > 0.5
    for name in ("tiny-trt-fp16", "tiny-trt-int8"):
        assert rows[name]["ran"] is False and rows[name]["scores"] is None
        assert rows[name]["graph_scores"]["f1"] > 0.5 and "tensorrt_rtx" in rows[name]["runtime"]
    code, table = cli("verify", str(target_repository / TINY_MODEL), "--dataset", "wnut16")
    assert code == 0, table
    assert "pytorch checkpoint" in table and table.count("not run (needs GPU)") == 2


def test_verify_texts_and_errors(target_repository: Path, tmp_path: Path) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("Ada Lovelace met Charles Babbage in London\nParis\n")
    code, output = cli("verify", str(target_repository / "tiny-onnx-fp16"), "--texts", str(texts), "--json")
    assert code == 0, output
    report = json.loads(output)
    assert not report["labelled"] and report["sentences"] == 2
    (row,) = report["artifacts"]
    assert row["model"] == "tiny-onnx-fp16" and row["scores"]["f1"] is None
    assert row["scores"]["f1_vs_reference"] == 1.0
    code, output = cli("verify", str(target_repository / "nope"), "--texts", str(texts))
    assert code == 1 and "no ner-builder artifacts named nope" in output
    code, output = cli("verify", str(target_repository / TINY_MODEL))
    assert code == 1 and "exactly one of --dataset or --texts" in output


def test_serving_options_reach_every_config(tiny_checkpoint: Path, tmp_path: Path) -> None:
    build_model(tiny_checkpoint, tmp_path, "m", BuildOptions(
        targets=tuple(parse_targets("onnx-fp16,trt-fp16")),
        serving=ServingOptions(max_batch_size=16, instances=2, preferred_batch_sizes=[4, 16]),
        engine=EngineOptions(seq_buckets=(64,), library="tensorrt_rtx")))
    for name in ("m-onnx-fp16", "m-trt-fp16"):
        config = read_config(tmp_path / name)
        assert config.max_batch_size == 16 and list(config.dynamic_batching.preferred_batch_size) == [4, 16]
        assert config.instance_group[0].count == 2
    assert ModelManifest.read(tmp_path / "m-trt-fp16" / "1").engine.profiles[0].max == [16, 64]
