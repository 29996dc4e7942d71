"""``ner-builder build``: checkpoint -> ONNX graphs -> accuracy gate -> Triton model entries with manifests.

One fp32 export (checked against PyTorch) feeds every target: an fp16 graph, an int8 Q/DQ (or dynamic)
graph, and TensorRT engines built from those graphs. With ``--dataset`` each graph is scored on the
labelled held-out split (the part training never saw) and an artifact whose entity F1 falls more than
``max_f1_drop`` points below the PyTorch checkpoint is refused; the target then falls back to the next
precision of its runtime (int8 -> fp16 -> fp32), says so on a FALLBACK line and records it in the
manifest. Engines cannot run here: they are gated on the ONNX graph they are built from (scored with ONNX
Runtime), which the manifest states. Nothing is installed unless every target succeeds.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer

from ner_builder import calibration, engine, evaluate, export, precision, repository
from ner_builder.checkpoint import Checkpoint, load_checkpoint
from ner_builder.errors import BuildError
from ner_builder.targets import DEFAULT_TARGET, Target
from ner_builder.triton_config import ServingOptions, python_onnx_config, tensorrt_plan_config, to_pbtxt
from ner_gateway.spec.cjk import cjk_pieces
from ner_gateway.spec.manifest import (
    TOKENIZER_FILE,
    AccuracyReport,
    CalibrationInfo,
    Fallback,
    ModelManifest,
    ParityReport,
    Precision,
    PruningInfo,
    TaggingScheme,
    detect_tagging_scheme,
    sha256_file,
)

if TYPE_CHECKING:
    from ner_builder.datasets import NerDataset

LOGGER = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RECORDED_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "tokenizers")
ENGINE_GRAPH = "onnx graph (onnxruntime CPU); the engine itself was not run (needs a GPU)"


@dataclass(frozen=True)
class BuildOptions:
    version: int | None = None
    opset: int = 17
    atol: float = 1e-3
    min_argmax_agreement: float = 0.99
    sample_texts: tuple[str, ...] = tuple(export.SAMPLE_TEXTS)
    tagging_scheme: TaggingScheme | None = None
    max_length: int | None = None
    serving: ServingOptions = field(default_factory=ServingOptions)
    targets: tuple[Target, ...] = (DEFAULT_TARGET,)
    dataset: str | None = None  # labelled data for the F1 gate (held-out split)
    eval_fraction: float = 0.15  # same split as `ner-builder train`
    seed: int = 13
    max_f1_drop: float = 1.0  # F1 points below the PyTorch checkpoint
    verify: bool = True  # with a dataset: run the F1 gate (else the dataset only supplies calibration texts)
    min_reduced_agreement: float = 0.95  # gate for fp16/int8 when there is no dataset: argmax agreement
    calibration_file: Path | None = None
    calibration_limit: int = calibration.DEFAULT_LIMIT
    # onnx-int8 only (engines always use the static Q/DQ graph). Dynamic: fastest served on CPU, and exactly
    # batch-invariant because the served model runs its rows alone (CalibrationInfo.rows_alone).
    int8_mode: str = "dynamic"
    prune_heads: int = 0
    engine: engine.EngineOptions = field(default_factory=engine.EngineOptions)


@dataclass(frozen=True)
class Graph:
    """One ONNX graph at one precision and how it compares with PyTorch."""

    precision: Precision
    path: Path
    parity: ParityReport
    scores: evaluate.Scores | None
    calibration: CalibrationInfo | None = None

    @property
    def rows_alone(self) -> bool:
        """Served (and scored) one unpadded row at a time: CalibrationInfo.rows_alone."""
        return self.calibration is not None and self.calibration.rows_alone


@dataclass(frozen=True)
class Artifact:
    target: Target
    version_dir: Path
    manifest: ModelManifest
    scores: evaluate.Scores | None  # of its graph (for an engine: the graph it was built from)

    @property
    def model_name(self) -> str:
        return self.manifest.name


@dataclass(frozen=True)
class BuildResult:
    artifacts: list[Artifact]
    fallbacks: list[str] = field(default_factory=list)
    reference_f1: float | None = None
    eval_sentences: int = 0

    @property
    def version_dir(self) -> Path:
        return self.artifacts[0].version_dir

    @property
    def manifest(self) -> ModelManifest:
        return self.artifacts[0].manifest


def save_serving_tokenizer(tokenizer_json: str, path: Path) -> None:
    """Save the fast tokenizer with truncation and padding off: the gateway never truncates silently."""
    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    tokenizer.save(str(path))


@dataclass
class _Gate:
    """The held-out split, the PyTorch reference on it, and the rule an artifact must pass."""

    ref: evaluate.Reference | None  # None: no --dataset (or --no-verify), so no F1 gate
    options: BuildOptions
    labels: list[str]
    input_names: list[str]

    @property
    def reference_f1(self) -> float | None:
        return self.ref.f1 if self.ref is not None else None

    def score(self, path: Path, rows_alone: bool = False) -> evaluate.Scores | None:
        if self.ref is None:
            return None
        return evaluate.score_onnx(path, self.ref, self.labels, self.input_names, rows_alone)

    def refusal(self, graph: Graph) -> str | None:
        """Why ``graph`` may not be installed, or None when it passes."""
        scores = graph.scores
        if scores is not None and (drop := scores.f1_drop(self.reference_f1)) is not None:
            if drop > self.options.max_f1_drop:
                return (f"F1 {scores.f1:.4f} is {drop:.2f} points below the PyTorch checkpoint's "
                        f"{self.reference_f1:.4f} (max drop {self.options.max_f1_drop:.1f})")
            return None
        agreement = graph.parity.argmax_agreement
        if graph.precision is not Precision.FP32 and agreement < self.options.min_reduced_agreement:
            return (f"argmax agreement with PyTorch {agreement:.2%} on {graph.parity.texts} sample texts is below "
                    f"{self.options.min_reduced_agreement:.0%} (no --dataset, so no F1 gate)")
        return None


class _Graphs:
    """Derives (once each) the fp32, fp16 and int8 graphs the targets need."""

    def __init__(self, checkpoint: Checkpoint, work: Path, input_names: list[str], options: BuildOptions,
                 gate: _Gate, calibration_texts: calibration.CalibrationTexts) -> None:
        self.checkpoint, self.work, self.input_names = checkpoint, work, input_names
        self.options, self.gate, self.calibration_texts = options, gate, calibration_texts
        self._cache: dict[str, Graph] = {}

    def get(self, wanted: Precision, for_engine: bool) -> Graph:
        mode = "static" if for_engine else self.options.int8_mode
        # TensorRT needs symmetric (s8) activations; CPUs run u8 activations x s8 weights fastest.
        activation = "s8" if for_engine else "u8"
        key = f"int8-{mode}-{activation}" if wanted is Precision.INT8 else wanted.value
        if key not in self._cache:
            self._cache[key] = self._make(wanted, key, mode, activation)
        return self._cache[key]

    def _make(self, wanted: Precision, key: str, mode: str, activation: str) -> Graph:
        path = self.work / f"{key}.onnx"
        info = None
        if wanted is Precision.FP32:
            export.export_onnx(self.checkpoint, path, self.input_names, self.options.opset)
            parity = export.check_parity(self.checkpoint, path, self.input_names, list(self.options.sample_texts),
                                         self.options.atol, self.options.min_argmax_agreement)
            return Graph(wanted, path, parity, self.gate.score(path))
        source = self.get(Precision.FP32, False).path
        if wanted is Precision.FP16:
            precision.convert_fp16(source, path)
        else:
            feeds = calibration.feeds(self.checkpoint.tokenizer, self.calibration_texts.texts, self.input_names,
                                      self.checkpoint.max_length) if mode == "static" else []
            info = precision.quantize_int8(source, path, feeds, mode=mode, activation=activation,
                                           source_description=self.calibration_texts.source)
        rows_alone = info is not None and info.rows_alone
        parity = export.measure_parity(self.checkpoint, path, self.input_names, list(self.options.sample_texts),
                                       rows_alone)
        return Graph(wanted, path, parity, self.gate.score(path, rows_alone), info)


def _check_names(name: str, targets: tuple[Target, ...]) -> None:
    for model_name in [name, *(t.model_name(name) for t in targets)]:
        if not MODEL_NAME.match(model_name):
            raise BuildError(f"invalid model name {model_name!r}: use letters, digits, '_', '.', '-' "
                             "(at most 128 characters)")


def _make_gate(checkpoint: Checkpoint, input_names: list[str], max_length: int, options: BuildOptions
               ) -> tuple[_Gate, NerDataset | None]:
    """The held-out evaluation set and PyTorch reference (computed before any pruning)."""
    if options.dataset is None:
        return _Gate(None, options, checkpoint.labels, input_names), None
    from ner_builder.datasets import DatasetError, held_out_split, load_dataset

    try:
        dataset = load_dataset(options.dataset)
        train_split, held_out = held_out_split(dataset, eval_fraction=options.eval_fraction, seed=options.seed)
    except DatasetError as e:
        raise BuildError(str(e)) from e
    if not options.verify:
        return _Gate(None, options, checkpoint.labels, input_names), train_split
    if dataset.char_level:
        raise BuildError(f"the accuracy gate scores word-level datasets; {options.dataset} is character-level")
    missing = sorted(set(dataset.labels) - set(checkpoint.labels))
    if missing:
        raise BuildError(f"{checkpoint.path} was not trained on {options.dataset}: its labels lack {missing[:5]}")
    ref = evaluate.reference(checkpoint, held_out.name, held_out.sentences, held_out.tags, input_names, max_length)
    LOGGER.info("PyTorch checkpoint: entity F1 %.4f on %d held-out %s sentences", ref.f1, len(held_out),
                options.dataset)
    return _Gate(ref, options, checkpoint.labels, input_names), train_split


def _resolve(target: Target, name: str, graphs: _Graphs, gate: _Gate) -> tuple[Graph, Fallback | None, list[str]]:
    """The highest-compression graph of ``target``'s chain that passes the gate, and the FALLBACK lines."""
    chain = [target, *target.fallbacks()]
    refusals: list[str] = []
    lines: list[str] = []
    for candidate, following in zip(chain, [*chain[1:], None], strict=True):
        graph = graphs.get(candidate.precision, target.is_engine)
        reason = gate.refusal(graph)
        if reason is None:
            fallback = Fallback(requested_precision=target.precision, reason="; ".join(refusals)) if refusals else None
            return graph, fallback, lines
        refusals.append(f"{candidate.precision}: {reason}")
        if following is not None:
            line = (f"FALLBACK {target.model_name(name)} ({target}): {candidate.precision} refused, {reason}; "
                    f"trying {following.precision}")
            LOGGER.warning("%s", line)
            lines.append(line)
    raise BuildError(f"{target.model_name(name)} ({target}): no precision passes the accuracy gate: "
                     + "; ".join(refusals))


def build_model(checkpoint_path: Path, repository_path: Path, name: str, options: BuildOptions) -> BuildResult:
    _check_names(name, options.targets)
    if options.prune_heads < 0 or options.max_f1_drop < 0:
        raise BuildError("--prune-heads and --max-f1-drop must not be negative")
    checkpoint = load_checkpoint(checkpoint_path)
    max_length = options.max_length or checkpoint.max_length
    if max_length > checkpoint.max_length:
        raise BuildError(f"--max-length {max_length} exceeds the model's limit {checkpoint.max_length}")
    input_names = export.model_input_names(checkpoint)
    gate, train_split = _make_gate(checkpoint, input_names, max_length, options)
    texts = calibration.choose_texts(options.calibration_file, train_split, options.calibration_limit)
    pruning = None
    if options.prune_heads:
        from ner_builder.prune import prune_heads

        pruning = prune_heads(checkpoint.model, options.prune_heads,
                              calibration.feeds(checkpoint.tokenizer, texts.texts, input_names, max_length))

    staged = repository.staging_dir(repository_path)
    try:
        work = staged / ".graphs"
        work.mkdir()
        save_serving_tokenizer(checkpoint.tokenizer.backend_tokenizer.to_str(), work / TOKENIZER_FILE)
        graphs = _Graphs(checkpoint, work, input_names, options, gate, texts)
        planned, fallbacks = [], []
        for target in options.targets:
            graph, fallback, lines = _resolve(target, name, graphs, gate)
            fallbacks.extend(lines)
            planned.append((target, graph, fallback))
        staged_artifacts = [
            _stage(staged, target, graph, fallback, name, checkpoint, input_names, max_length,
                   options, gate, pruning, work / TOKENIZER_FILE)
            for target, graph, fallback in planned
        ]
        artifacts = []
        for target, directory, manifest, config_text, scores in staged_artifacts:
            model_dir = repository_path / manifest.name
            version = int(manifest.version)
            required = repository.ENGINE_FILES if target.is_engine else repository.ONNX_FILES
            version_dir = repository.install_version(directory, model_dir, version, config_text, required)
            LOGGER.info("installed %s (%s, %s)", version_dir, target, manifest.precision)
            artifacts.append(Artifact(target, version_dir, manifest, scores))
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return BuildResult(artifacts, fallbacks, gate.reference_f1, len(gate.ref.data.sentences) if gate.ref else 0)


def _stage(
    staged: Path, target: Target, graph: Graph, fallback: Fallback | None, name: str, checkpoint: Checkpoint,
    input_names: list[str], max_length: int, options: BuildOptions, gate: _Gate,
    pruning: PruningInfo | None, tokenizer_file: Path,
) -> tuple[Target, Path, ModelManifest, str, evaluate.Scores | None]:
    model_name = target.model_name(name)
    version = options.version or repository.next_version(staged.parent / model_name)
    directory = staged / model_name
    directory.mkdir()
    shutil.copyfile(graph.path, directory / "model.onnx")
    shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    repository.write_label_map(directory, checkpoint.labels)
    engine_info, sequence_limit, parity = None, max_length, graph.parity
    measured_on = "artifact"
    if target.is_engine:
        built = engine.build_engine(graph.path, max_length,
                                    replace(options.engine, max_batch_size=options.serving.max_batch_size))
        (directory / "model.plan").write_bytes(built.plan)
        engine_info, sequence_limit = built.info, built.max_sequence_length
        measured_on = ENGINE_GRAPH
        parity = graph.parity.model_copy(update={"measured_on": measured_on})
        model_file, model_format = "model.plan", "tensorrt_plan"
    else:
        repository.write_python_model(directory)
        model_file, model_format = "model.onnx", "onnx"
    accuracy = None
    if graph.scores is not None and graph.scores.f1 is not None and gate.reference_f1 is not None:
        accuracy = AccuracyReport(dataset=options.dataset or "", sentences=graph.scores.sentences, f1=graph.scores.f1,
                                  reference_f1=gate.reference_f1, max_f1_drop=options.max_f1_drop,
                                  measured_on=measured_on)
    manifest = ModelManifest(
        name=model_name,
        version=str(version),
        labels=checkpoint.labels,
        tagging_scheme=options.tagging_scheme or detect_tagging_scheme(checkpoint.labels),
        max_sequence_length=sequence_limit,
        precision=graph.precision,
        model_format=model_format,
        model_file=model_file,
        model_sha256=sha256_file(directory / model_file),
        opset=options.opset,
        inputs=input_names,
        output=export.OUTPUT_NAME,
        tokenizer_sha256=sha256_file(directory / TOKENIZER_FILE),
        cjk_pieces=cjk_pieces(Tokenizer.from_file(str(directory / TOKENIZER_FILE))),
        source_checkpoint=str(checkpoint.path.resolve()),
        package_versions={p: importlib.metadata.version(p) for p in RECORDED_PACKAGES},
        parity=parity,
        created_at=datetime.now(UTC),
        target=target.name,
        onnxruntime_version=importlib.metadata.version("onnxruntime"),
        engine=engine_info,
        calibration=graph.calibration,
        pruning=pruning,
        accuracy=accuracy,
        fallback=fallback,
    )
    manifest.write(directory)
    if target.is_engine:
        config = tensorrt_plan_config(model_name, input_names, export.OUTPUT_NAME, len(checkpoint.labels),
                                      options.serving)
    else:
        config = python_onnx_config(model_name, input_names, export.OUTPUT_NAME, len(checkpoint.labels),
                                    options.serving, graph.rows_alone)
    return target, directory, manifest, to_pbtxt(config), graph.scores
