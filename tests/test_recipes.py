"""Every training recipe for real on the tiny model (a few steps each): LoRA, distillation, augmentation,
regularisation. Each checkpoint must load as a plain transformers model, build (ONNX parity gate) and
serve through a real gateway + Triton, returning what HF's pipeline finds on the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ner_builder.augment import augment
from ner_builder.datasets import NerDataset, head, load_dataset
from ner_builder.distill import DistillationLoss, DistillOptions, make_student, student_layer_ids
from ner_builder.lora import LoraOptions, encoder_linear_names
from ner_builder.token_alignment import encode_dataset
from ner_builder.train import TrainError, TrainOptions, TrainResult, train_token_classifier

QUICK = {"limit": 48, "eval_limit": 40, "epochs": 2, "head_lr": 1e-2}
TEXTS = [
    "Barack Obama and Angela Merkel met in Berlin before flying to New York on Tuesday.",
    "Watching the Lakers beat the Celtics at Staples Center with @mike tonight #NBA",
    "Microsoft and Google are hiring engineers in London and Seattle.",
]


@pytest.fixture(scope="module")
def wnut16() -> NerDataset:
    return load_dataset("wnut16")


@pytest.fixture(scope="module")
def teacher(tiny_checkpoint: Path, wnut16: NerDataset, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """Full fine-tuning of the tiny 2-layer model: the baseline, and the teacher of the distillation."""
    out = tmp_path_factory.mktemp("recipes") / "full"
    return train_token_classifier(tiny_checkpoint, wnut16, out, TrainOptions(**QUICK), progress=False)


@pytest.fixture(scope="module")
def recipes(tiny_checkpoint: Path, wnut16: NerDataset, teacher: TrainResult,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainResult]:
    root = tmp_path_factory.mktemp("recipes")
    runs = {
        "lora": (tiny_checkpoint, TrainOptions(**QUICK, lora=LoraOptions(rank=4, alpha=8))),
        "student": (None, TrainOptions(**QUICK, distill=DistillOptions(teacher.output, student_layers=1))),
        "augmented": (tiny_checkpoint, TrainOptions(**QUICK, augment=1.0)),
        "regularised": (tiny_checkpoint, TrainOptions(**QUICK, weight_decay=0.1, dropout=0.2, max_grad_norm=0.5)),
    }
    results = {"full": teacher}
    for name, (base, options) in runs.items():
        results[name] = train_token_classifier(base, wnut16, root / name, options, progress=False)
    return results


def _metrics(result: TrainResult) -> dict:
    return json.loads((result.output / "eval_metrics.json").read_text())


def test_every_recipe_saves_a_plain_checkpoint(recipes: dict[str, TrainResult], wnut16: NerDataset) -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForTokenClassification

    for name, result in recipes.items():
        model = AutoModelForTokenClassification.from_pretrained(result.output)
        assert type(model).__name__ == "BertForTokenClassification", name
        assert model.config.id2label == dict(enumerate(wnut16.labels)), name
        keys = load_file(result.output / "model.safetensors").keys()
        assert not [k for k in keys if "lora" in k or "modules_to_save" in k or "base_model.model" in k], name
        metrics = _metrics(result)
        assert metrics["recipe"] == {"lora": "lora", "student": "distilled"}.get(name, "full"), name
        assert metrics["best_epoch"] in (1, 2) and len(metrics["epoch_f1"]) == 2, name
        # the saved model is the best epoch's, loaded back (adapters included for LoRA)
        assert result.f1 == pytest.approx(max(metrics["epoch_f1"]), abs=1e-4), name
        assert 0.0 <= result.f1 <= 1.0, name
    assert _metrics(recipes["full"])["layers"] == 2 and _metrics(recipes["student"])["layers"] == 1


def test_lora_trains_a_small_share_and_merges_it_into_the_weights(
        tiny_checkpoint: Path, recipes: dict[str, TrainResult]) -> None:
    from safetensors.torch import load_file

    lora, full = recipes["lora"], recipes["full"]
    assert full.trainable_parameters == full.total_parameters
    assert lora.total_parameters == full.total_parameters  # the adapters are merged away
    assert 0 < lora.trainable_parameters < 0.35 * lora.total_parameters
    before, after = load_file(tiny_checkpoint / "model.safetensors"), load_file(lora.output / "model.safetensors")
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not (before[query] == after[query]).all()  # the merged update
    embeddings = "bert.embeddings.word_embeddings.weight"
    assert (before[embeddings] == after[embeddings]).all()  # not an adapter target: untouched
    assert _metrics(lora)["lora"] == {"rank": 4, "alpha": 8, "dropout": 0.1, "targets": ["encoder-linear"]}


def test_encoder_linear_targets_are_attention_and_feed_forward(tiny_checkpoint: Path) -> None:
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(tiny_checkpoint)
    assert encoder_linear_names(model) == ["dense", "key", "query", "value"]  # not the classifier head


def test_student_layers_are_evenly_spaced_teacher_layers() -> None:
    assert student_layer_ids(6, 3) == [0, 3, 5]
    assert student_layer_ids(12, 4) == [0, 4, 7, 11]
    assert student_layer_ids(6, 1) == [5]
    with pytest.raises(ValueError, match="1 to 5 layers"):
        student_layer_ids(6, 6)


def test_student_copies_the_chosen_teacher_layers(teacher: TrainResult) -> None:
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(teacher.output).eval()
    student = make_student(model, 1).eval()
    assert student.config.num_hidden_layers == 1 and model.config.num_hidden_layers == 2
    t, s = model.state_dict(), student.state_dict()
    for key, value in s.items():
        source = key.replace("encoder.layer.0.", "encoder.layer.1.")
        assert torch.equal(value, t[source]), key



def test_distillation_loss_weighs_the_teacher_against_the_labels(teacher: TrainResult) -> None:
    import torch
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(teacher.output).eval()
    inputs = {"input_ids": torch.tensor([[101, 2023, 2003, 102, 0]]),
              "attention_mask": torch.tensor([[1, 1, 1, 1, 0]])}
    hard = torch.tensor(0.7)
    with torch.no_grad():
        same = model(**inputs).logits
        other = same.clone()
        other[0, 1] = torch.linspace(-5, 5, other.shape[-1])  # one real token disagrees
        padding_only = same.clone()
        padding_only[0, 4] = torch.linspace(-5, 5, same.shape[-1])  # a padded position is not scored
        soft = DistillationLoss(model, temperature=2.0, weight=1.0)
        assert float(soft(hard, same, inputs)) == pytest.approx(0.0, abs=1e-6)
        assert float(soft(hard, padding_only, inputs)) == pytest.approx(0.0, abs=1e-6)
        assert float(soft(hard, other, inputs)) > 0.1
        assert float(DistillationLoss(model, 2.0, weight=0.0)(hard, other, inputs)) == pytest.approx(0.7)
        half = float(DistillationLoss(model, 2.0, weight=0.5)(hard, other, inputs))
        assert half == pytest.approx(0.5 * 0.7 + 0.5 * float(soft(hard, other, inputs)))


def test_distillation_refuses_what_it_cannot_do(tiny_checkpoint: Path, teacher: TrainResult, wnut16: NerDataset,
                                                tmp_path: Path) -> None:
    other_labels = TrainOptions(**QUICK, distill=DistillOptions(tiny_checkpoint, student_layers=1))
    with pytest.raises(TrainError, match="trained on other labels"):
        train_token_classifier(None, wnut16, tmp_path / "x", other_labels, progress=False)
    as_deep = TrainOptions(**QUICK, distill=DistillOptions(teacher.output, student_layers=2))
    with pytest.raises(TrainError, match="1 to 1 layers of a 2-layer teacher"):
        train_token_classifier(None, wnut16, tmp_path / "y", as_deep, progress=False)


def test_augmentation_adds_training_sentences_only(recipes: dict[str, TrainResult]) -> None:
    augmented, full = recipes["augmented"], recipes["full"]
    assert augmented.augmented_sentences == QUICK["limit"] and full.augmented_sentences == 0
    assert augmented.train_sentences == full.train_sentences == QUICK["limit"]
    assert augmented.eval_sentences == full.eval_sentences == QUICK["eval_limit"]  # never on the held-out split
    assert _metrics(augmented)["augment"] == 1.0


def test_augmented_labels_stay_on_their_words_after_tokenization(tiny_checkpoint: Path, wnut16: NerDataset) -> None:
    """Each augmented word's tag lands on its first sub-token; every other position is ignored."""
    from transformers import AutoTokenizer

    from ner_builder.evaluate import first_subtokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    train = head(wnut16, 300)
    data = augment(train, 1.0, seed=13)
    label2id = {label: i for i, label in enumerate(data.labels)}
    added = NerDataset("added", data.sentences[len(train):], data.tags[len(train):], data.labels)
    assert len(added) == 300 and added.sentences != train.sentences
    for item, words, tags in zip(encode_dataset(tokenizer, added, label2id, 512), added.sentences, added.tags,
                                 strict=True):
        firsts = dict(first_subtokens(item.word_ids))
        assert sorted(firsts.values()) == list(range(len(words)))  # every word is seen and labelled once
        for position, label in enumerate(item.labels):
            expected = label2id[tags[firsts[position]]] if position in firsts else -100
            assert label == expected


def test_regularisation_options_reach_the_model(recipes: dict[str, TrainResult]) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(recipes["regularised"].output)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == config.classifier_dropout == 0.2
    metrics = _metrics(recipes["regularised"])
    assert (metrics["weight_decay"], metrics["dropout"], metrics["max_grad_norm"]) == (0.1, 0.2, 0.5)


def test_every_recipe_builds_and_serves(recipes: dict[str, TrainResult], tmp_path: Path, start_gateway) -> None:
    from transformers import pipeline

    from ner_builder.build import BuildOptions, build_model
    from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

    repository = tmp_path / "repo"
    for name, result in recipes.items():
        build_model(result.output, repository, name, BuildOptions())  # ONNX export and parity gate
    gateway = start_gateway(repository)
    stub = ner_pb2_grpc.NerServiceStub(gateway.channel())
    served = {info.name for info in stub.ListModels(ner_pb2.ListModelsRequest(), timeout=10).models}
    assert served == set(recipes)
    compared = 0
    for name, result in recipes.items():
        response = stub.Recognize(ner_pb2.RecognizeRequest(
            texts=TEXTS, model=name, aggregation=ner_pb2.AGGREGATION_STRATEGY_NONE), timeout=30)
        reference = pipeline("token-classification", model=str(result.output), aggregation_strategy="none",
                             device="cpu")
        for text, document in zip(TEXTS, response.documents, strict=True):
            expected = [(e["entity"], e["start"], e["end"]) for e in reference(text)]
            assert [(e.label, e.start, e.end) for e in document.entities] == expected, (name, text)
            compared += len(expected)
    assert compared > 0  # barely trained, these tiny models still tag a few tokens (seeded: always the same)


def test_train_cli_runs_each_recipe(tiny_checkpoint: Path, teacher: TrainResult, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ner_builder.cli import main

    common = ["--dataset", "wnut16", "--epochs", "1", "--limit", "16", "--eval-limit", "16"]
    runs = {
        "lora": ["--base", str(tiny_checkpoint), "--peft", "lora", "--lora-rank", "2", "--lora-targets", "query,value"],
        "student": ["--distill-from", str(teacher.output), "--student-layers", "1", "--distill-weight", "0.7"],
        "augmented": ["--base", str(tiny_checkpoint), "--augment", "0.5", "--dropout", "0.2", "--weight-decay", "0"],
    }
    for name, extra in runs.items():
        result = CliRunner().invoke(main, ["train", *common, "--output", str(tmp_path / name), *extra])
        assert result.exit_code == 0, (name, result.output)
        assert "parameters trained" in result.output
    assert _metrics_at(tmp_path / "lora")["lora"]["targets"] == ["query", "value"]
    assert _metrics_at(tmp_path / "student")["distill"]["weight"] == 0.7
    assert _metrics_at(tmp_path / "augmented")["augmented_sentences"] == 8
    usage = CliRunner().invoke(main, ["train", *common, "--output", "x", "--distill-from", str(teacher.output)])
    assert usage.exit_code == 2 and "go together" in usage.output
    no_base = CliRunner().invoke(main, ["train", *common, "--output", "x"])
    assert no_base.exit_code == 2 and "--base is required" in no_base.output


def test_early_stopping_ends_when_f1_stops_improving(tiny_checkpoint: Path, wnut16: NerDataset,
                                                      tmp_path: Path) -> None:
    # Learning rates so small that the held-out F1 never changes: epoch 1 is the best, epoch 2 is not
    # better, and patience 1 stops there.
    options = TrainOptions(limit=16, eval_limit=16, epochs=4, body_lr=1e-12, head_lr=1e-12,
                           early_stopping_patience=1)
    train_token_classifier(tiny_checkpoint, wnut16, tmp_path / "early", options, progress=False)
    metrics = _metrics_at(tmp_path / "early")
    assert (metrics["epochs"], metrics["epochs_run"], metrics["best_epoch"]) == (4, 2, 1)


def _metrics_at(path: Path) -> dict:
    return json.loads((path / "eval_metrics.json").read_text())


def test_seed_makes_a_run_reproducible(tiny_checkpoint: Path, wnut16: NerDataset, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    options = TrainOptions(limit=16, eval_limit=16, epochs=1, augment=0.5)
    weights = []
    for run in ("a", "b"):
        train_token_classifier(tiny_checkpoint, wnut16, tmp_path / run, options, progress=False)
        weights.append(load_file(tmp_path / run / "model.safetensors"))
    assert all((weights[0][k] == weights[1][k]).all() for k in weights[0])
