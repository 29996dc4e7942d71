"""Fine-tune a token classifier from a local base encoder on a labelled NER dataset (CPU-friendly).

The loop is ``transformers.Trainer`` (``ner_builder.ner_trainer``): ``DataCollatorForTokenClassification``
pads, its linear schedule warms up, the held-out split is scored each epoch with seqeval's entity F1 and
the best epoch is the one saved (optionally stopping early). What this project adds: label alignment
(``ner_builder.token_alignment``), the recipes (LoRA: ``ner_builder.lora``; distillation into fewer
layers: ``ner_builder.distill``; augmentation of the training split: ``ner_builder.augment``), and the
entity-level report written beside the checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ner_builder.checkpoint import model_max_length
from ner_builder.datasets import NerDataset, head, held_out_split
from ner_builder.distill import DistillError, DistillOptions
from ner_builder.lora import LoraOptions
from ner_builder.token_alignment import encode_dataset, gold_tags, predicted_tags
from ner_gateway.artifact.cjk import cjk_pieces

LOGGER = logging.getLogger(__name__)

FULL_BODY_LR = 2e-4
LORA_BODY_LR = 1e-3  # adapters start at zero and are few: they take a larger step than full fine-tuning
# Config attributes that hold a dropout probability, across BERT-family architectures.
DROPOUT_ATTRIBUTES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout", "dropout",
                      "attention_dropout", "seq_classif_dropout")


class TrainError(Exception):
    """Training cannot start or finish; the message is meant to be shown to a user as is."""


@dataclass(frozen=True)
class TrainOptions:
    """How to train. ``body_lr`` None means 2e-4, or 1e-3 for LoRA adapters."""

    epochs: int = 3
    batch_size: int = 16
    max_length: int = 128
    body_lr: float | None = None
    head_lr: float = 3e-3
    weight_decay: float = 0.01
    dropout: float | None = None  # overrides every dropout of the model config when set
    max_grad_norm: float = 1.0
    warmup: float = 0.1  # fraction of the steps
    eval_fraction: float = 0.15
    seed: int = 13
    limit: int | None = None
    eval_limit: int | None = None
    freeze_embeddings: bool = False
    group_by_length: bool = False
    isolate_cjk: bool = True
    early_stopping_patience: int | None = None
    augment: float = 0.0  # augmented sentences added, as a fraction of the training split
    lora: LoraOptions | None = None
    distill: DistillOptions | None = None

    @property
    def recipe(self) -> str:
        return "distilled" if self.distill else "lora" if self.lora else "full"

    @property
    def resolved_body_lr(self) -> float:
        if self.body_lr is not None:
            return self.body_lr
        return LORA_BODY_LR if self.lora else FULL_BODY_LR


@dataclass(frozen=True)
class TrainResult:
    output: Path
    f1: float
    precision: float
    recall: float
    train_sentences: int
    eval_sentences: int
    seconds: float
    trainable_parameters: int = 0
    total_parameters: int = 0
    augmented_sentences: int = 0


def _check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise TrainError(f"{what} directory {path} does not exist")
    if not path.is_dir():
        raise TrainError(f"{what} {path} is not a directory")
    if not (path / "config.json").is_file():
        raise TrainError(f"{what} directory {path} has no config.json (expected a local HF checkpoint)")


def _validate(options: TrainOptions) -> None:
    if options.epochs < 1 or options.batch_size < 1 or options.max_length < 2:
        raise TrainError("epochs and batch_size must be >= 1 and max_length >= 2")
    for option, value in (("limit", options.limit), ("eval_limit", options.eval_limit)):
        if value is not None and value < 1:
            raise TrainError(f"{option} must be >= 1, got {value}")
    if options.dropout is not None and not 0 <= options.dropout < 1:
        raise TrainError(f"dropout must be in [0, 1), got {options.dropout}")
    if options.augment < 0:
        raise TrainError(f"augment must be >= 0, got {options.augment}")
    if options.lora and options.distill:
        raise TrainError("choose one of LoRA and distillation")


def _isolate_cjk(tokenizer: Any, dataset: NerDataset) -> Any:
    from ner_builder.isolate_cjk import CjkIsolationError, isolate_cjk

    try:
        isolated = isolate_cjk(tokenizer)
    except CjkIsolationError as exc:
        if dataset.char_level:  # its labels are per character: merged pieces would blur every span
            raise TrainError(f"{exc}; train {dataset.name} on a tokenizer that can isolate them") from exc
        LOGGER.warning("%s; keeping its pieces as they are", exc)
        return tokenizer
    if isolated is not tokenizer:
        LOGGER.info("CJK ideographs isolated in the tokenizer: one piece per character")
    return isolated


def _config(path: Path, labels: list[str], dropout: float | None, teacher: bool) -> Any:
    from transformers import AutoConfig

    if teacher:  # a student keeps its teacher's label map, which must be the dataset's
        config = AutoConfig.from_pretrained(path)
        teacher_labels = [config.id2label[i] for i in range(config.num_labels)]
        if teacher_labels != labels:
            raise TrainError(f"the teacher {path} was trained on other labels ({teacher_labels}) than the "
                             f"dataset's ({labels})")
    else:
        id2label, label2id = dict(enumerate(labels)), {tag: i for i, tag in enumerate(labels)}
        config = AutoConfig.from_pretrained(path, id2label=id2label, label2id=label2id)
    if dropout is not None:
        for attribute in DROPOUT_ATTRIBUTES:
            if hasattr(config, attribute):
                setattr(config, attribute, dropout)
    return config


def _load(source: Path, labels: list[str], options: TrainOptions) -> tuple[Any, Any, Any]:
    """(tokenizer, model to train, teacher or None) from ``source``, the base or the teacher to distil."""
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    distilling = options.distill is not None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        config = _config(source, labels, options.dropout, teacher=distilling)
        # ignore_mismatched_sizes: a base may already carry a head for another label set (never a teacher)
        model = AutoModelForTokenClassification.from_pretrained(
            source, config=config, ignore_mismatched_sizes=not distilling
        )
    except (OSError, ValueError) as exc:
        raise TrainError(f"cannot load a tokenizer and token classifier from {source}: {exc}") from exc
    if not tokenizer.is_fast:
        raise TrainError(f"{source} has no fast tokenizer (tokenizer.json); word alignment needs one")
    if options.distill is None:
        return tokenizer, model, None

    from ner_builder.distill import make_student

    try:
        student = make_student(model, options.distill.student_layers)
    except DistillError as exc:
        raise TrainError(str(exc)) from exc
    LOGGER.info("student: %d of the teacher's %d layers", options.distill.student_layers,
                model.config.num_hidden_layers)
    return tokenizer, student, model


def _freeze_word_embeddings(model: Any) -> int:
    """Stop training the input word embeddings (250k x 384 for XLM-R: most of the memory and step time)."""
    weight = model.get_input_embeddings().weight
    weight.requires_grad_(False)
    return int(weight.numel())


def entity_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    from seqeval.metrics import f1_score, precision_score, recall_score

    return {
        "precision": float(precision_score(gold, predicted, zero_division=0)),
        "recall": float(recall_score(gold, predicted, zero_division=0)),
        "f1": float(f1_score(gold, predicted, zero_division=0)),
    }


def _write_reports(
    output: Path, gold: list[list[str]], predicted: list[list[str]], metrics: dict[str, Any]
) -> None:
    from seqeval.metrics import classification_report

    report = classification_report(gold, predicted, digits=4, zero_division=0)
    summary = (
        f"dataset={metrics['dataset']} base={metrics['base']} recipe={metrics['recipe']}\n"
        f"train_sentences={metrics['train_sentences']} (+{metrics['augmented_sentences']} augmented) "
        f"eval_sentences={metrics['eval_sentences']} epochs={metrics['epochs']} (best {metrics['best_epoch']}) "
        f"seconds={metrics['seconds']:.1f}\n"
        f"trainable parameters={metrics['trainable_parameters']} of {metrics['total_parameters']}\n"
        f"micro precision={metrics['precision']:.4f} recall={metrics['recall']:.4f} f1={metrics['f1']:.4f}\n"
    )
    (output / "eval_report.txt").write_text(report + "\n" + summary, encoding="utf-8")
    (output / "eval_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def _training_arguments(options: TrainOptions, folder: str, progress: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=folder,
        num_train_epochs=options.epochs,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size * 2,
        learning_rate=options.resolved_body_lr,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        lr_scheduler_type="linear",
        warmup_steps=options.warmup,  # a float below 1 is a fraction of the steps
        seed=options.seed,
        data_seed=options.seed,
        train_sampling_strategy="group_by_length" if options.group_by_length else "random",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_only_model=True,
        save_total_limit=1,
        load_best_model_at_end=True,
        metric_for_best_model="f1",
        greater_is_better=True,
        logging_strategy="epoch",
        report_to="none",
        disable_tqdm=not progress,
        use_cpu=True,
        label_names=["labels"],
        remove_unused_columns=False,  # the rows carry exactly what the model takes
    )


@dataclass(frozen=True)
class _Prepared:
    """The loaded pieces of one run."""

    source: Path  # the base, or the teacher a student is cut from
    tokenizer: Any
    model: Any  # what the Trainer trains (a peft wrapper for LoRA)
    teacher: Any | None
    total_parameters: int  # of the model as saved (LoRA's matrices are merged away)
    trainable_parameters: int


def _source(base: Path | None, options: TrainOptions) -> Path:
    if options.distill:
        source = Path(options.distill.teacher)
        _check_folder(source, "teacher model")
        return source
    if base is None:
        raise TrainError("a base model is needed (or a teacher to distil from)")
    _check_folder(Path(base), "base model")
    return Path(base)


def _splits(dataset: NerDataset, options: TrainOptions) -> tuple[NerDataset, NerDataset, int]:
    """(training split, augmented if asked; held-out split; training sentences before augmentation)."""
    train_set, eval_set = held_out_split(dataset, eval_fraction=options.eval_fraction, seed=options.seed)
    train_set, eval_set = head(train_set, options.limit), head(eval_set, options.eval_limit)
    sentences = len(train_set)
    if options.augment:
        from ner_builder.augment import augment

        train_set = augment(train_set, options.augment, seed=options.seed)
        LOGGER.info("augmented the training split: %d -> %d sentences", sentences, len(train_set))
    return train_set, eval_set, sentences


def _prepare(source: Path, dataset: NerDataset, options: TrainOptions) -> _Prepared:
    tokenizer, model, teacher = _load(source, dataset.labels, options)
    if options.isolate_cjk and teacher is None:  # a student keeps its teacher's tokenizer
        tokenizer = _isolate_cjk(tokenizer, dataset)
    if options.freeze_embeddings:
        LOGGER.info("word embeddings frozen (%d parameters)", _freeze_word_embeddings(model))
    total = sum(p.numel() for p in model.parameters())
    if options.lora:
        from ner_builder.lora import apply_lora

        model = apply_lora(model, options.lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return _Prepared(source, tokenizer, model, teacher, total, trainable)


def _trainer(prepared: _Prepared, options: TrainOptions, folder: str, progress: bool, **data: Any) -> Any:
    from transformers import DataCollatorForTokenClassification, EarlyStoppingCallback
    from transformers.trainer_callback import PrinterCallback

    from ner_builder.ner_trainer import EpochLog, NerTrainer

    extra_loss = None
    if prepared.teacher is not None and options.distill is not None:
        from ner_builder.distill import DistillationLoss

        extra_loss = DistillationLoss(prepared.teacher, options.distill.temperature, options.distill.weight)
    trainer = NerTrainer(
        model=prepared.model,
        args=_training_arguments(options, folder, progress),
        data_collator=DataCollatorForTokenClassification(prepared.tokenizer),
        processing_class=prepared.tokenizer,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
        callbacks=[EpochLog()],
        head_lr=options.head_lr,
        extra_loss=extra_loss,
        **data,
    )
    trainer.remove_callback(PrinterCallback)  # EpochLog says it through logging
    if options.early_stopping_patience:
        trainer.add_callback(EarlyStoppingCallback(early_stopping_patience=options.early_stopping_patience))
    return trainer


def train_token_classifier(
    base: Path | None,
    dataset: NerDataset,
    output: Path,
    options: TrainOptions | None = None,
    *,
    progress: bool = True,
) -> TrainResult:
    """Fine-tune `base` (or a student of ``options.distill.teacher``) on `dataset`; save the best epoch.

    The held-out part is the corpus's official test split when it has one (msra; `eval_fraction` is then
    unused), else a seeded `eval_fraction` split; it is scored after every epoch and picks the epoch that is
    saved, so its F1 is the model-selection score (there is no third split in these small corpora).
    `limit` / `eval_limit` keep the first N train / eval sentences. `freeze_embeddings` keeps the input word
    embeddings as they are (much faster for XLM-R's 250k-piece vocabulary; they are still saved).
    `group_by_length` batches sentences of similar length together (padding 1.99 -> 1.03 on MSRA: epochs
    ~1.9x faster). `isolate_cjk` gives every CJK ideograph a piece of its own when the base tokenizer merges
    them (XLM-R), so that Chinese entities get exact character spans; the checkpoint is saved with that
    tokenizer (``ner_builder.isolate_cjk``). Augmentation applies to the training split only.
    """
    options = options or TrainOptions()
    output = Path(output)
    _validate(options)
    source = _source(base, options)

    import torch
    from transformers import set_seed

    started = time.perf_counter()
    torch.set_num_threads(os.cpu_count() or 1)
    set_seed(options.seed)  # before the model load: the new classifier head is initialised from it
    train_set, eval_set, sentences = _splits(dataset, options)
    prepared = _prepare(source, dataset, options)

    label2id = {label: i for i, label in enumerate(dataset.labels)}
    id2label = dict(enumerate(dataset.labels))
    model_limit = model_max_length(prepared.tokenizer, prepared.model.config)
    train_length = min(options.max_length, model_limit)
    if train_length < options.max_length:
        LOGGER.info("max_length %d capped to the model's limit %d", options.max_length, train_length)
    train_rows = [item.features() for item in encode_dataset(prepared.tokenizer, train_set, label2id, train_length)]
    # Eval is never truncated to the training max_length, only to what the model can physically take.
    eval_encoded = encode_dataset(prepared.tokenizer, eval_set, label2id, model_limit)
    eval_rows = [item.features() for item in eval_encoded]  # what the data collator pads
    gold = gold_tags(eval_set)

    def compute_metrics(prediction: Any) -> dict[str, float]:
        return entity_scores(gold, predicted_tags(eval_encoded, eval_set, prediction.predictions, id2label))

    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{output.name}-epochs-", dir=output.parent) as folder:
        trainer = _trainer(prepared, options, folder, progress, train_dataset=train_rows, eval_dataset=eval_rows,
                           compute_metrics=compute_metrics)
        LOGGER.info(
            "training %s (%s) on %s: %d train (+%d augmented) / %d eval sentences, %d epochs, %d of %d parameters "
            "trainable, %d threads", source, options.recipe, dataset.name, sentences, len(train_set) - sentences,
            len(eval_set), options.epochs, prepared.trainable_parameters, prepared.total_parameters,
            torch.get_num_threads(),
        )
        trainer.train()
        epoch_f1 = [entry["eval_f1"] for entry in trainer.state.log_history if "eval_f1" in entry]
        best_epoch = epoch_f1.index(max(epoch_f1)) + 1 if epoch_f1 else None
        prediction = trainer.predict(eval_rows)  # the best epoch's model, loaded back
        predicted = predicted_tags(eval_encoded, eval_set, prediction.predictions, id2label)

    from ner_builder.lora import merged

    final = merged(trainer.model)
    output.mkdir(parents=True, exist_ok=True)
    final.save_pretrained(output)
    prepared.tokenizer.save_pretrained(output)
    seconds = time.perf_counter() - started
    scores = entity_scores(gold, predicted)
    metrics = {
        "dataset": dataset.name,
        "recipe": options.recipe,
        "train_sentences": sentences,
        "augmented_sentences": len(train_set) - sentences,
        "eval_sentences": len(eval_set),
        "epochs": options.epochs,
        "epochs_run": len(epoch_f1),  # fewer than epochs when stopped early
        "epoch_f1": [round(f1, 4) for f1 in epoch_f1],
        "best_epoch": best_epoch,  # the one saved
        "scheme": dataset.scheme,
        "eval_level": "character" if dataset.char_level else "word",
        "cjk_pieces": str(cjk_pieces(prepared.tokenizer.backend_tokenizer)),
        **_recorded_options(options),
        **scores,
        "trainable_parameters": prepared.trainable_parameters,
        "total_parameters": prepared.total_parameters,
        "layers": final.config.num_hidden_layers,
        "checkpoint_bytes": sum(f.stat().st_size for f in output.glob("*.safetensors")),
        "seconds": round(seconds, 2),
        "base": str(source),
    }
    _write_reports(output, gold, predicted, metrics)
    LOGGER.info("eval: precision=%.4f recall=%.4f f1=%.4f (%.0f s)", scores["precision"], scores["recall"],
                scores["f1"], seconds)
    return TrainResult(
        output=output,
        train_sentences=sentences,
        eval_sentences=len(eval_set),
        seconds=seconds,
        trainable_parameters=prepared.trainable_parameters,
        total_parameters=prepared.total_parameters,
        augmented_sentences=len(train_set) - sentences,
        **scores,
    )


def _recorded_options(options: TrainOptions) -> dict[str, Any]:
    return {
        "body_lr": options.resolved_body_lr,
        "head_lr": options.head_lr,
        "weight_decay": options.weight_decay,
        "dropout": options.dropout,
        "max_grad_norm": options.max_grad_norm,
        "seed": options.seed,
        "freeze_embeddings": options.freeze_embeddings,
        "group_by_length": options.group_by_length,
        "early_stopping_patience": options.early_stopping_patience,
        "augment": options.augment,
        "lora": asdict(options.lora) if options.lora else None,
        "distill": {**asdict(options.distill), "teacher": str(options.distill.teacher)} if options.distill else None,
    }
