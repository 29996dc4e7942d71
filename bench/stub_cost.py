"""Where the Python-backend stubs' CPU goes while served: the model's ONNX Runtime runs, the rest of model.py, the stub.

    .venv/bin/python bench/stub_cost.py --repository R --model near-free --clients 16 --json-out OUT

Copies the built model into a scratch repository and appends a subclass to its ``model.py`` that times, in thread
CPU, every ``session.run`` and every ``execute`` (the served file itself is unchanged), then serves that copy with
``bench/throughput.py``'s gateway path. Each stub writes its totals; the summary gives, per sentence, the stubs' CPU
from /proc, the model's runs, the rest of ``execute``, what is left to the stub itself, and tritonserver's CPU,
with rows per call and ONNX Runtime runs per call. ``bench/model_cost.py`` gives the same graph's runs in a loop,
hot and cold.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent

TIMING = '''

# --- appended by bench/stub_cost.py: thread CPU of the model's runs and of execute -----------------------
import time as _time

_Served = TritonPythonModel


class TritonPythonModel(_Served):  # type: ignore[no-redef]
    def initialize(self, args):
        super().initialize(args)
        self._totals = {"calls": 0, "runs": 0, "rows": 0, "run_s": 0.0, "execute_s": 0.0}
        self._totals_file = os.path.join(os.environ["NER_STUB_COST_DIR"], f"stub-{os.getpid()}.json")
        session, totals = self.session, self._totals

        class TimedSession:
            def run(self, names, feeds):
                started = _time.thread_time()
                out = session.run(names, feeds)
                totals["run_s"] += _time.thread_time() - started
                totals["runs"] += 1
                totals["rows"] += len(next(iter(feeds.values())))
                return out

        self.session = TimedSession()

    def execute(self, requests):
        started = _time.thread_time()
        responses = super().execute(requests)
        self._totals["execute_s"] += _time.thread_time() - started
        self._totals["calls"] += 1
        if self._totals["calls"] % 50 == 0:
            self._write()
        return responses

    def _write(self):
        with open(self._totals_file, "w") as out:
            json.dump(self._totals, out)

    def finalize(self):
        self._write()
        super().finalize()
'''


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ner-stub-cost-") as scratch:
        repository, totals_dir = Path(scratch) / "repository", Path(scratch) / "totals"
        totals_dir.mkdir()
        shutil.copytree(args.repository / args.model, repository / args.model,
                        ignore=shutil.ignore_patterns("__pycache__"))
        for model_file in (repository / args.model).glob("*/model.py"):
            model_file.write_text(model_file.read_text() + TIMING)
        served = Path(scratch) / "throughput.json"
        subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--repository", str(repository),
                        "--models", args.model, "--clients", str(args.clients), "--paths", "gateway",
                        "--rounds", "1", "--duration", str(args.duration), "--json-out", str(served)],
                       check=True, env={**os.environ, "NER_STUB_COST_DIR": str(totals_dir)},
                       stdout=subprocess.DEVNULL)
        cell = json.loads(served.read_text())["sweep"][f"gateway:{args.model}"][str(args.clients)]
        stubs = [json.loads(f.read_text()) for f in totals_dir.glob("stub-*.json")]
    totals = {key: sum(stub[key] for stub in stubs) for key in ("calls", "runs", "rows", "run_s", "execute_s")}
    rows = totals["rows"]
    run_ms, execute_ms = 1000 * totals["run_s"] / rows, 1000 * totals["execute_s"] / rows
    summary = {
        "model": args.model, "clients": args.clients, "sentences_per_s": cell["sentences_per_s"],
        "triton_avg_batch": cell["triton_avg_batch"],
        "rows_per_call": round(rows / totals["calls"], 2), "runs_per_call": round(totals["runs"] / totals["calls"], 2),
        "cpu_ms_per_sentence": {
            "stubs": cell["cpu_ms_per_sentence_stubs"],
            "model_runs": round(run_ms, 3),
            "rest_of_execute": round(execute_ms - run_ms, 3),
            "stub_itself": round(cell["cpu_ms_per_sentence_stubs"] - execute_ms, 3),
            "tritonserver": cell["cpu_ms_per_sentence_tritonserver"],
            "gateway": cell["cpu_ms_per_sentence_gateway"],
        },
        "note": "stub totals cover the whole serving run (warm-up included); /proc figures cover the measured cell",
    }
    print(json.dumps(summary, indent=2))
    if args.json_out:
        args.json_out.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
