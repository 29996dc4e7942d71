"""``ner-builder verify REPOSITORY/NAME``: score every artifact of a model against its PyTorch checkpoint.

The artifacts of NAME are the model ``NAME`` (onnx-fp32) and every ``NAME-<target>`` beside it (latest
version each). Per artifact: max |logit diff| and argmax agreement against the checkpoint named in the
manifest (``source_checkpoint``), and entity-level F1 on the labelled held-out split of ``--dataset``
(the same seeded split ``ner-builder train`` held out), or, with ``--texts``, F1 of its entities against
the checkpoint's own. ONNX graphs run in ONNX Runtime on CPU. An artifact its runtime cannot run here (an
engine needing a GPU) is reported as not run; the ONNX graph it was built from (kept beside it) is scored
instead and labelled so.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ner_builder import evaluate
from ner_builder.checkpoint import load_checkpoint
from ner_builder.errors import BuildError
from ner_builder.gate import load_split
from ner_builder.runtimes.base import Runtime
from ner_builder.targets import TARGET_NAMES, parse_target
from ner_gateway.artifact.manifest import MANIFEST_FILE, ModelManifest, latest_version_dir

if TYPE_CHECKING:
    from ner_builder.build import BuildResult

LOGGER = logging.getLogger(__name__)

NOT_RUN = "not run (needs GPU)"


@dataclass(frozen=True)
class Row:
    model: str
    version: str
    target: str
    precision: str
    runtime: str
    scores: evaluate.Scores | None  # None: not run here
    graph_scores: evaluate.Scores | None = None  # not run here: the ONNX graph the artifact was built from
    fallback: str = ""


@dataclass(frozen=True)
class Report:
    data: str
    sentences: int
    labelled: bool
    reference_f1: float | None
    rows: list[Row]

    def to_json(self) -> dict[str, Any]:
        return {
            "data": self.data, "sentences": self.sentences, "labelled": self.labelled,
            "reference": {"model": "pytorch checkpoint", "f1": self.reference_f1},
            "artifacts": [
                {**{k: v for k, v in asdict(row).items() if k not in ("scores", "graph_scores")},
                 "ran": row.scores is not None,
                 "scores": asdict(row.scores) if row.scores else None,
                 "graph_scores": asdict(row.graph_scores) if row.graph_scores else None,
                 "f1_drop_points": self.drop(row.scores or row.graph_scores)}
                for row in self.rows
            ],
        }

    def drop(self, scores: evaluate.Scores | None) -> float | None:
        drop = scores.f1_drop(self.reference_f1) if scores is not None else None
        return round(drop, 4) if drop is not None else None

    def table(self) -> str:
        f1_name = "F1" if self.labelled else "F1 vs PyTorch"
        header = ["model", "target", "precision", "runtime", "max |dlogit|", "argmax agree", f1_name, "dF1 pts", "note"]
        rows = [["pytorch checkpoint", "-", "fp32", "torch", "0", "100.00%",
                 _f1(self.reference_f1) if self.labelled else "1.0000", "0.00", "reference"]]
        for row in self.rows:
            note = row.fallback
            if row.scores is None:
                cells = ["-", "-", "-", "-"]
                graph = row.graph_scores
                parts = [NOT_RUN]
                if graph is not None:
                    parts.append(f"its ONNX graph: F1 {_f1(self._f1(graph))}, dF1 {_pts(self.drop(graph))}, "
                                 f"agree {graph.argmax_agreement:.2%}")
                note = "; ".join([*parts, note] if note else parts)
            else:
                s = row.scores
                cells = [f"{s.max_abs_logit_diff:.3g}", f"{s.argmax_agreement:.2%}", _f1(self._f1(s)),
                         _pts(self.drop(s))]
            rows.append([row.model, row.target, row.precision, row.runtime, *cells, note])
        widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
        lines = []
        for r in [header, *rows]:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
        lines.insert(1, "-" * len(lines[0]))
        title = f"{self.data}: {self.sentences} sentences" + ("" if self.labelled else " (unlabelled)")
        return title + "\n" + "\n".join(line.rstrip() for line in lines)

    def _f1(self, scores: evaluate.Scores) -> float | None:
        return scores.f1 if self.labelled else scores.f1_vs_reference


def _f1(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _pts(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def find_artifacts(model_path: Path) -> list[tuple[Path, ModelManifest]]:
    """REPOSITORY/NAME -> the latest version of NAME and of every NAME-<target> beside it."""
    repository, name = model_path.parent, model_path.name
    if not repository.is_dir():
        raise BuildError(f"model repository {repository} does not exist")
    family = sorted(p for p in repository.iterdir() if p.is_dir() and (
        p.name == name or (p.name.startswith(f"{name}-") and p.name[len(name) + 1 :] in TARGET_NAMES)))
    found: list[tuple[Path, ModelManifest]] = []
    for model_dir in family:
        version_dir = latest_version_dir(model_dir)
        if version_dir is not None and (version_dir / MANIFEST_FILE).is_file():
            found.append((version_dir, ModelManifest.read(version_dir)))
    if not found:
        raise BuildError(f"no ner-builder artifacts named {name} or {name}-<target> in {repository}")
    return found


def verify(model_path: Path, *, dataset: str | None = None, texts: list[str] | None = None,
           eval_fraction: float = 0.15, seed: int = 13, checkpoint: Path | None = None) -> Report:
    if (dataset is None) == (texts is None):
        raise BuildError("give exactly one of --dataset or --texts")
    gold: list[list[str]] | None = None
    if dataset is not None:
        held_out = load_split(dataset, eval_fraction, seed).labelled_held_out("verify")
        name, sentences, gold = f"{dataset} held-out split", held_out.sentences, held_out.tags
    else:
        name, sentences = "texts", [t.split() for t in texts or [] if t.split()]
        if not sentences:
            raise BuildError("no texts to verify on")
    artifacts = find_artifacts(model_path)
    references: dict[str, tuple[list[str], evaluate.Reference]] = {}
    rows: list[Row] = []
    for version_dir, manifest in artifacts:
        source = str(checkpoint or manifest.source_checkpoint)
        if source not in references:
            references[source] = _reference(Path(source), name, sentences, gold, manifest.inputs)
        labels, ref = references[source]
        if labels != manifest.labels:
            raise BuildError(f"{manifest.name}: labels differ from its checkpoint {source}")
        runtime = parse_target(manifest.target).runtime
        graph = runtime.scored_graph(version_dir, manifest)
        if not runtime.runs_on_cpu:
            LOGGER.info("%s: %s (%s): %s", manifest.name, manifest.model_file, runtime.describe(manifest), NOT_RUN)
        # A missing artifact fails loudly; a missing stand-in graph is only reported as not scored.
        scored = runtime.runs_on_cpu or graph.is_file()
        scores = evaluate.score_onnx(graph, ref, labels, manifest.inputs, manifest.rows_alone) if scored else None
        rows.append(_scored_row(manifest, runtime, scores))
    _, first = next(iter(references.values()))
    return Report(name, len(sentences), gold is not None, first.f1, rows)


def _reference(path: Path, name: str, sentences: list[list[str]], gold: list[list[str]] | None,
               input_names: list[str]) -> tuple[list[str], evaluate.Reference]:
    if not path.is_dir():
        raise BuildError(f"source checkpoint {path} (from the manifest) does not exist; pass --checkpoint")
    ckpt = load_checkpoint(path)
    return ckpt.labels, evaluate.reference(ckpt, name, sentences, gold, input_names, ckpt.max_length)


def build_report(result: BuildResult, dataset: str) -> Report:
    """The table of a ``build`` with a dataset: the gate's scores, of the artifact or the graph it was built from."""
    rows = [_scored_row(a.manifest, a.target.runtime, a.scores) for a in result.artifacts]
    return Report(f"{dataset} held-out split", result.eval_sentences, True, result.reference_f1, rows)


def _scored_row(manifest: ModelManifest, runtime: Runtime, scores: evaluate.Scores | None) -> Row:
    """``scores`` are the artifact's when its runtime runs it here, else those of the graph it was built from."""
    artifact_scores, graph_scores = (scores, None) if runtime.runs_on_cpu else (None, scores)
    fallback = f"fallback from {manifest.fallback.requested_precision}" if manifest.fallback else ""
    return Row(manifest.name, manifest.version, manifest.target, manifest.precision, runtime.describe(manifest),
               artifact_scores, graph_scores, fallback)

