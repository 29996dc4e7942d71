"""Soak and flood: the served path under long and under excessive load, in bounded runs.

    .venv/bin/python bench/soak.py soak --repository model_repository --model wnut16 --minutes 5
    .venv/bin/python bench/soak.py flood --repository model_repository --model wnut16 --seconds 20

One embedded Triton and one ``ner-gateway serve`` in front of it (its default settings), callers in this
process sending one WNUT tweet per call.

soak   --clients (64) callers without pause for --minutes, cut into --slice-s slices. Per slice: calls, errors by
       status code, p50/p99, and the resident memory (RSS) of the gateway, tritonserver and its Python-backend
       stubs. Reported: errors in all, the p50 spread over the slices (max/min), and RSS growth from the end of
       the first slice (warm-up: models loaded, pools and caches filled) to the end.
flood  three times, each against a fresh gateway: callers that call again at once whatever the answer; callers
       that, refused, wait the server's retry hint (grpc-retry-pushback-ms) before their next call; and callers
       on a channel with the Python client's retry policy (gRPC retries after the hint, within the deadline),
       calling again once a call ends. Each time the gateway runs unloaded first (--unloaded-clients callers,
       30 s deadlines, --unloaded-s: its answers per second), then --clients (256) callers with --deadline-ms
       (100) deadlines for --seconds. Per flood: calls by status code, answers per second against the unloaded
       rate, the share of the calls not answered that were refused (RESOURCE_EXHAUSTED), how fast refusals came
       back, the windows Triton ran (its inference_count) against the answers (work for calls that had given up
       shows as the difference), and each process's CPU (cores).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from throughput import children, percentiles, process_stat, server_cpu_s, start_gateway, triton_counts, wnut_texts

from ner_gateway.client import service_config
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def server_rss_mb(gateway_pid: int, triton_pid: int) -> dict[str, float]:
    """RSS of the gateway, tritonserver and its stubs (tritonserver's child processes), in MiB."""
    stubs = 0.0
    for stub in children(triton_pid):
        try:
            stubs += rss_mb(stub)
        except OSError:
            continue  # a stub that ended meanwhile
    return {"gateway": round(rss_mb(gateway_pid), 1), "tritonserver": round(rss_mb(triton_pid), 1),
            "stubs": round(stubs, 1)}


async def callers(address: str, model: str, texts: list[str], clients: int, seconds: float, deadline_s: float,
                  on_result: Any, mix_texts: int = 1, pushback: bool = False, retry_policy: bool = False) -> None:
    """``clients`` callers sending one text per call, back to back, for ``seconds``; with ``mix_texts`` > 1 every
    other caller sends that many texts per call; with ``pushback``, a caller refused with a retry hint
    (grpc-retry-pushback-ms) waits that long first; with ``retry_policy``, the channel has the Python client's
    service config (gRPC itself retries RESOURCE_EXHAUSTED and UNAVAILABLE after the hint, within the deadline).
    ``model``: comma-separated models, spread over the callers."""
    stop_at = time.monotonic() + seconds
    models = model.split(",")
    options = [("grpc.service_config", service_config())] if retry_policy else []
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        stub = ner_pb2_grpc.NerServiceStub(channel)

        async def caller(k: int) -> None:
            i = k
            count = mix_texts if k % 2 else 1
            while time.monotonic() < stop_at:
                batch = [texts[(i + j) % len(texts)] for j in range(count)]
                started = time.monotonic()
                wait_ms = 0
                try:
                    await stub.Recognize(ner_pb2.RecognizeRequest(texts=batch, model=models[k // 2 % len(models)]),
                                         timeout=deadline_s)
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                    if pushback:
                        wait_ms = next((int(v) for key, v in e.trailing_metadata() or ()
                                        if key == "grpc-retry-pushback-ms"), 0)
                on_result(code, time.monotonic() - started, count)
                i += clients * count
                if wait_ms:
                    await asyncio.sleep(wait_ms / 1000)

        await asyncio.gather(*(caller(k) for k in range(clients)))


def soak(args: argparse.Namespace, address: str, gateway_pid: int, triton_pid: int, texts: list[str]) -> dict:
    slices: list[dict[str, Any]] = []
    loop = asyncio.new_event_loop()
    try:
        for index in range(max(1, round(args.minutes * 60 / args.slice_s))):
            codes: dict[str, int] = {}
            latencies: list[float] = []
            by_count: dict[int, list[float]] = {}

            def record(code: str, seconds: float, count: int, codes: dict[str, int] = codes,
                       latencies: list[float] = latencies, by_count: dict[int, list[float]] = by_count) -> None:
                codes[code] = codes.get(code, 0) + 1
                if code == "OK":
                    latencies.append(seconds)
                    by_count.setdefault(count, []).append(seconds)

            loop.run_until_complete(callers(address, args.model, texts, args.clients, args.slice_s, 30.0, record,
                                            args.mix_texts))
            cell = slice_cell(index, codes, latencies, by_count, server_rss_mb(gateway_pid, triton_pid))
            print(json.dumps(cell), flush=True)
            slices.append(cell)
    finally:
        loop.close()
    return soak_summary(slices)


def slice_cell(index: int, codes: dict[str, int], latencies: list[float], by_count: dict[int, list[float]],
               rss: dict[str, float]) -> dict[str, Any]:
    """One soak slice: calls by code, the OK calls' latency (seconds) overall and by texts per call, RSS (MiB)."""
    return {"slice": index, "calls": sum(codes.values()), "codes": codes, **percentiles(latencies),
            "p50_ms_by_texts_per_call": {n: percentiles(values)["p50_ms"] for n, values in sorted(by_count.items())},
            "rss_mb": rss}


def soak_summary(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """The soak's result: its slices, errors and calls in all, the p50 spread and RSS growth after the first."""
    p50s = [s["p50_ms"] for s in slices[1:] or slices]
    kinds = sorted({n for s in slices for n in s["p50_ms_by_texts_per_call"]})
    smaller_first = all(s["p50_ms_by_texts_per_call"][kinds[0]] < s["p50_ms_by_texts_per_call"][kinds[-1]]
                        for s in slices if len(s["p50_ms_by_texts_per_call"]) == len(kinds)) if len(kinds) > 1 else None
    warm, end = slices[0]["rss_mb"], slices[-1]["rss_mb"]
    return {
        "slices": slices,
        "errors": sum(n for s in slices for code, n in s["codes"].items() if code != "OK"),
        "calls": sum(s["calls"] for s in slices),
        "p50_ms_after_warmup": {"min": min(p50s), "max": max(p50s), "max / min": round(max(p50s) / min(p50s), 2)},
        "fewer_texts_answered_first_in_every_slice": smaller_first,
        "rss_growth_after_warmup": {k: round(end[k] / warm[k] - 1, 4) for k in warm if warm[k]},
        "rss_total_growth_after_warmup": round(sum(end.values()) / sum(warm.values()) - 1, 4),
    }


def cpu_cores(before: dict[str, float], after: dict[str, float], seconds: float) -> dict[str, float]:
    """Each process's CPU between two readings, in cores."""
    return {name: round((after[name] - before.get(name, 0.0)) / seconds, 2) for name in after}


@dataclass
class FloodTally:
    """Calls by status code and how long each refusal (RESOURCE_EXHAUSTED) took, as ``callers`` reports them."""

    codes: dict[str, int] = field(default_factory=dict)
    refused_s: list[float] = field(default_factory=list)

    def record(self, code: str, seconds: float, texts_per_call: int) -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if code == "RESOURCE_EXHAUSTED":
            self.refused_s.append(seconds)


def flood(args: argparse.Namespace, start: Callable[[], tuple[subprocess.Popen[bytes], str]], triton_pid: int,
          triton_url: str, texts: list[str]) -> dict[str, Any]:
    """Each kind of callers against a gateway of its own (so that neither inherits what the other taught it),
    first unloaded, then flooded."""
    result: dict[str, Any] = {}
    loop = asyncio.new_event_loop()
    try:
        for name, pushback, retry_policy in (("callers_call_again_at_once", False, False),
                                             ("callers_wait_the_retry_hint", True, False),
                                             ("callers_with_the_client_retry_policy", False, True)):
            gateway, address = start()
            try:
                unloaded, flooded = FloodTally(), FloodTally()
                loop.run_until_complete(callers(address, args.model, texts, args.unloaded_clients, args.unloaded_s,
                                                30.0, unloaded.record))
                unloaded_per_s = unloaded.codes.get("OK", 0) / args.unloaded_s

                def processes(gateway_pid: int = gateway.pid) -> dict[str, float]:
                    return {**server_cpu_s(gateway_pid, triton_pid), "callers": process_stat(os.getpid())[1]}

                before, cpu_before, started = triton_counts(triton_url, args.model)[0], processes(), time.monotonic()
                loop.run_until_complete(callers(address, args.model, texts, args.clients, args.seconds,
                                                args.deadline_ms / 1000, flooded.record, pushback=pushback,
                                                retry_policy=retry_policy))
                cores = cpu_cores(cpu_before, processes(), time.monotonic() - started)
                loop.run_until_complete(asyncio.sleep(1.0))  # calls still in Triton end
                ran = triton_counts(triton_url, args.model)[0] - before
            finally:
                gateway.terminate()
                gateway.wait(60)
            result[name] = {"unloaded": {"clients": args.unloaded_clients, "codes": unloaded.codes,
                                         "answers_per_s": round(unloaded_per_s, 1)},
                            **flood_summary(flooded.codes, flooded.refused_s, ran, args.deadline_ms, args.seconds,
                                            unloaded_per_s),
                            "cpu_cores": cores}
            print(json.dumps({name: result[name]}), flush=True)
    finally:
        loop.close()
    return result


def flood_summary(codes: dict[str, int], refused_s: list[float], ran: int, deadline_ms: float, seconds: float,
                  unloaded_per_s: float) -> dict[str, Any]:
    """One flood's result: calls by code, answers per second against the unloaded rate, the share of the calls
    not answered that were refused (RESOURCE_EXHAUSTED), Triton's windows (``ran``) per answer, how fast refusals
    came back."""
    ok = codes.get("OK", 0)
    unanswered = sum(codes.values()) - ok
    return {
        "codes": codes,
        "answers_per_s": round(ok / seconds, 1),
        "answers_of_unloaded": round(ok / seconds / unloaded_per_s, 3) if unloaded_per_s else None,
        "refused_of_unanswered": round(codes.get("RESOURCE_EXHAUSTED", 0) / unanswered, 3) if unanswered else None,
        "triton_windows_run": ran,
        "triton_windows_per_answer": round(ran / ok, 2) if ok else None,
        "resource_exhausted_ms": percentiles(refused_s) if refused_s else None,
        "share_refused_within_deadline": round(float(np.mean(np.asarray(refused_s) < deadline_ms / 1000)), 3)
        if refused_s else None,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["soak", "flood"])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--model", default="wnut16", help="comma-separated models, spread over the callers")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--minutes", type=float, default=5.0, help="soak: how long")
    parser.add_argument("--slice-s", type=float, default=30.0, help="soak: seconds per slice")
    parser.add_argument("--seconds", type=float, default=20.0, help="flood: how long")
    parser.add_argument("--deadline-ms", type=float, default=100.0, help="flood: each call's deadline")
    parser.add_argument("--unloaded-clients", type=int, default=16, help="flood: callers measuring the unloaded rate")
    parser.add_argument("--unloaded-s", type=float, default=10.0, help="flood: how long the unloaded rate is measured")
    parser.add_argument("--mix-texts", type=int, default=1,
                        help="soak: every other caller sends this many texts per call (the others one)")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args(argv)
    args.clients = args.clients or (64 if args.mode == "soak" else 256)
    return args


def main() -> None:
    args = parse_args()

    from ner_gateway.triton.process import EmbeddedTriton

    texts = wnut_texts(1000)
    loop = asyncio.new_event_loop()  # one loop owns the Triton process from start to stop
    triton = EmbeddedTriton(args.repository)
    loop.run_until_complete(triton.start())
    gateway = None
    try:
        assert triton.pid is not None
        setup = {"mode": args.mode, "model": args.model, "clients": args.clients}
        if args.mode == "soak":
            gateway, address = start_gateway(args.repository, triton.grpc_url, {"NER_METRICS_PORT": "0"})
            result = {"setup": {**setup, "minutes": args.minutes, "slice_s": args.slice_s, "mix_texts": args.mix_texts},
                      **soak(args, address, gateway.pid, triton.pid, texts)}
        else:
            result = {"setup": {**setup, "seconds": args.seconds, "deadline_ms": args.deadline_ms},
                      **flood(args, lambda: start_gateway(args.repository, triton.grpc_url, {"NER_METRICS_PORT": "0"}),
                              triton.pid, triton.grpc_url, texts)}
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(60)
        loop.run_until_complete(triton.stop())
        loop.close()
    summary = {k: v for k, v in result.items() if k != "slices"}
    print(json.dumps(summary, indent=2))
    out = args.json_out or Path(f"bench/results/{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
