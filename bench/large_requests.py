"""Small requests while a large one runs: does the gateway's event loop stay free for them?

    .venv/bin/python bench/large_requests.py --repository model_repository --model wnut16 \
        --json-out bench/results/large_requests.json

One embedded Triton, two gateways in front of it that differ only in NER_CPU_OFFLOAD_CHARS: "offload" (the
default: requests of 2,000+ characters tokenize and decode in a worker thread) and "inline" (everything on
the event loop). Per round and gateway, interleaved: small callers alone for --duration seconds, then the
same callers while one client sends one text of --large-chars characters, until it is answered. Two kinds
of small callers: grpc.health.v1 Check, which the gateway's event loop answers by itself (its latency is
the loop's), and Recognize of one WNUT tweet, which also waits in Triton's queue behind the large request's
windows. Reported: p50/p99/max of each kind in both phases (medians over rounds) and the large call's
latency. Small callers pause 10 ms between calls, so a fast phase makes more calls than a stalled one: read
p50 with that in mind; health's max is the longest the loop kept a call waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from throughput import percentiles, start_gateway, wnut_texts  # bench/throughput.py, beside this script

from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc


async def run_phase(address: str, model: str, texts: list[str], large: str | None, clients: int,
                    duration_s: float) -> dict[str, list[float]]:
    """Small callers for ``duration_s``, or (with ``large``) for as long as one large call takes."""
    out: dict[str, list[float]] = {"health": [], "recognize": [], "large": []}
    async with grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        ner = ner_pb2_grpc.NerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        done = asyncio.Event()

        async def small(kind: str, k: int) -> None:
            i = k
            while not done.is_set():
                start = time.perf_counter()
                if kind == "health":
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=120)
                else:
                    await ner.Recognize(ner_pb2.RecognizeRequest(texts=[texts[i % len(texts)]], model=model),
                                        timeout=120)
                out[kind].append(time.perf_counter() - start)
                i += clients
                await asyncio.sleep(0.01)  # ~100 calls/s per caller: a probe, not a load

        async def stop_after() -> None:
            if large is None:
                await asyncio.sleep(duration_s)
            else:
                start = time.perf_counter()
                await ner.Recognize(ner_pb2.RecognizeRequest(texts=[large], model=model), timeout=300)
                out["large"].append(time.perf_counter() - start)
            done.set()

        await asyncio.gather(stop_after(), *(small(kind, k) for kind in ("health", "recognize")
                                              for k in range(clients)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="wnut16")
    parser.add_argument("--clients", type=int, default=2, help="small callers of each kind")
    parser.add_argument("--large-chars", type=int, default=100_000)
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json-out", type=Path, default=Path("bench/results/large_requests.json"))
    args = parser.parse_args()

    from ner_gateway.triton.process import EmbeddedTriton

    texts = wnut_texts(512)
    large = " ".join(texts * (args.large_chars // sum(map(len, texts)) + 1))[: args.large_chars]
    loop = asyncio.new_event_loop()  # one loop owns the Triton process from start to stop
    triton = EmbeddedTriton(args.repository)
    loop.run_until_complete(triton.start())
    gateways: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    cells: dict[str, dict[str, list[dict[str, float]]]] = {}
    try:
        for name, offload_chars in (("offload", 2000), ("inline", 10**9)):
            gateways[name] = start_gateway(args.repository, triton.grpc_url,
                                           {"NER_CPU_OFFLOAD_CHARS": str(offload_chars), "NER_METRICS_PORT": "0"})
        for _, address in gateways.values():  # warm-up
            loop.run_until_complete(run_phase(address, args.model, texts, None, args.clients, 2.0))
        for _ in range(args.rounds):
            for name, (_, address) in gateways.items():
                for phase, payload in (("alone", None), ("beside_large", large)):
                    samples = loop.run_until_complete(run_phase(address, args.model, texts, payload, args.clients,
                                                                args.duration))
                    cell: dict[str, float] = {}
                    for kind in ("health", "recognize"):
                        cell.update({f"{kind}_{k}": v for k, v in percentiles(samples[kind]).items()})
                        cell[f"{kind}_max_ms"] = round(1000 * max(samples[kind]), 2)  # the longest loop stall
                    if samples["large"]:
                        cell["large_ms"] = round(1000 * samples["large"][0], 1)
                    cells.setdefault(name, {}).setdefault(phase, []).append(cell)
    finally:
        for process, _ in gateways.values():
            process.terminate()
            process.wait(30)
        loop.run_until_complete(triton.stop())
        loop.close()

    result: dict[str, Any] = {"setup": {"model": args.model, "clients": args.clients, "large_chars": len(large),
                                        "duration_s": args.duration, "rounds": args.rounds}}
    for name, phases in cells.items():
        medians = {phase: {key: round(statistics.median(c[key] for c in rounds), 2) for key in rounds[-1]}
                   for phase, rounds in phases.items()}
        alone, beside = medians["alone"], medians["beside_large"]
        for kind in ("health", "recognize"):
            for q in ("p50", "p99"):
                ratio = beside[f"{kind}_{q}_ms"] / alone[f"{kind}_{q}_ms"]
                medians[f"{kind}_{q} beside_large / alone"] = round(ratio, 1)
        result[name] = medians
    print(json.dumps(result, indent=2))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
