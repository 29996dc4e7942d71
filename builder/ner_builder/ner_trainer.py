"""``transformers.Trainer`` with the two things NER fine-tuning here needs on top of it.

- Two learning rates: a freshly initialised head needs a much larger step than the pretrained body; with
  one small learning rate a small encoder settles on predicting "O" everywhere. Weight decay follows the
  Trainer's own rule (none on biases and LayerNorm).
- Evaluation in the held-out split's order, whatever the training sampler.
- An optional extra loss (distillation, ``ner_builder.distill``) computed from the model's outputs.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from transformers import Trainer, TrainerCallback

from ner_builder.lora import unwrapped

LOGGER = logging.getLogger(__name__)


class ExtraLoss(Protocol):
    def __call__(self, hard_loss: Any, logits: Any, inputs: dict[str, Any]) -> Any: ...


class NerTrainer(Trainer):
    def __init__(self, *args: Any, head_lr: float, extra_loss: ExtraLoss | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_lr = head_lr
        self.extra_loss = extra_loss

    def create_optimizer(self, model: Any = None) -> Any:
        if self.optimizer is not None:
            return self.optimizer
        opt_model: Any = self.model if model is None else model  # a PreTrainedModel, or peft's wrapper of one
        decay = set(self.get_decay_parameter_names(opt_model))
        body = {id(p) for p in unwrapped(opt_model).base_model.parameters()}  # LoRA adapters live in the body
        groups: dict[tuple[bool, bool], list[Any]] = {}
        for name, parameter in opt_model.named_parameters():
            if parameter.requires_grad:
                groups.setdefault((id(parameter) in body, name in decay), []).append(parameter)
        param_groups = [
            {
                "params": params,
                "lr": self.args.learning_rate if in_body else self.head_lr,
                "weight_decay": self.args.weight_decay if decays else 0.0,
            }
            for (in_body, decays), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        # Always in order: predictions are matched to the held-out sentences by position. (The Trainer
        # length-groups evaluation too when training is length-grouped.)
        import torch

        return torch.utils.data.SequentialSampler(eval_dataset)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if self.extra_loss is None or not model.training:  # evaluation reports the plain label loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs)
        loss = self.extra_loss(outputs.loss, outputs.logits, inputs)
        return (loss, outputs) if return_outputs else loss


class EpochLog(TrainerCallback):
    """One log line per epoch (train loss, then the held-out scores), whether or not a bar is shown."""

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        shown = {key: value for key, value in logs.items() if key in _SHOWN}
        if shown:
            LOGGER.info("epoch %.0f: %s", state.epoch or 0, ", ".join(f"{k} {v:.4f}" for k, v in shown.items()))


_SHOWN = ("loss", "eval_loss", "eval_precision", "eval_recall", "eval_f1", "train_runtime")
