"""A model rollout under load, as an operator runs it (docs/operations.md): closed-loop callers send WNUT-16
sentences to a real gateway in front of a real Triton the whole time, while the steps follow one another with no
restart: load the candidate version, shadow it, canary it, promote it, retire the old version. Per step: calls,
failures by code, which version answered, latency, and what the shadow scored against the live answers.

    .venv/bin/python bench/rollout.py --live artifacts/wnut16-minilm --candidate CANDIDATE_CHECKPOINT \\
        --json-out bench/results/rollout.json

``--candidate`` defaults to ``--live`` (a rebuild of the same weights: the shadow must agree on every entity).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from throughput import percentiles, start_gateway, wnut_texts  # bench/throughput.py

from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

MODEL = "wnut16"


def build_versions(live: Path, candidate: Path, repository: Path, held: Path) -> None:
    """Version 1 from ``live`` and version 2 from ``candidate``; 2 waits in ``held`` until the rollout loads it."""
    from ner_builder.build import BuildOptions, build_model
    from ner_builder.triton_config import ServingOptions

    options = BuildOptions(serving=ServingOptions(keep_versions=2))
    for checkpoint in (live, candidate):
        build_model(checkpoint, repository, MODEL, options)
    shutil.move(repository / MODEL / "2", held / "2")


class Operator:
    """The steps: the policy file (a ConfigMap) and Triton's model control (deploy/k8s/load-model.sh)."""

    def __init__(self, triton: Any, repository: Path, held: Path, policy: Path) -> None:
        self.triton, self.repository, self.held, self.policy = triton, repository, held, policy

    def write_policy(self, **model: Any) -> None:
        staged = self.policy.with_suffix(".new")
        staged.write_text(json.dumps({"models": {MODEL: model}}))  # JSON is YAML
        os.replace(staged, self.policy)

    async def load(self, add: str = "", remove: str = "") -> None:
        import tritonclient.grpc.aio as triton_grpc

        if add:
            shutil.move(self.held / add, self.repository / MODEL / add)
        if remove:
            shutil.move(self.repository / MODEL / remove, self.held / remove)
        control = triton_grpc.InferenceServerClient(self.triton.grpc_url)
        try:
            await control.load_model(MODEL, headers=self.triton.admin_headers)
        finally:
            await control.close()


def scrape_shadow(port: int) -> Counter[tuple[str, ...]]:
    """The gateway's ner_shadow_* counters, by (name, label values...)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found: Counter[tuple[str, ...]] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("ner_shadow_") and sample.name.endswith("_total"):
                labels = sample.labels
                found[(sample.name, labels.get("label", ""), labels["outcome"])] += int(sample.value)
    return found


def shadow_summary(counts: Counter[tuple[str, ...]]) -> dict[str, Any]:
    """Calls scored or refused, and the candidate's precision and recall against the live answers (all labels and
    per label), from the counters' increase over one step."""
    entities: Counter[tuple[str, str]] = Counter()
    for (name, label, outcome), value in counts.items():
        if name == "ner_shadow_entities_total":
            entities[(label, outcome)] += value

    def ratios(label: str | None) -> dict[str, float | None]:
        def total(*outcomes: str) -> int:
            return sum(v for (lab, out), v in entities.items() if out in outcomes and label in (None, lab))

        agreed = total("agreed")
        candidate, live = total("agreed", "added", "relabeled_to"), total("agreed", "dropped", "relabeled_from")
        return {"precision": round(agreed / candidate, 4) if candidate else None,
                "recall": round(agreed / live, 4) if live else None, "live_entities": live}

    requests = {outcome: counts[("ner_shadow_requests_total", "", outcome)] for outcome in ("scored", "refused",
                                                                                             "failed")}
    labels = sorted({label for label, _ in entities})
    return {"requests": requests, "all": ratios(None), "by_label": {label: ratios(label) for label in labels},
            "outcomes": {f"{label}/{outcome}": v for (label, outcome), v in sorted(entities.items()) if v},
            "documents_changed": counts[("ner_shadow_documents_total", "", "changed")],
            "documents_same": counts[("ner_shadow_documents_total", "", "same")]}


async def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from ner_gateway.net import free_port
    from ner_gateway.triton.process import EmbeddedTriton

    repository, held = work / "repository", work / "held"
    repository.mkdir()
    held.mkdir()
    build_versions(args.live, args.candidate or args.live, repository, held)
    texts = wnut_texts(args.texts)
    triton = EmbeddedTriton(repository)
    await triton.start()
    policy, metrics_port = work / "policy.yaml", free_port()
    operator = Operator(triton, repository, held, policy)
    operator.write_policy(stable="1")
    gateway, address = await asyncio.to_thread(start_gateway, repository, triton.grpc_url, {
        "NER_ROLLOUT_POLICY_FILE": str(policy), "NER_METRICS_PORT": str(metrics_port)})
    steps: list[dict[str, Any]] = []
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = ner_pb2_grpc.NerServiceStub(channel)
            current: dict[str, Any] = {"versions": Counter(), "codes": Counter(), "latencies": []}
            stop = asyncio.Event()

            async def caller(k: int) -> None:
                i = k
                while not stop.is_set():
                    started = time.perf_counter()
                    cell = current
                    try:
                        answer = await stub.Recognize(ner_pb2.RecognizeRequest(texts=[texts[i % len(texts)]],
                                                                              model=MODEL), timeout=args.deadline_s)
                        cell["versions"][answer.model_version] += 1
                        cell["latencies"].append(time.perf_counter() - started)
                    except grpc.aio.AioRpcError as e:
                        cell["codes"][e.code().name] += 1
                    i += args.clients

            async def step(name: str, action: Any) -> None:
                nonlocal current
                before = await asyncio.to_thread(scrape_shadow, metrics_port)
                current = {"versions": Counter(), "codes": Counter(), "latencies": []}
                cell, started = current, time.perf_counter()
                await action()
                await asyncio.sleep(max(0.0, args.step_s - (time.perf_counter() - started)))
                seconds = time.perf_counter() - started
                current = {"versions": Counter(), "codes": Counter(), "latencies": []}  # between steps: not counted
                after = await asyncio.to_thread(scrape_shadow, metrics_port)
                ok = sum(cell["versions"].values())
                steps.append({"step": name, "seconds": round(seconds, 1), "calls": ok + sum(cell["codes"].values()),
                              "ok": ok, "failed": dict(cell["codes"]), "answered_by": dict(sorted(
                                  cell["versions"].items())), "calls_per_s": round(ok / seconds, 1),
                              **percentiles(cell["latencies"] or [0.0]), "shadow": shadow_summary(after - before)})
                print(json.dumps(steps[-1]), flush=True)

            async def nothing() -> None:
                return None

            callers = [asyncio.create_task(caller(k)) for k in range(args.clients)]
            try:
                await step("version 1 serves", nothing)
                await step("version 2 loaded in Triton (pinned only)", lambda: operator.load(add="2"))
                await step(f"shadow 2 (share {args.shadow_share})", lambda: asyncio.to_thread(
                    operator.write_policy, stable="1", shadow={"version": "2", "share": args.shadow_share}))
                await step(f"canary 2 (share {args.canary_share}), shadow kept", lambda: asyncio.to_thread(
                    operator.write_policy, stable="1", canary={"version": "2", "share": args.canary_share},
                    shadow={"version": "2", "share": args.shadow_share}))
                await step("rolled back (stable 1 alone)", lambda: asyncio.to_thread(operator.write_policy,
                                                                                     stable="1"))
                await step("promoted (stable 2)", lambda: asyncio.to_thread(operator.write_policy, stable="2"))
                await step("version 1 retired (unloaded in Triton)", lambda: operator.load(remove="1"))
            finally:
                stop.set()
                await asyncio.gather(*callers)
    finally:
        gateway.terminate()
        await asyncio.to_thread(gateway.wait, 30)
        await triton.stop()
    return {"model": MODEL, "live": str(args.live), "candidate": str(args.candidate or args.live),
            "clients": args.clients, "texts_per_call": 1, "deadline_s": args.deadline_s, "steps": steps,
            "calls": sum(s["calls"] for s in steps), "failed": sum(sum(s["failed"].values()) for s in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", type=Path, required=True, help="checkpoint of version 1")
    parser.add_argument("--candidate", type=Path, help="checkpoint of version 2 (default: --live)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--step-s", type=float, default=12.0, help="seconds each step runs under load")
    parser.add_argument("--shadow-share", type=float, default=1.0)
    parser.add_argument("--canary-share", type=float, default=0.1)
    parser.add_argument("--deadline-s", type=float, default=10.0)
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rollout-") as work:
        result = asyncio.run(run(args, Path(work)))
    print(f"{result['calls']} calls, {result['failed']} failed")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
