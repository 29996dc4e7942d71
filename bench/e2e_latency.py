"""End-to-end latency of one Recognize call, as ratios against baselines measured in the same run.

    .venv/bin/python bench/e2e_latency.py --repository model_repository --model wnut16

Three paths on the same sentences, interleaved round by round so machine noise hits all alike:
  ort      ONNX Runtime in this process (tokenized input ready): the model's own cost
  triton   tritonclient gRPC straight to Triton (tokenized input ready): + Triton + Python backend
  gateway  ner.v1 Recognize over gRPC to ner-gateway (raw text): + tokenize, decode, second hop
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import tritonclient.grpc as triton_grpc

from ner_gateway.artifact.manifest import ModelManifest, latest_version_dir
from ner_gateway.core.batching import InputEncoder
from ner_gateway.core.compatibility import load_tokenizer, window_stride
from ner_gateway.core.windowing import plan_windows
from ner_gateway.net import free_port
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.triton.process import EmbeddedTriton

SENTENCES = [
    "Barack Obama and Angela Merkel met in Berlin before flying to New York on Tuesday.",
    "Just bought the new iPhone at the Apple store on Fifth Avenue, loving it!",
    "Watching the Lakers beat the Celtics at Staples Center with @mike tonight #NBA",
    "Microsoft and Google are hiring engineers in London and Seattle.",
]


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.array(samples) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="wnut16")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--batch", type=int, default=1, help="texts per call")
    parser.add_argument("--json-out", type=Path)
    return parser.parse_args(argv)


def summarise(samples: dict[str, list[float]], args: argparse.Namespace,
              feeds: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """The result JSON: per path (seconds per call) its percentiles, the p50 ratios between paths, the setup."""
    result: dict[str, Any] = {name: percentiles(s) for name, s in samples.items()}
    result["ratios_p50"] = {
        "gateway/triton": result["gateway"]["p50_ms"] / result["triton"]["p50_ms"],
        "gateway/ort": result["gateway"]["p50_ms"] / result["ort"]["p50_ms"],
        "triton/ort": result["triton"]["p50_ms"] / result["ort"]["p50_ms"],
    }
    result["setup"] = {"model": args.model, "rounds": args.rounds, "texts_per_call": args.batch,
                       "median_tokens": statistics.median(a.shape[1] for f in feeds for a in [f["input_ids"]])}
    return result


def main() -> None:
    args = parse_args()

    version_dir = latest_version_dir(args.repository / args.model)
    manifest = ModelManifest.read(version_dir)
    # The gateway's own tokenizer path (checksum-checked, windows planned as it plans them).
    tokenizer = load_tokenizer(version_dir, manifest)
    stride = window_stride(tokenizer, None, manifest.name)
    encoder = InputEncoder(tokenizer.special, manifest.inputs)
    texts = [[SENTENCES[(i + j) % len(SENTENCES)] for j in range(args.batch)] for i in range(len(SENTENCES))]
    feeds = []
    for batch in texts:
        tokens = tokenizer.tokenize(batch)
        feeds.append(encoder.windows(tokens, plan_windows(tokens, tokenizer.window_capacity, stride)))

    session = ort.InferenceSession(str(version_dir / manifest.model_file), providers=["CPUExecutionProvider"])
    triton = EmbeddedTriton(args.repository)
    loop = asyncio.new_event_loop()  # one loop owns the Triton process from start to stop
    loop.run_until_complete(triton.start())
    port = free_port()
    gateway = subprocess.Popen([str(Path(sys.executable).parent / "ner-gateway"), "serve", "--model-repository",
                                str(args.repository), "--triton-url", triton.grpc_url, "--port", str(port),
                                "--log-level", "WARNING"])
    try:
        subprocess.run([str(Path(sys.executable).parent / "ner-gateway"), "health", "--address",
                        f"127.0.0.1:{port}", "--wait", "60"], check=True, capture_output=True)
        client = triton_grpc.InferenceServerClient(triton.grpc_url)
        stub = ner_pb2_grpc.NerServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))

        def run_ort(i: int) -> None:
            session.run(["logits"], feeds[i])

        def run_triton(i: int) -> None:
            inputs = []
            for name, array in feeds[i].items():
                tensor = triton_grpc.InferInput(name, list(array.shape), "INT64")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            client.infer(args.model, inputs, outputs=[triton_grpc.InferRequestedOutput("logits")])

        def run_gateway(i: int) -> None:
            stub.Recognize(ner_pb2.RecognizeRequest(texts=texts[i], model=args.model), timeout=30)

        paths = {"ort": run_ort, "triton": run_triton, "gateway": run_gateway}
        for _ in range(10):  # warm-up
            for run in paths.values():
                run(0)
        samples: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(args.rounds):
            for name, run in paths.items():
                start = time.perf_counter()
                run(r % len(texts))
                samples[name].append(time.perf_counter() - start)
    finally:
        gateway.terminate()
        gateway.wait(30)
        loop.run_until_complete(triton.stop())
        loop.close()

    result = summarise(samples, args, feeds)
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
