"""The benchmarks run (on the tiny model, a few rounds): their numbers go into notes, so they must not rot.
Nothing here judges speed; bench/ measures that as ratios within one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import TINY_MODEL

BENCH = Path(__file__).resolve().parents[1] / "bench"


def run_bench(script: str, *args: str, out: Path) -> dict:
    subprocess.run([sys.executable, str(BENCH / script), *args, "--json-out", str(out)], check=True,
                   capture_output=True, timeout=240)
    return json.loads(out.read_text())


def test_e2e_latency_runs_all_three_paths(tiny_repository: Path, tmp_path: Path) -> None:
    result = run_bench("e2e_latency.py", "--repository", str(tiny_repository), "--model", TINY_MODEL,
                       "--rounds", "3", "--batch", "2", out=tmp_path / "e2e.json")
    for path in ("ort", "triton", "gateway"):
        assert 0 < result[path]["p50_ms"] <= result[path]["p99_ms"]
    assert set(result["ratios_p50"]) == {"gateway/triton", "gateway/ort", "triton/ort"}
    setup = result["setup"]
    assert (setup["model"], setup["rounds"], setup["texts_per_call"]) == (TINY_MODEL, 3, 2)
    assert setup["median_tokens"] > 10


def test_decode_speed_agrees_with_hf_and_reports_every_strategy(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # The script asserts that HF and the gateway find the same spans before it times them.
    result = run_bench("decode_speed.py", "--checkpoint", str(tiny_checkpoint), "--tokens", "48", "--repeats", "2",
                       out=tmp_path / "decode.json")
    assert result["tokens"] <= 48
    assert set(result["per_aggregation"]) == {"SIMPLE", "FIRST", "AVERAGE", "MAX"}
    assert all(row["hf_ms"] > 0 and row["ours_ms"] > 0 for row in result["per_aggregation"].values())


def test_throughput_reports_every_path_and_draws_the_sweep(int8_repository: Path, tiny_checkpoint: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    int8 = f"{TINY_MODEL}-onnx-int8"  # dynamic int8, served one row at a time
    subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--repository", str(int8_repository), "--models",
                    f"{TINY_MODEL},{int8}", "--checkpoint", str(tiny_checkpoint), "--clients", "1,4", "--duration",
                    "1", "--rounds", "1", "--texts", "48", "--json-out", str(out)], check=True, capture_output=True,
                   timeout=300)
    result = json.loads(out.read_text())
    assert set(result["sweep"]) == {f"{kind}:{model}" for kind in ("gateway", "triton") for model in (TINY_MODEL, int8)}
    for path, by_clients in result["sweep"].items():
        assert set(by_clients) == {"1", "4"}
        for cell in by_clients.values():
            assert cell["sentences_per_s"] > 0 and 0 < cell["p50_ms"] <= cell["p99_ms"]
            assert cell["triton_avg_batch"] >= 1
            # Where the CPU went, per sentence: every process of the served path did some work.
            roles = ["clients", "tritonserver", "stubs"] + (["gateway"] if path.startswith("gateway") else [])
            assert all(cell[f"cpu_ms_per_sentence_{role}"] > 0 for role in roles), cell
            assert ("cpu_ms_per_sentence_gateway" in cell) == path.startswith("gateway")
            assert 0 < cell["cores_busy"]
    assert result["sweep"][f"gateway:{TINY_MODEL}"]["4"]["tokenize_ms"] >= 0
    assert set(result["baselines_sentences_per_s"]) == {
        *(f"ort-{order}:{model}" for order in ("as-they-come", "sorted") for model in (TINY_MODEL, int8)),
        f"ort-rows:{int8}", "hf-pipeline"}
    assert set(result["single_sentence_latency_ms"]) == {f"ort-single-ms:{m}" for m in (TINY_MODEL, int8)}
    padding = result["padding_ratio_batches_of_16"]
    assert padding[f"ort-sorted:{TINY_MODEL}"] <= padding[f"ort-as-they-come:{TINY_MODEL}"]
    ratios = result["ratios"]
    for model in (TINY_MODEL, int8):
        assert {f"gateway:{model} / hf-pipeline", f"gateway:{model} / ort-sorted",
                f"gateway:{model} p50 at 1 client / ort-single", f"gateway:{model} p99 / p50"} <= set(ratios)
    assert f"gateway:{int8} / ort-rows" in ratios and f"gateway:{TINY_MODEL} / ort-rows" not in ratios
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_soak_reports_slices_errors_and_memory(tiny_repository: Path, tmp_path: Path) -> None:
    result = run_bench("soak.py", "soak", "--repository", str(tiny_repository), "--model", TINY_MODEL,
                       "--clients", "8", "--minutes", "0.1", "--slice-s", "3", out=tmp_path / "soak.json")
    assert len(result["slices"]) == 2 and result["errors"] == 0 and result["calls"] > 0
    for cell in result["slices"]:
        assert cell["codes"] == {"OK": cell["calls"]} and 0 < cell["p50_ms"] <= cell["p99_ms"]
        assert all(cell["rss_mb"][role] > 0 for role in ("gateway", "tritonserver", "stubs")), cell
    assert set(result["rss_growth_after_warmup"]) == {"gateway", "tritonserver", "stubs"}


def test_flood_counts_codes_and_triton_work(tiny_repository: Path, tmp_path: Path) -> None:
    result = run_bench("soak.py", "flood", "--repository", str(tiny_repository), "--model", TINY_MODEL,
                       "--clients", "32", "--seconds", "2", "--deadline-ms", "1000", out=tmp_path / "flood.json")
    assert sum(result["codes"].values()) > 0 and result["codes"].get("OK", 0) > 0
    assert result["triton_windows_run"] >= result["codes"]["OK"]  # one window per tweet on the tiny model
