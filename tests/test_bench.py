"""The benchmarks' plumbing, in seconds: their numbers go into notes, so they must not rot. Each script is started
as its README runs it (``--help``: it imports and parses), and what turns measurements into its result JSON runs
on synthetic measurements here: the argument parsing ``main`` uses, every cell value, ratio and key. Nothing here
measures anything; bench/ does that, as ratios within one run, on real servers."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = ("e2e_latency.py", "decode_speed.py", "throughput.py", "soak.py")
INT8 = "tiny-onnx-int8"


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Import a bench/ script as a module, as the scripts import each other (soak.py: ``from throughput import``)."""
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name: str) -> ModuleType:
        return importlib.import_module(name)

    return load


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_starts_and_parses_its_arguments(script: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(BENCH / script), "--help"], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)  # elsewhere than bench/: the sibling imports still resolve
    assert result.returncode == 0, result.stderr
    assert "--json-out" in result.stdout


def test_e2e_latency_result(bench) -> None:  # type: ignore[no-untyped-def]
    e2e = bench("e2e_latency")
    args = e2e.parse_args(["--repository", "repo", "--model", "tiny", "--rounds", "3", "--batch", "2"])
    assert (args.repository, args.model, args.rounds, args.batch, args.json_out) == (Path("repo"), "tiny", 3, 2, None)
    samples = {"ort": [0.001, 0.001, 0.003], "triton": [0.002, 0.002, 0.002], "gateway": [0.006, 0.005, 0.007]}
    feeds = [{"input_ids": np.zeros((2, width), np.int64)} for width in (12, 20, 14)]
    result = json.loads(json.dumps(e2e.summarise(samples, args, feeds)))
    assert set(result) == {"ort", "triton", "gateway", "ratios_p50", "setup"}
    for path in ("ort", "triton", "gateway"):
        assert set(result[path]) == {"p50_ms", "p90_ms", "p99_ms", "mean_ms"}
    assert result["gateway"] == pytest.approx({"p50_ms": 6.0, "p90_ms": 6.8, "p99_ms": 6.98, "mean_ms": 6.0})
    assert result["ratios_p50"] == pytest.approx({"gateway/triton": 3.0, "gateway/ort": 6.0, "triton/ort": 2.0})
    assert result["setup"] == {"model": "tiny", "rounds": 3, "texts_per_call": 2, "median_tokens": 14}


def test_decode_speed_rows(bench) -> None:  # type: ignore[no-untyped-def]
    decode_speed = bench("decode_speed")
    args = decode_speed.parse_args(["--checkpoint", "ckpt", "--tokens", "48", "--repeats", "2"])
    assert (args.checkpoint, args.tokens, args.repeats) == (Path("ckpt"), 48, 2)
    assert decode_speed.timing_row([0.003, 0.001, 0.002], [0.0002, 0.0004, 0.0001], 4) == {
        "hf_ms": 2.0, "ours_ms": 0.2, "speedup": 10.0, "entities": 4}


def samples(latency_ms: list[float], sentences: int, client_cpu_s: float) -> dict[str, list[float]]:
    """What ``load`` returns for a gateway cell (Triton's has no stage times)."""
    return {"latency": [ms / 1000 for ms in latency_ms], "tokenize": [0.001, 0.003], "infer": [0.004, 0.006],
            "decode": [0.0005, 0.0015], "sentences": [sentences], "cpu_s": [client_cpu_s]}


def test_throughput_cells(bench) -> None:  # type: ignore[no-untyped-def]
    throughput = bench("throughput")
    cpu_before = {"gateway": 1.0, "tritonserver": 2.0, "stubs": 3.0}
    cpu_after = {"gateway": 1.25, "tritonserver": 2.5, "stubs": 3.25}
    # 40 sentences in 2 s; Triton ran 40 inferences in 10 executions; CPU s: clients 0.5, the servers 0.25/0.5/0.25.
    cell = throughput.served_cell("gateway", samples([10.0] * 9 + [20.0], 40, 0.5), 2.0, (100, 50), (140, 60),
                                  cpu_before, cpu_after)
    assert cell == pytest.approx({
        "sentences_per_s": 20.0, "p50_ms": 10.0, "p90_ms": 11.0, "p99_ms": 19.1, "triton_avg_batch": 4.0,
        "cpu_ms_per_sentence_clients": 12.5, "cpu_ms_per_sentence_gateway": 6.25,
        "cpu_ms_per_sentence_tritonserver": 12.5, "cpu_ms_per_sentence_stubs": 6.25, "cores_busy": 0.75,
        "tokenize_ms": 2.0, "infer_ms": 5.0, "decode_ms": 1.0})
    direct = {k: v for k, v in samples([10.0] * 10, 40, 0.5).items() if k in ("latency", "sentences", "cpu_s")}
    cell = throughput.served_cell("triton", direct, 2.0, (100, 50), (140, 60), cpu_before, cpu_after)
    assert "cpu_ms_per_sentence_gateway" not in cell and "tokenize_ms" not in cell  # no gateway on that path
    assert cell["cores_busy"] == pytest.approx(0.625)


def test_padding_of_batches_of_16(bench) -> None:  # type: ignore[no-untyped-def]
    throughput = bench("throughput")
    feeds = [{"input_ids": np.ones((1, width), np.int64), "attention_mask": np.ones((1, width), np.int64)}
             for width in [3, 5] * 16]
    as_they_come, ratio = throughput.padded_batches(feeds, sort=False)
    assert [b["input_ids"].shape for b in as_they_come] == [(16, 5), (16, 5)] and ratio == 160 / 128
    by_length, ratio = throughput.padded_batches(feeds, sort=True)
    assert [b["input_ids"].shape for b in by_length] == [(16, 3), (16, 5)] and ratio == 1.0
    assert int(sum(b["attention_mask"].sum() for b in as_they_come)) == 128  # the padding is zeros


def rounds(sentences_per_s: float, p50_ms: float, p99_ms: float) -> list[dict[str, float]]:
    """Three rounds of one cell, whose medians are the values given."""
    return [{"sentences_per_s": sentences_per_s * f, "p50_ms": p50_ms * f, "p99_ms": p99_ms * f}
            for f in (0.5, 1.0, 2.0)]


def test_throughput_result_and_ratios(bench, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    throughput = bench("throughput")
    out = tmp_path / "throughput.json"
    args = throughput.parse_args(["--repository", "repo", "--models", f"tiny,{INT8}", "--checkpoint", "ckpt",
                                  "--clients", "1,4", "--duration", "1", "--rounds", "3", "--texts", "48",
                                  "--json-out", str(out)])
    assert (args.models, args.clients, args.duration, args.paths, args.client_processes) == (
        f"tiny,{INT8}", "1,4", 1.0, "gateway,triton", 2)
    assert (args.json_out, args.near_free, args.texts_per_call) == (out, False, 1)
    models, clients = ["tiny", INT8], [1, 4]
    cells = {
        "gateway:tiny": {1: rounds(50, 6.0, 9.0), 4: rounds(200, 10.0, 30.0)},
        "triton:tiny": {1: rounds(100, 3.0, 4.0), 4: rounds(400, 5.0, 8.0)},
        f"gateway:{INT8}": {1: rounds(30, 9.0, 12.0), 4: rounds(60, 20.0, 50.0)},
        f"triton:{INT8}": {1: rounds(40, 8.0, 9.0), 4: rounds(80, 16.0, 20.0)},
    }
    baselines = {"ort-as-they-come:tiny": [400, 500, 600], "ort-sorted:tiny": [700, 800, 900],
                 f"ort-as-they-come:{INT8}": [100, 150, 200], f"ort-sorted:{INT8}": [200, 240, 250],
                 f"ort-rows:{INT8}": [120, 120, 120], "hf-pipeline": [90, 100, 110]}
    latency = {"ort-single-ms:tiny": [2.0, 2.0, 2.0], f"ort-single-ms:{INT8}": [3.0, 4.0, 5.0]}
    padding = {"ort-as-they-come:tiny": 1.4, "ort-sorted:tiny": 1.05}
    result = throughput.summarise(args, models, clients, 48, cells, baselines, latency, padding)

    assert result["ratios"] == {
        "gateway:tiny / ort-sorted": 0.25, "gateway:tiny / ort-as-they-come": 0.4, "gateway:tiny / triton": 0.5,
        "gateway:tiny / hf-pipeline": 2.0, "ort-sorted:tiny / hf-pipeline": 8.0,
        "gateway:tiny p50 at 1 client / ort-single": 3.0, "gateway:tiny p99 / p50": 3.0,
        f"gateway:{INT8} / ort-sorted": 0.25, f"gateway:{INT8} / ort-as-they-come": 0.4,
        f"gateway:{INT8} / triton": 0.75, f"gateway:{INT8} / ort-rows": 0.5,
        f"gateway:{INT8} / hf-pipeline": 0.6, f"ort-sorted:{INT8} / hf-pipeline": 2.4,
        f"gateway:{INT8} p50 at 1 client / ort-single": 2.25, f"gateway:{INT8} p99 / p50": 2.5,
    }
    written = json.loads(json.dumps(result))  # as main writes it: the sweep's client counts become strings
    assert written["setup"] == {"models": models, "clients": clients, "texts_per_call": 1, "near_free": False,
                                "duration_s": 1.0, "rounds": 3, "texts": 48, "client_processes": 2,
                                "ratios_at_clients": 4}
    assert set(written["sweep"]) == set(cells)
    assert written["sweep"]["gateway:tiny"] == {"1": {"sentences_per_s": 50, "p50_ms": 6.0, "p99_ms": 9.0},
                                                "4": {"sentences_per_s": 200, "p50_ms": 10.0, "p99_ms": 30.0}}
    assert written["baselines_sentences_per_s"] == {
        "ort-as-they-come:tiny": 500, "ort-sorted:tiny": 800, f"ort-as-they-come:{INT8}": 150,
        f"ort-sorted:{INT8}": 240, f"ort-rows:{INT8}": 120, "hf-pipeline": 100}
    assert written["single_sentence_latency_ms"] == {"ort-single-ms:tiny": 2.0, f"ort-single-ms:{INT8}": 4.0}
    assert written["padding_ratio_batches_of_16"] == padding
    # 16 clients, when measured, is where the ratios are taken.
    cells["gateway:tiny"][16] = rounds(320, 10.0, 40.0)
    at_16 = throughput.summarise(args, ["tiny"], [1, 4, 16], 48, {"gateway:tiny": cells["gateway:tiny"]},
                                 baselines, latency, padding)
    assert at_16["setup"]["ratios_at_clients"] == 16
    assert at_16["ratios"] == {"gateway:tiny / ort-sorted": 0.4, "gateway:tiny / ort-as-they-come": 0.64,
                               "gateway:tiny / hf-pipeline": 3.2, "ort-sorted:tiny / hf-pipeline": 8.0,
                               "gateway:tiny p50 at 1 client / ort-single": 3.0, "gateway:tiny p99 / p50": 4.0}

    throughput.draw(result["sweep"], out.with_suffix(".png"))
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_and_flood_results(bench) -> None:  # type: ignore[no-untyped-def]
    soak = bench("soak")
    args = soak.parse_args(["soak", "--model", "tiny", "--minutes", "0.1", "--slice-s", "3"])
    assert (args.mode, args.model, args.clients, args.minutes, args.slice_s) == ("soak", "tiny", 64, 0.1, 3.0)
    assert soak.parse_args(["flood", "--deadline-ms", "1000"]).clients == 256
    assert soak.parse_args(["flood", "--clients", "32"]).clients == 32

    rss = [{"gateway": 100.0, "tritonserver": 200.0, "stubs": 100.0},
           {"gateway": 105.0, "tritonserver": 200.0, "stubs": 100.0},
           {"gateway": 110.0, "tritonserver": 220.0, "stubs": 120.0}]
    slices = [soak.slice_cell(i, codes, [ms / 1000 for ms in single + mixed], {1: [ms / 1000 for ms in single],
                                                                               4: [ms / 1000 for ms in mixed]}, r)
              for i, (codes, single, mixed, r) in enumerate([
                  ({"OK": 4}, [100.0, 100.0], [140.0, 140.0], rss[0]),  # warm-up
                  ({"OK": 4, "UNAVAILABLE": 1}, [10.0, 10.0], [30.0, 30.0], rss[1]),
                  ({"OK": 4, "DEADLINE_EXCEEDED": 2}, [30.0, 30.0], [70.0, 70.0], rss[2])])]
    assert slices[1]["calls"] == 5 and slices[1]["p50_ms"] == 20.0
    assert slices[1]["p50_ms_by_texts_per_call"] == {1: 10.0, 4: 30.0}
    result = json.loads(json.dumps(soak.soak_summary(slices)))
    assert set(result) == {"slices", "errors", "calls", "p50_ms_after_warmup",
                           "fewer_texts_answered_first_in_every_slice", "rss_growth_after_warmup",
                           "rss_total_growth_after_warmup"}
    assert (len(result["slices"]), result["errors"], result["calls"]) == (3, 3, 15)
    assert result["p50_ms_after_warmup"] == {"min": 20.0, "max": 50.0, "max / min": 2.5}  # not the warm-up's
    assert result["fewer_texts_answered_first_in_every_slice"] is True
    assert result["rss_growth_after_warmup"] == {"gateway": 0.1, "tritonserver": 0.1, "stubs": 0.2}
    assert result["rss_total_growth_after_warmup"] == 0.125

    flood = json.loads(json.dumps(soak.flood_summary({"OK": 40, "RESOURCE_EXHAUSTED": 4, "DEADLINE_EXCEEDED": 2},
                                                     [0.001, 0.002, 0.003, 1.5], 50, 1000.0, 10.0, 20.0)))
    assert set(flood) == {"codes", "answers_per_s", "answers_of_unloaded", "refused_of_unanswered",
                          "triton_windows_run", "triton_windows_per_answer", "resource_exhausted_ms",
                          "share_refused_within_deadline"}
    assert (flood["answers_per_s"], flood["answers_of_unloaded"], flood["refused_of_unanswered"]) == (4.0, 0.2, 0.667)
    assert (flood["triton_windows_run"], flood["triton_windows_per_answer"]) == (50, 1.25)
    assert flood["resource_exhausted_ms"]["p50_ms"] == 2.5
    assert flood["share_refused_within_deadline"] == 0.75
    none_refused = soak.flood_summary({"DEADLINE_EXCEEDED": 3}, [], 7, 100.0, 10.0, 0.0)
    assert none_refused["answers_of_unloaded"] is None and none_refused["refused_of_unanswered"] == 0.0
    assert soak.cpu_cores({"gateway": 1.0}, {"gateway": 3.0, "callers": 1.0}, 4.0) == {"gateway": 0.5, "callers": 0.25}
    assert none_refused["triton_windows_per_answer"] is None and none_refused["resource_exhausted_ms"] is None
