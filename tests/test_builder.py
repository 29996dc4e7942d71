"""ner-builder build: a real tiny checkpoint through ONNX export, the parity gate and the Triton entry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ner_builder.build import BuildOptions, BuildResult, build_model
from ner_builder.cli import main
from ner_builder.errors import BuildError
from ner_gateway.artifact.manifest import ModelManifest, Precision, sha256_file
from ner_gateway.artifact.schemes import TaggingScheme, detect_tagging_scheme

from conftest import TINY_LABELS, TINY_MAX_LENGTH

VERSION_FILES = {"model.onnx", "model.py", "tokenizer.json", "labels.json", "manifest.json"}
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def _build_cli(checkpoint: Path, repository: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        main, ["build", str(checkpoint), "--repository", str(repository), *args], catch_exceptions=False
    )
    return result.exit_code, result.output


def _entries(repository: Path) -> set[str]:
    return {p.name for p in repository.iterdir()} if repository.exists() else set()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> BuildResult:
    repository = tmp_path_factory.mktemp("repo-api")
    return build_model(tiny_checkpoint, repository, "tiny", BuildOptions())


@pytest.fixture(scope="module")
def cli_repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """Three CLI builds of one model: default version twice, then --version 7."""
    repository = tmp_path_factory.mktemp("repo-cli")
    common = ["--name", "tiny-cli", "--instances", "3", "--max-batch-size", "16", "--ort-threads", "2"]
    for extra in ([], [], ["--version", "7"]):
        code, output = _build_cli(tiny_checkpoint, repository, *common, *extra)
        assert code == 0, output
        assert json.loads(output[output.index("{"):])["parity"]["argmax_agreement"] == 1.0
    return repository


# --- layout -----------------------------------------------------------------------------------------------


def test_layout(built: BuildResult) -> None:
    version_dir = built.version_dir
    assert version_dir.name == "1"
    assert version_dir.parent.name == "tiny"
    assert {p.name for p in version_dir.iterdir()} == VERSION_FILES
    assert {p.name for p in version_dir.parent.iterdir()} == {"config.pbtxt", "1"}
    # nothing left over in the repository but the model entry
    assert _entries(version_dir.parent.parent) == {"tiny"}
    assert json.loads((version_dir / "labels.json").read_text()) == {str(i): lab for i, lab in enumerate(TINY_LABELS)}


def test_versions_from_cli(cli_repository: Path) -> None:
    model_dir = cli_repository / "tiny-cli"
    assert _entries(cli_repository) == {"tiny-cli"}
    assert _entries(model_dir) == {"config.pbtxt", "1", "2", "7"}
    for version in ("1", "2", "7"):
        assert _entries(model_dir / version) == VERSION_FILES
        assert ModelManifest.read(model_dir / version).version == version


def test_next_version_after_explicit_version(tiny_checkpoint: Path, tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    code, output = _build_cli(tiny_checkpoint, repository, "--name", "m", "--version", "7")
    assert code == 0, output
    code, output = _build_cli(tiny_checkpoint, repository, "--name", "m")
    assert code == 0, output
    assert _entries(repository / "m") == {"config.pbtxt", "7", "8"}
    first = ModelManifest.read(repository / "m" / "7").created_at
    code, output = _build_cli(tiny_checkpoint, repository, "--name", "m", "--version", "7")  # replaces 7
    assert code == 0, output
    assert _entries(repository / "m") == {"config.pbtxt", "7", "8"}
    assert _entries(repository / "m" / "7") == VERSION_FILES
    assert ModelManifest.read(repository / "m" / "7").created_at > first
    assert _entries(repository) == {"m"}



async def test_keep_versions_lets_triton_serve_old_and_new_side_by_side(tiny_checkpoint: Path,
                                                                        tmp_path: Path) -> None:
    """A rollout needs the old version serving while the new one loads: --keep-versions 2 writes a
    version_policy; without it Triton's default serves the latest version only."""
    from tritonclient.grpc import InferenceServerClient

    from ner_gateway.triton.process import EmbeddedTriton

    for _ in range(2):
        assert _build_cli(tiny_checkpoint, tmp_path, "--name", "kept", "--keep-versions", "2",
                          "--max-queue-delay-us", "250")[0] == 0
        assert _build_cli(tiny_checkpoint, tmp_path, "--name", "latest")[0] == 0
    kept = _parse_config(tmp_path / "kept")[1]
    assert kept.dynamic_batching.max_queue_delay_microseconds == 250
    assert _parse_config(tmp_path / "latest")[1].dynamic_batching.max_queue_delay_microseconds == 0
    assert kept.version_policy.WhichOneof("policy_choice") == "latest"
    assert kept.version_policy.latest.num_versions == 2
    assert not _parse_config(tmp_path / "latest")[1].HasField("version_policy")
    code, output = _build_cli(tiny_checkpoint, tmp_path, "--name", "kept", "--keep-versions", "0")
    assert code == 2 and "--keep-versions" in output

    triton = EmbeddedTriton(tmp_path)
    await triton.start()
    try:
        client = InferenceServerClient(triton.grpc_url)
        ready = {(name, version): client.is_model_ready(name, version)
                 for name in ("kept", "latest") for version in ("1", "2")}
        client.close()
    finally:
        await triton.stop()
    assert ready == {("kept", "1"): True, ("kept", "2"): True, ("latest", "1"): False, ("latest", "2"): True}


# --- config.pbtxt ---------------------------------------------------------------------------------------


def _parse_config(model_dir: Path) -> tuple[str, model_config_pb2.ModelConfig]:
    text = (model_dir / "config.pbtxt").read_text()
    return text, text_format.Parse(text, model_config_pb2.ModelConfig())


def _check_config(config: model_config_pb2.ModelConfig, name: str, max_batch: int, instances: int,
                  preferred: list[int], threads: str) -> None:
    assert config.name == name
    assert config.backend == "python"
    assert config.max_batch_size == max_batch
    assert [i.name for i in config.input] == INPUTS
    for tensor in config.input:
        assert tensor.data_type == model_config_pb2.TYPE_INT64
        assert list(tensor.dims) == [-1]
    assert len(config.output) == 1
    assert config.output[0].name == "logits"
    assert config.output[0].data_type == model_config_pb2.TYPE_FP32
    assert list(config.output[0].dims) == [-1, len(TINY_LABELS)]
    assert config.HasField("dynamic_batching")
    assert list(config.dynamic_batching.preferred_batch_size) == preferred
    assert config.dynamic_batching.max_queue_delay_microseconds == 0  # the gateway coalesces; Triton need not wait
    assert len(config.instance_group) == 1
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert config.instance_group[0].count == instances
    assert config.parameters["onnx_file"].string_value == "model.onnx"
    assert config.parameters["intra_op_num_threads"].string_value == threads


def test_config_pbtxt_api(built: BuildResult) -> None:
    text, config = _parse_config(built.version_dir.parent)
    _check_config(config, "tiny", max_batch=32, instances=2, preferred=[8, 16], threads="1")
    assert text_format.MessageToString(config) == text


def test_config_pbtxt_cli(cli_repository: Path) -> None:
    text, config = _parse_config(cli_repository / "tiny-cli")
    _check_config(config, "tiny-cli", max_batch=16, instances=3, preferred=[8, 16], threads="2")
    assert text_format.MessageToString(config) == text


def test_preferred_batch_sizes_capped_by_max_batch_size(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = _build_cli(tiny_checkpoint, tmp_path, "--name", "m", "--max-batch-size", "8")
    assert code == 0, output
    text, config = _parse_config(tmp_path / "m")
    _check_config(config, "m", max_batch=8, instances=2, preferred=[8], threads="1")
    assert text_format.MessageToString(config) == text


# --- manifest ---------------------------------------------------------------------------------------------


def test_manifest(built: BuildResult, tiny_checkpoint: Path) -> None:
    manifest = ModelManifest.read(built.version_dir)
    assert manifest == built.manifest
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    id2label = config["id2label"]
    assert manifest.labels == [id2label[str(i)] for i in range(len(id2label))] == TINY_LABELS
    assert manifest.name == "tiny"
    assert manifest.version == "1"
    assert manifest.tagging_scheme is TaggingScheme.BIO
    assert manifest.max_sequence_length == TINY_MAX_LENGTH
    assert manifest.precision is Precision.FP32
    assert manifest.inputs == INPUTS
    assert manifest.output == "logits"
    assert manifest.opset == 17
    assert manifest.model_sha256 == sha256_file(built.version_dir / "model.onnx")
    assert manifest.tokenizer_sha256 == sha256_file(built.version_dir / "tokenizer.json")
    assert manifest.source_checkpoint == str(tiny_checkpoint.resolve())
    assert set(manifest.package_versions) == {"torch", "transformers", "onnx", "onnxruntime", "tokenizers"}
    assert manifest.parity.texts == 8
    assert manifest.parity.tokens > 0
    assert manifest.parity.max_abs_logit_diff < 1e-4
    assert manifest.parity.argmax_agreement == 1.0


def test_cli_options_reach_manifest(tiny_checkpoint: Path, tmp_path: Path) -> None:
    samples = tmp_path / "samples.txt"
    samples.write_text("Paris is nice.\n\n  Berlin too  \n")
    code, output = _build_cli(tiny_checkpoint, tmp_path / "repo", "--name", "m", "--max-length", "32",
                              "--tagging-scheme", "IOB1", "--sample-texts", str(samples))
    assert code == 0, output
    manifest = ModelManifest.read(tmp_path / "repo" / "m" / "1")
    assert manifest.max_sequence_length == 32
    assert manifest.tagging_scheme is TaggingScheme.IOB1
    assert manifest.parity.texts == 2


def test_tokenizer_never_truncates_or_pads(built: BuildResult) -> None:
    saved = json.loads((built.version_dir / "tokenizer.json").read_text())
    assert "truncation" in saved and saved["truncation"] is None
    assert "padding" in saved and saved["padding"] is None


def test_onnx_matches_pytorch(built: BuildResult, tiny_checkpoint: Path) -> None:
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    model = AutoModelForTokenClassification.from_pretrained(tiny_checkpoint).eval()
    session = ort.InferenceSession(str(built.version_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == INPUTS
    long_text = " ".join(["Ada Lovelace worked with Charles Babbage in London."] * 5)
    texts = ["Ada Lovelace worked with Charles Babbage in London.", "ok", "Zürich 東京 🙂 #ner", long_text]
    batches = [tokenizer(texts[0], return_tensors="np"), tokenizer(texts, padding=True, return_tensors="np")]
    assert 40 < batches[1]["input_ids"].shape[1] <= TINY_MAX_LENGTH  # far longer than the export's trace input
    for encoded in batches:
        feeds = {name: encoded[name].astype(np.int64) for name in INPUTS}
        (onnx_logits,) = session.run(["logits"], feeds)
        with torch.no_grad():
            torch_logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        assert onnx_logits.shape == torch_logits.shape == (*feeds["input_ids"].shape, len(TINY_LABELS))
        valid = feeds["attention_mask"].astype(bool)
        np.testing.assert_allclose(onnx_logits[valid], torch_logits[valid], atol=1e-4, rtol=0)


# --- errors -----------------------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    code, output = _build_cli(tmp_path / "nope", tmp_path / "repo", "--name", "m")
    assert code == 1
    assert "does not exist" in output
    assert not (tmp_path / "repo").exists()


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    code, output = _build_cli(tmp_path / "ckpt", tmp_path / "repo", "--name", "m")
    assert code == 1
    assert "no config.json" in output


def test_bare_encoder_is_refused(minilm_dir: Path, tmp_path: Path) -> None:
    code, output = _build_cli(minilm_dir, tmp_path / "repo", "--name", "m")
    assert code == 1
    assert "not a token-classification checkpoint" in output
    assert "BertModel" in output


@pytest.mark.parametrize("name", ["bad/name", "", "-lead", "sp ace", "x" * 129])
def test_invalid_model_name(tiny_checkpoint: Path, tmp_path: Path, name: str) -> None:
    code, output = _build_cli(tiny_checkpoint, tmp_path / "repo", "--name", name)
    assert code == 1
    assert "invalid model name" in output
    assert not (tmp_path / "repo").exists()


def test_max_length_above_model_limit(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = _build_cli(tiny_checkpoint, tmp_path / "repo", "--name", "m", "--max-length", "65")
    assert code == 1
    assert "--max-length 65 exceeds the model's limit 64" in output


def test_parity_gate_fails_loudly_and_installs_nothing(built: BuildResult, tiny_checkpoint: Path) -> None:
    repository = built.version_dir.parent.parent
    before = {p.relative_to(repository) for p in repository.rglob("*")}
    assert built.manifest.parity.max_abs_logit_diff > 0.0  # otherwise atol=0 would not be a failure
    with pytest.raises(BuildError, match="differ from PyTorch"):
        build_model(tiny_checkpoint, repository, "tiny", BuildOptions(atol=0.0))
    with pytest.raises(BuildError, match="differ from PyTorch"):
        build_model(tiny_checkpoint, repository, "other", BuildOptions(atol=0.0))
    after = {p.relative_to(repository) for p in repository.rglob("*")}
    assert after == before
    assert not [p for p in repository.iterdir() if p.name.startswith(".staging-")]
    assert _entries(repository / "tiny") == {"config.pbtxt", "1"}


def test_sample_texts_file_without_texts(tiny_checkpoint: Path, tmp_path: Path) -> None:
    samples = tmp_path / "samples.txt"
    samples.write_text("\n   \n")
    code, output = _build_cli(tiny_checkpoint, tmp_path / "repo", "--name", "m", "--sample-texts", str(samples))
    assert code == 2
    assert "no texts in the file" in output
    assert not (tmp_path / "repo").exists()


def test_parity_gate_via_cli(tiny_checkpoint: Path, tmp_path: Path) -> None:
    code, output = _build_cli(tiny_checkpoint, tmp_path, "--name", "m", "--atol", "0")
    assert code == 1
    assert "differ from PyTorch" in output
    assert _entries(tmp_path) == set()


# --- tagging scheme ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "scheme"),
    [
        (TINY_LABELS, TaggingScheme.BIO),
        (["O", "B-geo-loc", "I-geo-loc", "B-person", "I-person"], TaggingScheme.BIO),
        (["O", "B-PER"], TaggingScheme.BIO),
        (["O", "I-PER", "I-LOC"], TaggingScheme.IOB1),
        (["O", "B-PER", "I-PER", "E-PER", "S-PER"], TaggingScheme.BIOES),
        (["O", "S-LOC", "E-LOC"], TaggingScheme.BIOES),
        (["O", "B-PER", "I-PER", "L-PER", "U-PER"], TaggingScheme.BILOU),
        (["O", "U-LOC"], TaggingScheme.BILOU),
        (["O", "B-PER", "M-PER", "E-PER", "S-PER"], TaggingScheme.BMES),
    ],
)
def test_detect_tagging_scheme(labels: list[str], scheme: TaggingScheme) -> None:
    assert detect_tagging_scheme(labels) is scheme
