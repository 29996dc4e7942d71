"""``ner-builder build``: checkpoint -> ONNX graphs -> accuracy gate -> Triton model entries with manifests.

One fp32 export (checked against PyTorch) feeds every target: an fp16 graph and the int8 graph each runtime
needs (``ner_builder.runtimes``), from which the runtime builds its artifact. With ``--dataset`` each graph is
scored on the labelled held-out split (the part training never saw) and an artifact whose entity F1 falls more
than ``max_f1_drop`` points below the PyTorch checkpoint is refused; the target then falls back to the next
precision of its runtime (int8 -> fp16 -> fp32), says so on a FALLBACK line and records it in the manifest.
An artifact that cannot run here (an engine needing a GPU) is gated on the ONNX graph it is built from, which
its manifest states. Nothing is installed unless every target succeeds.
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from tokenizers import Tokenizer

from ner_builder import calibration, engine, evaluate, export, precision, repository
from ner_builder.checkpoint import Checkpoint, load_checkpoint
from ner_builder.errors import BuildError
from ner_builder.gate import Gate, GateRules, make_gate
from ner_builder.runtimes.base import ArtifactRequest, Built, Int8Graph
from ner_builder.targets import DEFAULT_TARGET, Target
from ner_builder.triton_config import ServingOptions, to_pbtxt
from ner_gateway.artifact.cjk import cjk_pieces
from ner_gateway.artifact.manifest import (
    TOKENIZER_FILE,
    CalibrationInfo,
    Fallback,
    ModelManifest,
    ParityReport,
    Precision,
    PruningInfo,
    sha256_file,
)
from ner_gateway.artifact.schemes import TaggingScheme, detect_tagging_scheme

LOGGER = logging.getLogger(__name__)

MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
RECORDED_PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "tokenizers")


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

    @property
    def gate_rules(self) -> GateRules:
        return GateRules(self.dataset, self.eval_fraction, self.seed, self.max_f1_drop, self.verify,
                         self.min_reduced_agreement)


@dataclass(frozen=True)
class Graph:
    """One ONNX graph at one precision and how it compares with PyTorch."""

    precision: Precision
    path: Path
    parity: ParityReport
    scores: evaluate.Scores | None
    calibration: CalibrationInfo | None = None


@dataclass(frozen=True)
class Artifact:
    target: Target
    version_dir: Path
    manifest: ModelManifest
    scores: evaluate.Scores | None  # of its graph (the artifact itself, or the graph it was built from)

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


class _Graphs:
    """Derives (once each) the fp32, fp16 and int8 graphs the targets need."""

    def __init__(self, checkpoint: Checkpoint, work: Path, input_names: list[str], options: BuildOptions,
                 gate: Gate, calibration_texts: calibration.CalibrationTexts) -> None:
        self.checkpoint, self.work, self.input_names = checkpoint, work, input_names
        self.options, self.gate, self.calibration_texts = options, gate, calibration_texts
        self._cache: dict[str, Graph] = {}

    def get(self, wanted: Precision, int8: Int8Graph) -> Graph:
        """The graph at ``wanted`` precision; ``int8`` says which int8 graph the asking runtime needs."""
        key = int8.key if wanted is Precision.INT8 else wanted.value
        if key not in self._cache:
            self._cache[key] = self._make(wanted, key, int8)
        return self._cache[key]

    def _make(self, wanted: Precision, key: str, int8: Int8Graph) -> Graph:
        path = self.work / f"{key}.onnx"
        info = None
        if wanted is Precision.FP32:
            export.export_onnx(self.checkpoint, path, self.input_names, self.options.opset)
            parity = export.check_parity(self.checkpoint, path, self.input_names, list(self.options.sample_texts),
                                         self.options.atol, self.options.min_argmax_agreement)
            return Graph(wanted, path, parity, self.gate.score(path))
        source = self.get(Precision.FP32, int8).path
        if wanted is Precision.FP16:
            precision.convert_fp16(source, path)
        else:
            feeds = calibration.feeds(self.checkpoint.tokenizer, self.calibration_texts.texts, self.input_names,
                                      self.checkpoint.max_length) if int8.mode == "static" else []
            info = precision.quantize_int8(source, path, feeds, mode=int8.mode, activation=int8.activation,
                                           source_description=self.calibration_texts.source)
        rows_alone = info is not None and info.rows_alone
        parity = export.measure_parity(self.checkpoint, path, self.input_names, list(self.options.sample_texts),
                                       rows_alone)
        return Graph(wanted, path, parity, self.gate.score(path, rows_alone), info)


@dataclass(frozen=True)
class _Plan:
    """A target and the graph (of its fallback chain) that passed the gate."""

    target: Target
    graph: Graph
    fallback: Fallback | None


@dataclass(frozen=True)
class _Context:
    """What every artifact of one build shares."""

    name: str
    checkpoint: Checkpoint
    input_names: list[str]
    max_length: int
    options: BuildOptions
    gate: Gate
    pruning: PruningInfo | None
    staged: Path  # the staging folder inside the repository; one version folder per model in it
    tokenizer_file: Path


@dataclass(frozen=True)
class _Staged:
    """A version folder written in the staging folder, waiting for every other target to succeed."""

    plan: _Plan
    directory: Path
    manifest: ModelManifest
    config_pbtxt: str


def _check_names(name: str, targets: tuple[Target, ...]) -> None:
    for model_name in [name, *(t.model_name(name) for t in targets)]:
        if not MODEL_NAME.match(model_name):
            raise BuildError(f"invalid model name {model_name!r}: use letters, digits, '_', '.', '-' "
                             "(at most 128 characters)")


def _resolve(target: Target, name: str, graphs: _Graphs, gate: Gate) -> tuple[_Plan, list[str]]:
    """The highest-compression graph of ``target``'s chain that passes the gate, and the FALLBACK lines."""
    chain = [target, *target.fallbacks()]
    int8 = target.runtime.int8_graph(graphs.options.int8_mode)
    refusals: list[str] = []
    lines: list[str] = []
    for candidate, following in zip(chain, [*chain[1:], None], strict=True):
        graph = graphs.get(candidate.precision, int8)
        reason = gate.refusal(graph.precision, graph.parity, graph.scores)
        if reason is None:
            fallback = Fallback(requested_precision=target.precision, reason="; ".join(refusals)) if refusals else None
            return _Plan(target, graph, fallback), lines
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
    gate, train_split = make_gate(checkpoint, input_names, max_length, options.gate_rules)
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
        plans: list[_Plan] = []
        fallbacks: list[str] = []
        for target in options.targets:
            plan, lines = _resolve(target, name, graphs, gate)
            fallbacks.extend(lines)
            plans.append(plan)
        context = _Context(name, checkpoint, input_names, max_length, options, gate, pruning, staged,
                           work / TOKENIZER_FILE)
        staged_versions = [_stage(context, plan) for plan in plans]
        artifacts = [_install(repository_path, version) for version in staged_versions]
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return BuildResult(artifacts, fallbacks, gate.reference_f1, gate.sentences)


def _stage(context: _Context, plan: _Plan) -> _Staged:
    runtime = plan.target.runtime
    directory = context.staged / plan.target.model_name(context.name)
    directory.mkdir()
    shutil.copyfile(context.tokenizer_file, directory / TOKENIZER_FILE)
    repository.write_label_map(directory, context.checkpoint.labels)
    built = runtime.build(ArtifactRequest(plan.graph.path, directory, context.max_length, context.options.serving,
                                          context.options.engine))
    manifest = _manifest(context, plan, directory, built)
    manifest.write(directory)
    return _Staged(plan, directory, manifest, to_pbtxt(runtime.config(manifest, context.options.serving)))


def _manifest(context: _Context, plan: _Plan, directory: Path, built: Built) -> ModelManifest:
    target, graph, options, checkpoint = plan.target, plan.graph, context.options, context.checkpoint
    runtime = target.runtime
    model_name = target.model_name(context.name)
    return ModelManifest(
        name=model_name,
        version=str(options.version or repository.next_version(context.staged.parent / model_name)),
        labels=checkpoint.labels,
        tagging_scheme=options.tagging_scheme or detect_tagging_scheme(checkpoint.labels),
        max_sequence_length=built.max_sequence_length,
        precision=graph.precision,
        model_format=runtime.model_format,
        model_file=runtime.model_file,
        model_sha256=sha256_file(directory / runtime.model_file),
        opset=options.opset,
        inputs=context.input_names,
        output=export.OUTPUT_NAME,
        tokenizer_sha256=sha256_file(directory / TOKENIZER_FILE),
        cjk_pieces=cjk_pieces(Tokenizer.from_file(str(directory / TOKENIZER_FILE))),
        source_checkpoint=str(checkpoint.path.resolve()),
        package_versions={p: importlib.metadata.version(p) for p in RECORDED_PACKAGES},
        parity=graph.parity.model_copy(update={"measured_on": runtime.measured_on}),
        created_at=datetime.now(UTC),
        target=target.name,
        onnxruntime_version=importlib.metadata.version("onnxruntime"),
        engine=built.engine,
        calibration=graph.calibration,
        pruning=context.pruning,
        accuracy=context.gate.accuracy(graph.scores, runtime.measured_on),
        fallback=plan.fallback,
    )


def _install(repository_path: Path, staged: _Staged) -> Artifact:
    manifest, target = staged.manifest, staged.plan.target
    version_dir = repository.install_version(staged.directory, repository_path / manifest.name, int(manifest.version),
                                             staged.config_pbtxt, target.runtime.required_files)
    LOGGER.info("installed %s (%s, %s)", version_dir, target, manifest.precision)
    return Artifact(target, version_dir, manifest, staged.plan.graph.scores)
