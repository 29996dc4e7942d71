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

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"


class TaggingScheme(StrEnum):
    BIO = "BIO"
    IOB1 = "IOB1"
    BIOES = "BIOES"
    BILOU = "BILOU"
    BMES = "BMES"


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
    source_checkpoint: str
    package_versions: dict[str, str]
    parity: ParityReport
    created_at: datetime

    def write(self, directory: Path) -> Path:
        path = directory / MANIFEST_FILE
        path.write_text(self.model_dump_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: Path) -> ModelManifest:
        return cls.model_validate_json((directory / MANIFEST_FILE).read_text())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def detect_tagging_scheme(labels: list[str]) -> TaggingScheme:
    """Infer the tagging scheme from the label set (the builder can override it)."""
    prefixes = {label.split("-", 1)[0] for label in labels if label != "O" and "-" in label}
    if "M" in prefixes:
        return TaggingScheme.BMES
    if prefixes & {"L", "U"}:
        return TaggingScheme.BILOU
    if prefixes & {"E", "S"}:
        return TaggingScheme.BIOES
    if prefixes == {"I"}:
        return TaggingScheme.IOB1
    return TaggingScheme.BIO
