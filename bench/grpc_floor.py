"""The floor of Python's gRPC stack under a flood: what no gateway code can go below on these cores.

    .venv/bin/python bench/grpc_floor.py --seconds 10

A ``grpc.aio`` server with the gateway's service and nothing else (no interceptors, no model, no Triton), whose
handler refuses every call at once with RESOURCE_EXHAUSTED and the retry hint, in its own process; the callers of
``bench/soak.py flood`` that call again at once (256, 100 ms deadlines) in this one. Reported: calls by code, the
refusals' latency as the callers see it, and each process's CPU in cores and per call. Beside the gateway's own
flood (``bench/soak.py flood``), the difference is what the gateway adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from soak import FloodTally, callers, cpu_cores  # bench/soak.py
from throughput import percentiles, process_stat, wnut_texts  # bench/throughput.py

SERVER = """
import asyncio, sys
import grpc
from ner_gateway.pb.ner.v1 import ner_pb2_grpc

class Refusing(ner_pb2_grpc.NerServiceServicer):
    async def Recognize(self, request, context):
        context.set_trailing_metadata((("grpc-retry-pushback-ms", "200"),))
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "at capacity")

async def main():
    server = grpc.aio.server()
    ner_pb2_grpc.add_NerServiceServicer_to_server(Refusing(), server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--deadline-ms", type=float, default=100.0)
    parser.add_argument("--json-out", type=Path, help="e.g. bench/results/grpc_floor.json")
    args = parser.parse_args()

    from ner_gateway.net import free_port

    address = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen([sys.executable, "-c", SERVER, address], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        tally = FloodTally()

        def cpu() -> dict[str, float]:
            return {"server": process_stat(server.pid)[1], "callers": process_stat(os.getpid())[1]}

        before, started = cpu(), time.monotonic()
        asyncio.run(callers(address, "", wnut_texts(1000), args.clients, args.seconds, args.deadline_ms / 1000,
                            tally.record))
        elapsed = time.monotonic() - started
        cores = cpu_cores(before, cpu(), elapsed)
    finally:
        server.terminate()
        server.wait(30)
    codes, refused_s = tally.codes, tally.refused_s
    calls_per_s = sum(codes.values()) / elapsed
    if not calls_per_s:
        raise SystemExit(f"no call ended in {elapsed:.1f} s")
    result: dict[str, Any] = {
        "setup": {"clients": args.clients, "seconds": args.seconds, "deadline_ms": args.deadline_ms},
        "codes": codes,
        "calls_per_s": round(calls_per_s, 1),
        "resource_exhausted_ms": percentiles(refused_s) if refused_s else None,
        "cpu_cores": cores,
        "cpu_ms_per_call": {name: round(value * 1000 / calls_per_s, 3) for name, value in cores.items()},
    }
    print(json.dumps(result, indent=2))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
