"""Benchmark tables and the sizing guide, rendered from ``bench/results/*.json``: no figure is typed by hand.

Each renderer reads one result file (as the bench/ scripts write it) and returns a Markdown table. The sizing guide
combines the served path's measured gateway CPU per sentence with an engine's throughput and shows the arithmetic.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# The served path before coalesced Triton calls (commit cad658f) and as it is now: bench/before_after.sh's summary,
# the newest measurement of the served path's own cost (near-free model), which sizing uses.
SERVED_PATH = "served_path/summary.json"
# An earlier run of the same script: the gateway before and after it was laid out in layers (the same work).
SERVED_PATH_LAYERS = "served_path/layers_before_after.json"
SHAPES = ("1x1", "16x1", "4x32")
# NVIDIA's published TensorRT figures for a 6-layer BERT (fp16, A100, sequence length 384), inferences/s.
ENGINE = {"source": "NVIDIA's published TensorRT performance for a 6-layer BERT, fp16, A100, sequence 384",
          "batch 1": 862, "batch 16": 2784}
HPA_TARGET = 0.7  # the gateway HPA's CPU utilisation target (deploy/k8s/base)


def load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _n(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def served_path_table(name: str = SERVED_PATH, before: str = "before", after: str = "after") -> str:
    """clients x texts per call: sentences/s, p50, Triton's average batch and CPU per sentence, before -> after."""
    d = load(name)
    lines = [f"| clients x texts per call | sentences/s, {before} → {after} | p50 ms | Triton avg batch | "
             "gateway CPU ms per sentence |", "| --- | --- | --- | --- | --- |"]
    for shape in SHAPES:
        b, a = d[f"before {shape}"], d[f"after {shape}"]
        ratio = d[f"after / before {shape}"]
        lines.append(f"| {shape.replace('x', ' x ')} | {_n(b['sentences_per_s'], 0)} → "
                     f"**{_n(a['sentences_per_s'], 0)}** ({ratio:.2f}×) | {b['p50_ms']:.1f} → {a['p50_ms']:.1f} | "
                     f"{b['triton_avg_batch']:.1f} → {a['triton_avg_batch']:.1f} | "
                     f"{b['cpu_ms_per_sentence_gateway']:.2f} → {a['cpu_ms_per_sentence_gateway']:.2f} |")
    rounds = d[f"after {SHAPES[0]}"]["rounds"]
    lines += ["", f"Medians of {rounds} interleaved rounds (`bench/results/{name}`)."]
    return "\n".join(lines)


def _only_cell(run: dict[str, Any]) -> dict[str, Any]:
    """The one cell of a throughput.py run of one served path at one client count."""
    (cell,) = [cell for cells in run["sweep"].values() for cell in cells.values()]
    return cell


DEMO_RUNS = (("on (default)", "served_path/demo-overlap-on-{shape}-*.json"),
             ("off", "served_path/demo-overlap-off-{shape}-*.json"),
             ("on (default), at 2a7dc72", "served_path/demo-final-{shape}-*.json"),
             ("on (default), at 2a7dc72, int8", "served_path/demo-int8-{shape}-*.json"))


def demo_overlap_table(runs: tuple[tuple[str, str], ...] = DEMO_RUNS) -> str:
    """The demo model served with and without the overlap rule (a call beside one in flight waits for a fuller
    batch), and its default int8 build: sentences/s, the ratio to ONNX Runtime's sorted batches of the same graph
    measured in the same run, Triton's batch."""
    lines = ["| clients x texts | overlap rule | sentences/s | ÷ ORT, sorted batches | Triton batch | gateway CPU ms |",
             "| --- | --- | --- | --- | --- | --- |"]
    for shape, label in (("16", "16 x 1"), ("32", "4 x 32")):
        for rule, pattern in runs:
            found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern.format(shape=shape)))]
            if not found:
                continue
            cells = [_only_cell(d) for d in found]
            ratios = [next(v for k, v in d["ratios"].items() if k.endswith("/ ort-sorted")) for d in found]
            lines.append(f"| {label} | {rule} | " + ", ".join(_n(c["sentences_per_s"]) for c in cells) + " | "
                         + ", ".join(f"{r:.2f}" for r in ratios) + " | "
                         + ", ".join(f"{c['triton_avg_batch']:.1f}" for c in cells) + " | "
                         + ", ".join(f"{c['cpu_ms_per_sentence_gateway']:.2f}" for c in cells) + " |")
    files = ", ".join(f"`bench/results/{pattern.format(shape='*')}`" for _, pattern in runs)
    lines += ["", f"One value per interleaved round ({files})."]
    return "\n".join(lines)


def served_path_cpu_table(name: str = SERVED_PATH) -> str:
    """Where the served path's CPU goes, per sentence, by process."""
    d = load(name)
    procs = ("gateway", "tritonserver", "stubs", "clients")
    lines = ["| run | " + " | ".join(f"{p} CPU ms" for p in procs) + " | cores busy |",
             "| --- |" + " --- |" * (len(procs) + 1)]
    for side in ("before", "after"):
        for shape in SHAPES:
            cell = d[f"{side} {shape}"]
            lines.append(f"| {side} {shape} | " + " | ".join(f"{cell[f'cpu_ms_per_sentence_{p}']:.2f}" for p in procs)
                         + f" | {cell['cores_busy']:.2f} |")
    return "\n".join(lines)


def sweep_table(name: str) -> str:
    """bench/throughput.py's sweep: sentences/s (p50 / p99 ms) per path and client count, then the baselines."""
    d = load(name)
    clients = [str(c) for c in d["setup"]["clients"]]
    lines = ["| path | " + " | ".join(f"{c} client{'s' if c != '1' else ''}" for c in clients) + " |",
             "| --- |" + " --- |" * len(clients)]
    for path, cells in d["sweep"].items():
        row = [f"{_n(cells[c]['sentences_per_s'])} ({cells[c]['p50_ms']:.0f} / {cells[c]['p99_ms']:.0f})"
               for c in clients]
        lines.append(f"| `{path}` | " + " | ".join(row) + " |")
    lines += ["", "sentences/s (p50 / p99 ms). In-process baselines, sentences/s:", "",
              "| baseline | sentences/s |", "| --- | --- |"]
    lines += [f"| `{k}` | {_n(v)} |" for k, v in d["baselines_sentences_per_s"].items()]
    at = str(d["setup"]["ratios_at_clients"])
    lines += ["", f"CPU ms per sentence at {at} clients, by process:", "",
              "| path | clients | gateway | tritonserver | stubs | cores busy |",
              "| --- | --- | --- | --- | --- | --- |"]
    for path, cells in d["sweep"].items():
        c = cells[at]
        gateway = f"{c['cpu_ms_per_sentence_gateway']:.2f}" if path.startswith("gateway") else "-"
        lines.append(f"| `{path}` | {c['cpu_ms_per_sentence_clients']:.2f} | {gateway} | "
                     f"{c['cpu_ms_per_sentence_tritonserver']:.2f} | {c['cpu_ms_per_sentence_stubs']:.2f} | "
                     f"{c['cores_busy']:.2f} |")
    s = d["setup"]
    lines += ["", f"{s['rounds']} interleaved rounds of {s['duration_s']:g} s per cell, {s['texts']} texts "
              f"(`bench/results/{name}`)."]
    return "\n".join(lines)


def int8_table(name: str = "int8_choice.json") -> str:
    d = load(name)
    lines = ["| variant | F1 | drop (points) | sentences/s in-process | × fp32 | texts changed by batching |",
             "| --- | --- | --- | --- | --- | --- |"]
    for variant, v in d["variants"].items():
        lines.append(f"| `{variant}` | {v['f1']:.4f} | {v['f1_drop_points']:.2f} | {_n(v['sentences_per_s'])} | "
                     f"{v['speed_vs_fp32']:.2f} | {v['changed_alone_vs_batched']} |")
    lines += ["", f"Reference (PyTorch) F1 {d['reference_f1']:.4f} (`bench/results/{name}`)."]
    return "\n".join(lines)


def large_requests_table(name: str) -> str:
    d = load(name)
    s = d["setup"]
    lines = [f"A {s['large_chars']:,}-character request beside small calls; {s['rounds']} round(s) "
             f"(`bench/results/{name}`).", "",
             "| gateway | small calls | health p50 / p99 / max ms | Recognize p50 / p99 ms | large request ms |",
             "| --- | --- | --- | --- | --- |"]
    for mode in ("offload", "inline"):
        for when in ("alone", "beside_large"):
            c = d[mode][when]
            large = _n(c["large_ms"], 0) if "large_ms" in c else "-"
            lines.append(f"| {mode} | {when.replace('_', ' ')} | {c['health_p50_ms']:.1f} / {c['health_p99_ms']:.1f} / "
                         f"{c['health_max_ms']:.1f} | {_n(c['recognize_p50_ms'])} / {_n(c['recognize_p99_ms'])} | "
                         f"{large} |")
    return "\n".join(lines)


def flood_table(name: str = "flood.json") -> str:
    d = load(name)
    s = d["setup"]
    unloaded_clients = d["callers_wait_the_retry_hint"]["unloaded"]["clients"]
    lines = [f"{s['clients']} callers with {s['deadline_ms']:g} ms deadlines for {s['seconds']:g} s, each kind "
             f"against a fresh gateway whose unloaded rate ({unloaded_clients} callers, 30 s deadlines) is measured "
             f"first (`bench/results/{name}`):", "",
             "| callers | unloaded answers/s | flooded answers/s (of unloaded) | calls by code | not answered that "
             "were refused | refusals p50 ms | Triton windows per answer | CPU cores: gateway / Triton (server + "
             "stubs) / callers |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, who in (("callers_call_again_at_once", "call again at once"),
                     ("callers_wait_the_retry_hint", "wait the retry hint"),
                     ("callers_with_the_client_retry_policy", "the Python client's retry policy, then again")):
        if key not in d:
            continue
        f = d[key]
        codes = ", ".join(f"{code} {count:,}" for code, count in f["codes"].items())
        refused = f["resource_exhausted_ms"]["p50_ms"] if f["resource_exhausted_ms"] else None
        cores = f["cpu_cores"]
        lines.append(f"| {who} | {f['unloaded']['answers_per_s']:g} | {f['answers_per_s']:g} "
                     f"({f['answers_of_unloaded']:.1%}) | {codes} | "
                     f"{f['refused_of_unanswered']:.1%} | {'-' if refused is None else f'{refused:.0f}'} | "
                     f"{f['triton_windows_per_answer']:.2f} | {cores['gateway']:.2f} / "
                     f"{cores['tritonserver'] + cores['stubs']:.2f} / {cores['callers']:.2f} |")
    return "\n".join(lines)


def soak_table(name: str = "soak.json") -> str:
    d = load(name)
    s = d["setup"]
    lines = [f"{s['clients']} callers, {s['minutes']:g} minutes, slices of {s['slice_s']:g} s: {d['calls']:,} "
             f"calls, {d['errors']} errors (`bench/results/{name}`).", "",
             "| slice | calls | p50 ms | p99 ms | RSS MB: " + " / ".join(d["slices"][0]["rss_mb"]) + " |",
             "| --- | --- | --- | --- | --- |"]
    for c in d["slices"]:
        lines.append(f"| {c['slice']} | {c['calls']:,} | {c['p50_ms']:.0f} | {c['p99_ms']:.0f} | "
                     + " / ".join(f"{v:.0f}" for v in c["rss_mb"].values()) + " |")
    growth = ", ".join(f"{k} {v * 100:+.1f}%" for k, v in d["rss_growth_after_warmup"].items())
    lines += ["", f"Resident memory after the first slice: {growth}; p50 max / min over the slices after the "
              f"first: {d['p50_ms_after_warmup']['max / min']:.2f}."]
    if "fewer_texts_answered_first_in_every_slice" in d:
        by_texts = [c["p50_ms_by_texts_per_call"] for c in d["slices"]]
        lines[-1] += (f" Models {s['model']}; every other caller sends {s['mix_texts']} texts per call: "
                      f"p50 of 1-text calls {min(c['1'] for c in by_texts):.0f}-{max(c['1'] for c in by_texts):.0f} "
                      f"ms, of {s['mix_texts']}-text calls "
                      f"{min(c[str(s['mix_texts'])] for c in by_texts):.0f}-"
                      f"{max(c[str(s['mix_texts'])] for c in by_texts):.0f} ms; the 1-text calls first in every "
                      f"slice: {'yes' if d['fewer_texts_answered_first_in_every_slice'] else 'no'}.")
    return "\n".join(lines)


def rollout_table(name: str = "rollout.json") -> str:
    """A rollout under load, step by step (bench/rollout.py)."""
    d = load(name)
    lines = [f"{d['clients']} callers, 1 text per call, back to back through every step: {d['calls']:,} calls, "
             f"{d['failed']} failed (`bench/results/{name}`).", "",
             "| step | calls/s | failed | answered by version | p50 / p99 ms | shadow scored / refused | "
             "shadow precision / recall |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for step in d["steps"]:
        shadow, answered = step["shadow"], ", ".join(f"{v}: {n:,}" for v, n in step["answered_by"].items())
        scored, refused = shadow["requests"]["scored"], shadow["requests"]["refused"]
        ratios = shadow["all"]
        agreement = "-" if not scored else " / ".join("-" if ratios[k] is None else f"{ratios[k]:.2f}"
                                                      for k in ("precision", "recall"))
        failed = sum(step["failed"].values())
        lines.append(f"| {step['step']} | {_n(step['calls_per_s'])} | {failed} | {answered} | "
                     f"{_n(step['p50_ms'])} / {_n(step['p99_ms'])} | "
                     f"{f'{scored:,} / {refused:,}' if scored or refused else '-'} | {agreement} |")
    return "\n".join(lines)


def sizing() -> str:
    """How many gateway cores (workers) an engine needs: engine sentences/s x gateway CPU s per sentence."""
    d = load(SERVED_PATH)
    one, many = d["after 16x1"]["cpu_ms_per_sentence_gateway"], d["after 4x32"]["cpu_ms_per_sentence_gateway"]
    lines = [
        f"Gateway CPU per sentence, measured on the near-free model (`bench/results/{SERVED_PATH}`, "
        f"the newest run): **{one:.2f} ms** in one-text calls at 16 clients, **{many:.2f} ms** in 32-text calls "
        "at 4 clients. Engine throughput: " + ENGINE["source"] + f": {ENGINE['batch 1']:,} inferences/s at "
        f"batch 1, {ENGINE['batch 16']:,}/s at batch 16.", "",
        "| engine rate | calls of | gateway cores = rate × CPU per sentence | at the HPA's "
        f"{HPA_TARGET:.0%} target | workers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for batch in ("batch 1", "batch 16"):
        rate = ENGINE[batch]
        for label, ms in (("1 text", one), ("32 texts", many)):
            cores = rate * ms / 1000
            lines.append(f"| {rate:,}/s ({batch}) | {label} | {rate:,} × {ms:.2f} ms = {cores:.2f} | "
                         f"{cores:.2f} / {HPA_TARGET} = {cores / HPA_TARGET:.2f} | {math.ceil(cores / HPA_TARGET)} |")
    full, workers = ENGINE["batch 16"] * one / 1000, math.ceil(ENGINE["batch 16"] * one / 1000 / HPA_TARGET)
    full_many = ENGINE["batch 16"] * many / 1000
    overlay = _env(ROOT / "deploy/k8s/overlays/gpu/gateway.env").get("NER_WORKERS", "1")
    lines += ["", f"Read it as: one such engine at full batches keeps about {full:.1f} gateway cores busy with "
              f"one-text calls ({workers} workers at the HPA's target) and about {full_many:.1f} with 32-text calls. "
              f"The GPU overlay runs `NER_WORKERS={overlay}` per gateway pod (`deploy/k8s/overlays/gpu/`); the "
              "gateway HPA adds pods beyond that."]
    cpu = load("throughput.json")
    at = str(cpu["setup"]["ratios_at_clients"])
    model = next(k for k in cpu["sweep"] if k.startswith("gateway:") and "int8" in k and "before" not in k)
    cell = cpu["sweep"][model][at]
    triton_ms = cell["cpu_ms_per_sentence_stubs"] + cell["cpu_ms_per_sentence_tritonserver"]
    lines += [
        "",
        f"On a CPU pod the model takes the cores. Served at {at} clients (`bench/results/throughput.json`, "
        f"`{model.split(':', 1)[1]}`), Triton spent {cell['cpu_ms_per_sentence_stubs']:.2f} ms (Python-backend "
        f"stubs, i.e. ONNX Runtime) + {cell['cpu_ms_per_sentence_tritonserver']:.2f} ms (tritonserver) = "
        f"{triton_ms:.2f} ms of CPU per sentence, against {one:.2f} ms for the gateway: one gateway core keeps "
        f"{triton_ms:.2f} / {one:.2f} ≈ {triton_ms / one:.0f} Triton cores busy with one-text calls.",
    ]
    return "\n".join(lines)


def _env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (comments and blank lines skipped)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and not line.startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def readme_demo() -> str:
    """The README's demo-model table."""
    return ("The demo model (MiniLM-L6, fp32 and its default int8), the overlap rule on and off, against ONNX Runtime "
            "in-process:\n\n" + demo_overlap_table())


def readme_served_path() -> str:
    """The README's headline table: the served path at the base commit and at the measured one."""
    d = load(SERVED_PATH)
    return (f"The served path's own cost at commit {d.get('base', 'cad658f')} (one Triton call per request) and at "
            f"commit {d.get('after', 'unrecorded')},\nnear-free model, 2 shared cores:\n\n" + served_path_table())
