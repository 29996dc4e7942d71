"""What a served model's own compute costs per sentence: its ONNX graph in this process, one thread, no Triton.

    .venv/bin/python bench/model_cost.py --repository R --model near-free --batches 1,3,6,16

WNUT sentences as they come, tokenized as the gateway does, in batches padded to their longest row, on one
ONNX Runtime thread (each Triton instance's setting), measured twice: hot (one run straight after another, as a
loop in one process runs them) and cold (caches flushed before each run by writing a buffer larger than the last
level cache, as a served call finds them after the gateway's, Triton's and the clients' work in between). A
small graph's served runs cost what the cold figure says; the stubs' CPU per sentence in ``bench/throughput.py``
less it is what Triton's Python backend costs around the model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from throughput import ort_session, padded_batches, text_feeds, wnut_texts  # bench/throughput.py

from ner_gateway.artifact.manifest import ModelManifest, latest_version_dir


def cpu_ms_per_sentence(session: ort.InferenceSession, batches: list[dict[str, np.ndarray]],
                        flush: np.ndarray | None) -> float:
    """Thread CPU per sentence over ``batches``, three passes; with ``flush``, caches are flushed before each run."""
    spent, sentences = 0.0, 0
    for _ in range(3):
        for batch in batches:
            if flush is not None:
                flush += 1  # writes every cache line of a buffer bigger than the caches: the next run starts cold
            started = time.thread_time()
            session.run(None, batch)
            spent += time.thread_time() - started
            sentences += len(batch["input_ids"])
    return round(spent * 1000 / sentences, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--batches", default="1,3,6,16", help="rows per ONNX Runtime call")
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--flush-mib", type=int, default=64, help="buffer written before each cold run")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    version_dir = latest_version_dir(args.repository / args.model)
    manifest = ModelManifest.read(version_dir)
    feeds = text_feeds(version_dir, manifest, wnut_texts(args.texts))
    session = ort_session(version_dir / manifest.model_file, threads=1)
    flush = np.zeros(args.flush_mib * 2**20 // 8)
    hot: dict[str, float] = {}
    cold: dict[str, float] = {}
    for size in (int(b) for b in args.batches.split(",")):
        batches, _ = padded_batches(feeds, sort=False, size=size)
        for batch in batches[:5]:  # warm
            session.run(None, batch)
        hot[str(size)] = cpu_ms_per_sentence(session, batches, None)
        cold[str(size)] = cpu_ms_per_sentence(session, batches, flush)
    summary = {"model": args.model, "cpu_ms_per_sentence_by_batch": hot, "cold_cpu_ms_per_sentence_by_batch": cold}
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
