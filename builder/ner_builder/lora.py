"""LoRA fine-tuning (PyPI ``peft``): low-rank adapters on the encoder's linear layers, the head fully trained.

The adapters are merged into the base weights before the checkpoint is saved, so ``build``, every target
and the gateway see an ordinary checkpoint of the base architecture: nothing downstream knows about peft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Every linear layer of the encoder (attention and feed-forward); the classifier head is trained in full.
ENCODER_LINEAR = "encoder-linear"


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 8
    alpha: int = 16  # the update is scaled by alpha / rank
    dropout: float = 0.1
    targets: tuple[str, ...] = (ENCODER_LINEAR,)  # module names (suffixes), or ENCODER_LINEAR


def encoder_linear_names(model: Any) -> list[str]:
    """Leaf names of the encoder's linear layers (BERT / XLM-R: dense, key, query, value)."""
    import torch

    modules = model.base_model.named_modules()
    return sorted({name.rsplit(".", 1)[-1] for name, module in modules if isinstance(module, torch.nn.Linear)})


def apply_lora(model: Any, options: LoraOptions) -> Any:
    """``model`` wrapped in a peft model whose only trainable parameters are the adapters and the head."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = encoder_linear_names(model) if options.targets == (ENCODER_LINEAR,) else list(options.targets)
    config = LoraConfig(
        task_type=TaskType.TOKEN_CLS,  # keeps the classifier head fully trainable (modules_to_save)
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
    )
    return get_peft_model(model, config)


def is_peft(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged(model: Any) -> Any:
    """The plain transformers model with the adapters folded into its weights (a no-op without peft)."""
    return model.merge_and_unload() if is_peft(model) else model


def unwrapped(model: Any) -> Any:
    """The transformers model under a peft wrapper (shares its parameters), or ``model`` itself."""
    return model.get_base_model() if is_peft(model) else model
