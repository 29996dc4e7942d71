"""Served throughput under concurrency, with every baseline measured in the same run.

    .venv/bin/python bench/throughput.py --repository model_repository --models wnut16,wnut16-onnx-int8 \
        --checkpoint artifacts/wnut16-minilm --json-out bench/results/throughput.json

Paths, interleaved round by round (this machine is noisy; medians over rounds are reported):
  gateway   ner.v1 Recognize over gRPC, one WNUT text per call, N concurrent clients in client processes
  triton    the same concurrency straight to the embedded Triton's model (tritonclient, tokenized inputs)
  hf        transformers.pipeline("token-classification", batch_size=16) in-process on the checkpoint
  ort       ONNX Runtime in-process on the served graph, batches of 16 as they come / sorted by length; for
            a graph served one row at a time (dynamic int8, ``rows_alone``) also rows one at a time; and the
            single-sentence latency (one text per call), the reference for the gateway's p50 at 1 client
For each served cell: sentences/s, p50/p90/p99, Triton's average batch (inference_count / execution_count
over the cell), the gateway's stage times, and the CPU each process spent per sentence (client processes,
gateway, tritonserver, its Python-backend stubs; read from /proc, so Linux only): on a small machine the
served path's own processes share the cores with the model. A PNG of sentences/s and p99 against clients
goes beside the JSON. Triton's own perf_analyzer is not installable here; see docs/benchmarks.md for running it
elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

BATCH = 16


def wnut_texts(limit: int) -> list[str]:
    from ner_builder.datasets import load_dataset

    return [" ".join(words) for words in load_dataset("wnut16").sentences[:limit]]


# --- client processes ---------------------------------------------------------------------------------

async def _gateway_calls(address: str, model: str, texts: list[str], concurrency: int, duration_s: float,
                         offset: int, texts_per_call: int = 1) -> dict[str, list[float]]:
    import grpc

    from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

    out: dict[str, list[float]] = {"latency": [], "tokenize": [], "infer": [], "decode": []}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = ner_pb2_grpc.NerServiceStub(channel)
        end = time.perf_counter() + duration_s

        async def client(k: int) -> None:
            i = (offset + k) * texts_per_call
            while time.perf_counter() < end:
                batch = [texts[(i + j) % len(texts)] for j in range(texts_per_call)]
                start = time.perf_counter()
                reply = await stub.Recognize(ner_pb2.RecognizeRequest(texts=batch, model=model), timeout=60)
                out["latency"].append(time.perf_counter() - start)
                out["tokenize"].append(reply.timings.tokenize_us / 1e6)
                out["infer"].append(reply.timings.infer_us / 1e6)
                out["decode"].append(reply.timings.decode_us / 1e6)
                i += concurrency * texts_per_call

        await asyncio.gather(*(client(k) for k in range(concurrency)))
    out["sentences"] = [len(out["latency"]) * texts_per_call]
    return out


async def _triton_calls(url: str, model: str, feeds: list[dict[str, np.ndarray]], concurrency: int,
                        duration_s: float, offset: int, texts_per_call: int = 1) -> dict[str, list[float]]:
    import tritonclient.grpc.aio as triton_aio

    out: dict[str, list[float]] = {"latency": []}
    client = triton_aio.InferenceServerClient(url)
    end = time.perf_counter() + duration_s

    async def one(k: int) -> None:
        i = offset + k
        while time.perf_counter() < end:
            inputs = []
            for name, array in feeds[i % len(feeds)].items():
                tensor = triton_aio.InferInput(name, list(array.shape), "INT64")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            start = time.perf_counter()
            await client.infer(model, inputs, outputs=[triton_aio.InferRequestedOutput("logits")])
            out["latency"].append(time.perf_counter() - start)
            i += concurrency

    try:
        await asyncio.gather(*(one(k) for k in range(concurrency)))
    finally:
        await client.close()
    out["sentences"] = [len(out["latency"])]
    return out


def client_process(kind: str, target: str, model: str, payload: list[Any], concurrency: int, duration_s: float,
                   offset: int, texts_per_call: int = 1) -> dict[str, list[float]]:
    calls = _gateway_calls if kind == "gateway" else _triton_calls
    cpu = time.process_time()
    out = asyncio.run(calls(target, model, payload, concurrency, duration_s, offset, texts_per_call))
    out["cpu_s"] = [time.process_time() - cpu]
    return out


def load(pool: ProcessPoolExecutor, processes: int, kind: str, target: str, model: str, payload: list[Any],
         clients: int, duration_s: float, texts_per_call: int = 1) -> dict[str, list[float]]:
    """``clients`` concurrent callers spread over ``processes`` client processes for ``duration_s``; the gateway's
    callers send ``texts_per_call`` texts in each call (Triton's, one tokenized text)."""
    shares = [clients // processes + (1 if p < clients % processes else 0) for p in range(processes)]
    futures = [pool.submit(client_process, kind, target, model, payload, n, duration_s, sum(shares[:p]),
                           texts_per_call)
               for p, n in enumerate(shares) if n]
    merged: dict[str, list[float]] = {}
    for future in futures:
        for key, values in future.result().items():
            merged.setdefault(key, []).extend(values)
    return merged


def process_stat(pid: int | str) -> tuple[int, float]:
    """(parent pid, user + system CPU seconds so far, all threads) of one process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (for tritonserver: its Python-backend stubs)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if process_stat(entry)[0] == pid:
                    found.append(int(entry))
            except (OSError, ValueError):
                continue  # a process that ended meanwhile
    return found


def server_cpu_s(gateway_pid: int, triton_pid: int) -> dict[str, float]:
    """CPU seconds so far of the gateway, tritonserver and its Python-backend stubs."""
    stubs = 0.0
    for stub in children(triton_pid):
        try:
            stubs += process_stat(stub)[1]
        except (OSError, ValueError):
            continue
    return {"gateway": process_stat(gateway_pid)[1], "tritonserver": process_stat(triton_pid)[1], "stubs": stubs}


def start_gateway(repository: Path, triton_url: str, env: dict[str, str] | None = None
                  ) -> tuple[subprocess.Popen[bytes], str]:
    """``ner-gateway serve`` in front of ``triton_url`` on a free port, once it reports SERVING."""
    from ner_gateway.net import free_port

    port = free_port()
    bin_dir = Path(sys.executable).parent
    served_code = os.environ.get("BENCH_GATEWAY_PYTHONPATH")  # another tree's gateway (bench/before_after.sh)
    code = {"PYTHONPATH": served_code} if served_code else {}
    process = subprocess.Popen([str(bin_dir / "ner-gateway"), "serve", "--model-repository", str(repository),
                                "--triton-url", triton_url, "--port", str(port), "--log-level", "WARNING"],
                               env={**os.environ, **code, **(env or {})})
    address = f"127.0.0.1:{port}"
    try:
        subprocess.run([str(bin_dir / "ner-gateway"), "health", "--address", address, "--wait", "120"], check=True,
                       capture_output=True)
    except BaseException:
        process.terminate()
        process.wait(30)
        raise
    return process, address


# --- in-process baselines -----------------------------------------------------------------------------

def ort_session(path: Path, threads: int | None = None) -> Any:
    """ONNX Runtime on ``path``, its threads not spinning between runs (as the served model runs them); ``threads``:
    that many for each run (one: a Triton instance's setting), else one per core."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def text_feeds(version_dir: Path, manifest: Any, texts: list[str]) -> list[dict[str, np.ndarray]]:
    """Each text's model inputs, one window of it, tokenized and encoded as the gateway does."""
    from ner_gateway.core.batching import InputEncoder
    from ner_gateway.core.compatibility import load_tokenizer
    from ner_gateway.core.windowing import Window

    tokenizer = load_tokenizer(version_dir, manifest)
    encoder = InputEncoder(tokenizer.special, manifest.inputs)
    return [encoder.windows([t], [Window(0, 0, min(len(t), tokenizer.window_capacity))])
            for t in tokenizer.tokenize(texts)]


def padded_batches(feeds: list[dict[str, np.ndarray]], sort: bool, size: int = BATCH
                   ) -> tuple[list[dict[str, np.ndarray]], float]:
    """Batches of ``size`` single-text feeds padded to their longest, and the padding ratio (padded / real
    tokens)."""
    order = sorted(range(len(feeds)), key=lambda i: feeds[i]["input_ids"].shape[1]) if sort else range(len(feeds))
    rows = [feeds[i] for i in order]
    batches, padded, real = [], 0, 0
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        width = max(f["input_ids"].shape[1] for f in chunk)
        batches.append({name: np.concatenate([np.pad(f[name], ((0, 0), (0, width - f[name].shape[1])))
                                              for f in chunk]) for name in chunk[0]})
        padded += width * len(chunk)
        real += sum(f["input_ids"].shape[1] for f in chunk)
    return batches, padded / real


def time_ort(session: Any, batches: list[dict[str, np.ndarray]]) -> float:
    start = time.perf_counter()
    for feeds in batches:
        session.run(None, feeds)
    return sum(b["input_ids"].shape[0] for b in batches) / (time.perf_counter() - start)


def single_latency_ms(session: Any, feeds: list[dict[str, np.ndarray]], count: int = 100) -> float:
    """Median milliseconds of one text per call (the in-process reference for one client's latency)."""
    times = []
    for feed in feeds[:count]:
        start = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def time_hf(pipe: Any, texts: list[str]) -> float:
    start = time.perf_counter()
    pipe(texts, batch_size=BATCH)
    return len(texts) / (time.perf_counter() - start)


# --- the run --------------------------------------------------------------------------------------------

def percentiles(latencies: list[float]) -> dict[str, float]:
    ms = np.asarray(latencies) * 1000
    return {f"p{q}_ms": round(float(np.percentile(ms, q)), 2) for q in (50, 90, 99)}


def triton_counts(url: str, model: str) -> tuple[int, int]:
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def median_cells(cells: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: round(statistics.median(c[key] for c in cells), 2) for key in cells[0]}


def draw(sweep: dict[str, dict[int, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, by_clients in sweep.items():
        clients = sorted(by_clients)
        left.plot(clients, [by_clients[c]["sentences_per_s"] for c in clients], marker="o", label=name)
        right.plot(clients, [by_clients[c]["p99_ms"] for c in clients], marker="o", label=name)
    for axis, label in ((left, "sentences/s"), (right, "p99 latency (ms)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def served_cell(kind: str, samples: dict[str, list[float]], elapsed: float, counts_before: tuple[int, int],
                counts_after: tuple[int, int], cpu_before: dict[str, float], cpu_after: dict[str, float]
                ) -> dict[str, Any]:
    """One served cell from its callers' ``samples`` (``load``), its wall time, Triton's (inference, execution)
    counts and the server processes' CPU seconds (``server_cpu_s``) before and after."""
    executions = max(counts_after[1] - counts_before[1], 1)
    sentences = max(sum(samples["sentences"]), 1)
    cpu = {"clients": sum(samples["cpu_s"]), **{role: cpu_after[role] - cpu_before[role] for role in cpu_after}}
    if kind == "triton":
        del cpu["gateway"]
    cell = {"sentences_per_s": sum(samples["sentences"]) / elapsed,
            **percentiles(samples["latency"]),
            "triton_avg_batch": (counts_after[0] - counts_before[0]) / executions,
            **{f"cpu_ms_per_sentence_{role}": 1000 * value / sentences for role, value in cpu.items()},
            "cores_busy": sum(cpu.values()) / elapsed}
    if kind == "gateway":
        cell.update({f"{stage}_ms": 1000 * statistics.median(samples[stage])
                     for stage in ("tokenize", "infer", "decode")})
    return cell


def summarise(args: argparse.Namespace, models: list[str], sweep_clients: list[int], texts: int,
              cells: dict[str, dict[int, list[dict[str, Any]]]], baselines: dict[str, list[float]],
              latency: dict[str, list[float]], padding: dict[str, float]) -> dict[str, Any]:
    """The result JSON from every round's measurements: medians over the rounds, and the ratios of the gateway
    against the baselines, at 16 clients (or the most measured)."""
    sweep = {path: {c: median_cells(rounds) for c, rounds in by_clients.items()} for path, by_clients in cells.items()}
    base = {key: round(statistics.median(values), 1) for key, values in baselines.items()}
    single = {key: round(statistics.median(values), 2) for key, values in latency.items()}
    reference_clients = 16 if 16 in sweep_clients else max(sweep_clients)
    ratios: dict[str, float] = {}
    for model in models:
        served = sweep[f"gateway:{model}"][reference_clients]["sentences_per_s"]
        limit = base[f"ort-sorted:{model}"]
        ratios[f"gateway:{model} / ort-sorted"] = round(served / limit, 2)
        ratios[f"gateway:{model} / ort-as-they-come"] = round(served / base[f"ort-as-they-come:{model}"], 2)
        if f"triton:{model}" in sweep:
            ratios[f"gateway:{model} / triton"] = round(served / sweep[f"triton:{model}"][reference_clients]
                                                        ["sentences_per_s"], 2)
        if f"ort-rows:{model}" in base:
            ratios[f"gateway:{model} / ort-rows"] = round(served / base[f"ort-rows:{model}"], 2)
        if "hf-pipeline" in base:
            ratios[f"gateway:{model} / hf-pipeline"] = round(served / base["hf-pipeline"], 2)
            ratios[f"ort-sorted:{model} / hf-pipeline"] = round(limit / base["hf-pipeline"], 2)
        if 1 in sweep[f"gateway:{model}"]:
            ratios[f"gateway:{model} p50 at 1 client / ort-single"] = round(
                sweep[f"gateway:{model}"][1]["p50_ms"] / single[f"ort-single-ms:{model}"], 2)
        cell = sweep[f"gateway:{model}"][reference_clients]
        ratios[f"gateway:{model} p99 / p50"] = round(cell["p99_ms"] / cell["p50_ms"], 2)
    return {"setup": {"models": models, "clients": sweep_clients, "texts_per_call": args.texts_per_call,
                      "near_free": args.near_free, "duration_s": args.duration,
                      "rounds": args.rounds, "texts": texts, "client_processes": args.client_processes,
                      "ratios_at_clients": reference_clients},
            "sweep": sweep, "baselines_sentences_per_s": base, "single_sentence_latency_ms": single,
            "padding_ratio_batches_of_16": padding, "ratios": ratios}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--models", default="wnut16", help="comma-separated served models")
    parser.add_argument("--checkpoint", type=Path, help="PyTorch checkpoint for the HF pipeline baseline")
    parser.add_argument("--clients", default="1,4,16,64", help="concurrency sweep")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per served cell")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--texts", type=int, default=512, help="WNUT texts used")
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--texts-per-call", type=int, default=1,
                        help="texts in each gateway call (Triton's direct path always sends one)")
    parser.add_argument("--paths", default="gateway,triton", help="served paths measured: gateway and/or triton")
    parser.add_argument("--near-free", action="store_true",
                        help="build and serve bench/near_free.py's model (random, 2 x 64) in a temporary repository "
                             "instead of --repository/--models: the served path's own ceiling")
    parser.add_argument("--json-out", type=Path, default=Path("bench/results/throughput.json"))
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.near_free:
        import tempfile

        from near_free import NAME, build_near_free

        args.repository = build_near_free(Path(tempfile.mkdtemp(prefix="near-free-")) / "repository")
        args.models = NAME
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]

    from ner_gateway.artifact.manifest import ModelManifest, latest_version_dir
    from ner_gateway.triton.process import EmbeddedTriton

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sweep_clients = [int(c) for c in args.clients.split(",")]
    texts = wnut_texts(args.texts)
    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    sessions: dict[str, Any] = {}
    rows_alone: dict[str, bool] = {}
    for model in models:
        version_dir = latest_version_dir(args.repository / model)
        manifest = ModelManifest.read(version_dir)
        feeds[model] = text_feeds(version_dir, manifest, texts)
        sessions[model] = ort_session(version_dir / manifest.model_file)
        rows_alone[model] = manifest.rows_alone
    hf = None
    if args.checkpoint is not None:
        from transformers import pipeline

        hf = pipeline("token-classification", model=str(args.checkpoint), aggregation_strategy="simple",
                      device="cpu")

    loop = asyncio.new_event_loop()  # one loop owns the Triton process from start to stop
    triton = EmbeddedTriton(args.repository)
    loop.run_until_complete(triton.start())
    triton_pid = triton.pid
    assert triton_pid is not None
    cells: dict[str, dict[int, list[dict[str, Any]]]] = {}
    baselines: dict[str, list[float]] = {}
    latency: dict[str, list[float]] = {}
    padding: dict[str, float] = {}
    gateway: subprocess.Popen[bytes] | None = None
    pool = ProcessPoolExecutor(args.client_processes, mp_context=get_context("spawn"))
    try:
        gateway, address = start_gateway(args.repository, triton.grpc_url)
        for model in models:  # warm-up (and the client processes' imports)
            load(pool, args.client_processes, "gateway", address, model, texts, 4, 1.0, args.texts_per_call)
        for _ in range(args.rounds):
            for clients in sweep_clients:
                for model in models:
                    for kind, target, payload in (("gateway", address, texts),
                                                  ("triton", triton.grpc_url, feeds[model])):
                        if kind not in paths:
                            continue
                        before = triton_counts(triton.grpc_url, model)
                        cpu_before = server_cpu_s(gateway.pid, triton_pid)
                        started = time.perf_counter()
                        samples = load(pool, args.client_processes, kind, target, model, payload, clients,
                                       args.duration, args.texts_per_call if kind == "gateway" else 1)
                        elapsed = time.perf_counter() - started
                        cpu_after = server_cpu_s(gateway.pid, triton_pid)
                        after = triton_counts(triton.grpc_url, model)
                        cell = served_cell(kind, samples, elapsed, before, after, cpu_before, cpu_after)
                        cells.setdefault(f"{kind}:{model}", {}).setdefault(clients, []).append(cell)
            for model in models:  # in-process baselines, on the same texts
                for sort in (False, True):
                    batches, ratio = padded_batches(feeds[model], sort)
                    key = f"ort-{'sorted' if sort else 'as-they-come'}:{model}"
                    padding[key] = round(ratio, 3)
                    baselines.setdefault(key, []).append(time_ort(sessions[model], batches))
                if rows_alone[model]:  # one unpadded text per call, as such a graph is served
                    baselines.setdefault(f"ort-rows:{model}", []).append(time_ort(sessions[model], feeds[model]))
                latency.setdefault(f"ort-single-ms:{model}", []).append(single_latency_ms(sessions[model],
                                                                                          feeds[model]))
            if hf is not None:
                baselines.setdefault("hf-pipeline", []).append(time_hf(hf, texts))
    finally:
        pool.shutdown()
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        loop.run_until_complete(triton.stop())
        loop.close()

    result = summarise(args, models, sweep_clients, len(texts), cells, baselines, latency, padding)
    sweep, base, single, ratios = (result[key] for key in ("sweep", "baselines_sentences_per_s",
                                                           "single_sentence_latency_ms", "ratios"))
    roles = ("clients", "gateway", "tritonserver", "stubs")
    print(f"{'path':<34}{'clients':>8}{'sent/s':>9}{'p50':>8}{'p90':>8}{'p99':>8}{'batch':>7}   CPU ms/sentence: "
          + " ".join(f"{role:>12}" for role in roles) + f"{'cores':>7}")
    for path, by_clients in sweep.items():
        for clients, cell in sorted(by_clients.items()):
            print(f"{path:<34}{clients:>8}{cell['sentences_per_s']:>9.1f}{cell['p50_ms']:>8.1f}{cell['p90_ms']:>8.1f}"
                  f"{cell['p99_ms']:>8.1f}{cell['triton_avg_batch']:>7.2f}{'':>19}"
                  + " ".join(f"{cell.get(f'cpu_ms_per_sentence_{role}', float('nan')):>12.2f}" for role in roles)
                  + f"{cell['cores_busy']:>7.2f}")
    print(json.dumps({"baselines": base, "single_sentence_latency_ms": single, "padding": padding,
                      "ratios": ratios}, indent=2))
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(result, indent=2))
    draw(sweep, args.json_out.with_suffix(".png"))


if __name__ == "__main__":
    main()
