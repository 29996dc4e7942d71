"""What a served model's own compute costs per sentence: its ONNX graph in this process, one thread, no Triton.

    .venv/bin/python bench/model_cost.py --repository R --model near-free --batches 1,6,16

WNUT sentences as they come, tokenized as the gateway does, in batches padded to their longest row, on one
ONNX Runtime thread (each Triton instance's setting). The stubs' CPU per sentence in ``bench/throughput.py``
less this is what Triton's Python backend costs around the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import onnxruntime as ort
from throughput import padded_batches, text_feeds, wnut_texts  # bench/throughput.py

from ner_gateway.artifact.manifest import ModelManifest, latest_version_dir


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", default="1,6,16", help="rows per ONNX Runtime call")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    version_dir = latest_version_dir(args.repository / args.model)
    manifest = ModelManifest.read(version_dir)
    feeds = text_feeds(version_dir, manifest, wnut_texts(args.texts))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(version_dir / manifest.model_file), options,
                                   providers=["CPUExecutionProvider"])
    result: dict[str, float] = {}
    for size in (int(b) for b in args.batches.split(",")):
        batches, _ = padded_batches(feeds, sort=False, size=size)
        for batch in batches[:5]:  # warm
            session.run(None, batch)
        started, sentences = time.process_time(), 0
        for _ in range(3):
            for batch in batches:
                session.run(None, batch)
                sentences += len(batch["input_ids"])
        result[str(size)] = round((time.process_time() - started) * 1000 / sentences, 3)
    summary = {"model": args.model, "cpu_ms_per_sentence_by_batch": result}
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
