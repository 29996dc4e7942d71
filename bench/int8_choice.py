"""Which int8 graph to serve on CPU: accuracy, speed and batch invariance of each quantization, one run.

    .venv/bin/python bench/int8_choice.py artifacts/wnut16-minilm --json-out bench/results/int8_choice.json

For each variant (built from the same fp32 export): entity F1 on the WNUT-16 held-out split (the build's
accuracy gate), sentences/s of ONNX Runtime in-process on length-sorted batches of 16 (2 threads, no
spinning; interleaved rounds, medians), and how many held-out texts change their argmax when run alone
versus padded beside a longer neighbour (batch invariance: must be 0). The ``rows-alone`` variant is the
dynamic graph as the served model runs it (CalibrationInfo.rows_alone): every row alone and unpadded, scored,
timed and checked that way.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ner_builder import calibration, evaluate, export, precision
from ner_builder.checkpoint import load_checkpoint
from ner_builder.datasets import held_out_split, load_dataset


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def sorted_batches(data: evaluate.EvalSet) -> list[dict[str, np.ndarray]]:
    return [b.feeds for b in data.batches]


def throughput(sess: ort.InferenceSession, batches: list[dict[str, np.ndarray]], names: list[str],
               rows_alone: bool = False) -> float:
    rows = sum(b[names[0]].shape[0] for b in batches)
    run = runner(sess, rows_alone)
    start = time.perf_counter()
    for feeds in batches:
        run({n: feeds[n] for n in names})
    return rows / (time.perf_counter() - start)


def runner(sess: ort.InferenceSession, rows_alone: bool) -> evaluate.Runner:
    def run(feeds: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(sess.run(None, feeds)[0])

    return (lambda feeds: evaluate.each_row_alone(run, feeds)) if rows_alone else run


def changed_alone_vs_batched(sess: ort.InferenceSession, data: evaluate.EvalSet, names: list[str],
                             rows_alone: bool = False, limit: int = 60) -> int:
    """Texts whose token argmax differs between running alone and in a batch beside the longest text."""
    rows = [(b, r) for b in data.batches for r in range(b.feeds[names[0]].shape[0])][:limit]
    longest_batch = data.batches[-1]
    long_row = {n: longest_batch.feeds[n][-1:] for n in names}
    width = long_row[names[0]].shape[1]
    run = runner(sess, rows_alone)
    changed = 0
    for batch, row in rows:
        length = int(batch.feeds["attention_mask"][row].sum())
        alone = {n: batch.feeds[n][row : row + 1, :length] for n in names}
        padded = {n: np.concatenate([np.pad(alone[n], ((0, 0), (0, width - length))), long_row[n]]) for n in names}
        a = run(alone)[0].argmax(-1)
        b = run(padded)[0, :length].argmax(-1)
        changed += int((a != b).any())
    return changed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    checkpoint = load_checkpoint(args.checkpoint)
    names = export.model_input_names(checkpoint)
    train_split, held_out = held_out_split(load_dataset("wnut16"), eval_fraction=0.15, seed=13)
    ref = evaluate.reference(checkpoint, "wnut16", held_out.sentences, held_out.tags, names, checkpoint.max_length)
    texts = calibration.choose_texts(None, train_split).texts
    feeds = calibration.feeds(checkpoint.tokenizer, texts, names, checkpoint.max_length)

    work = Path(tempfile.mkdtemp(prefix="int8-choice-"))
    fp32 = work / "fp32.onnx"
    export.export_onnx(checkpoint, fp32, names, 17)
    variants: dict[str, Path] = {"fp32": fp32}
    config = checkpoint.model.config
    shape = (config.num_attention_heads, config.hidden_size)
    fused = work / "fused.onnx"
    precision.fuse_transformer(fp32, fused, shape)
    variants["fp32-fused"] = fused
    builders = {
        "dynamic-s8": lambda target: precision.quantize_dynamic_graph(fp32, target),
        "static-qdq-s8s8": lambda target: precision.quantize_static_graph(fp32, target, feeds, activation="s8"),
        "static-qdq-u8s8": lambda target: precision.quantize_static_graph(fp32, target, feeds, activation="u8"),
        "fused-static-qdq-u8s8": lambda target: precision.quantize_static_graph(fp32, target, feeds, activation="u8",
                                                                               fuse=shape),
    }
    for name, make in builders.items():
        variants[name] = work / f"{name}.onnx"
        make(variants[name])
    variants["dynamic-s8-rows-alone"] = variants["dynamic-s8"]  # the default onnx-int8, as served
    alone = {"dynamic-s8-rows-alone"}

    results: dict[str, dict[str, float]] = {}
    sessions = {name: session(path, args.threads) for name, path in variants.items()}
    for name, path in variants.items():
        scores = evaluate.score_onnx(path, ref, checkpoint.labels, names, rows_alone=name in alone)
        changed = changed_alone_vs_batched(sessions[name], ref.data, names, rows_alone=name in alone)
        results[name] = {"f1": round(scores.f1 or 0.0, 4), "f1_drop_points": round(scores.f1_drop(ref.f1) or 0.0, 2),
                         "changed_alone_vs_batched": changed}
    batches = sorted_batches(ref.data)
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):  # interleaved: noise hits every variant alike
        for name, sess in sessions.items():
            samples[name].append(throughput(sess, batches, names, rows_alone=name in alone))
    for name in variants:
        results[name]["sentences_per_s"] = round(statistics.median(samples[name]), 1)
        results[name]["speed_vs_fp32"] = round(statistics.median(samples[name]) / statistics.median(samples["fp32"]), 2)
    print(f"reference (PyTorch) F1 {ref.f1:.4f} on {len(held_out)} held-out sentences")
    print(f"{'variant':<28}{'F1':>8}{'drop':>7}{'sent/s':>9}{'x fp32':>8}{'changed':>9}")
    for name, row in results.items():
        print(f"{name:<28}{row['f1']:>8.4f}{row['f1_drop_points']:>7.2f}{row['sentences_per_s']:>9.1f}"
              f"{row['speed_vs_fp32']:>8.2f}{row['changed_alone_vs_batched']:>9}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({"reference_f1": ref.f1, "variants": results}, indent=2))


if __name__ == "__main__":
    main()
