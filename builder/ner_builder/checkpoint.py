"""Load and validate a Hugging Face token-classification checkpoint from a local folder."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ner_builder.errors import BuildError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    labels: list[str]
    max_length: int


def model_max_length(tokenizer: PreTrainedTokenizerFast, config: PretrainedConfig) -> int:
    """The longest input (special tokens included) the model takes: what train and build both cap at.
    Tokenizers without a limit report a huge sentinel (~1e30), read as BERT's usual 512."""
    return min(
        tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else 512,
        getattr(config, "max_position_embeddings", 512),
    )


def load_checkpoint(path: Path) -> Checkpoint:
    """Load a token classifier, refusing anything that would serve garbage.

    ``AutoModelForTokenClassification`` happily loads a bare encoder and initialises a random
    head, so the architecture and the label map are checked before loading.
    """
    if not path.is_dir():
        raise BuildError(f"checkpoint folder {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise BuildError(f"{path} is not a Hugging Face checkpoint: no config.json")
    config = json.loads(config_file.read_text())
    architectures = config.get("architectures") or []
    if not any(arch.endswith("ForTokenClassification") for arch in architectures):
        raise BuildError(
            f"{path} is not a token-classification checkpoint (architectures: {architectures or 'none'}); "
            "fine-tune one first, e.g. `ner-builder train`"
        )
    id2label = config.get("id2label") or {}
    if len(id2label) < 2:
        raise BuildError(f"{path}/config.json has no id2label map with at least two labels")

    from transformers import AutoModelForTokenClassification, AutoTokenizer, PreTrainedTokenizerFast

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BuildError(f"cannot load the tokenizer from {path}: {e}") from e
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise BuildError(f"{path} has no fast tokenizer (tokenizer.json); the gateway needs one for offsets")
    # Eager attention traces into a graph that is exact for every sequence length (SDPA mask
    # handling bakes trace-time shapes in).
    model = AutoModelForTokenClassification.from_pretrained(path, attn_implementation="eager").eval()
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    max_length = model_max_length(tokenizer, model.config)
    LOGGER.info("loaded %s: %d labels, max length %d", path, len(labels), max_length)
    return Checkpoint(path=path, model=model, tokenizer=tokenizer, labels=labels, max_length=max_length)
