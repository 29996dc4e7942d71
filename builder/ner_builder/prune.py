"""Structured attention-head pruning by head importance (Michel et al., 2019, "Are Sixteen Heads Really
Better than One?").

Importance of head h in layer l = sum over the calibration texts of |d loss / d gate(l, h)|, where a
gate of 1 multiplies each head's output and the loss is the cross entropy of the model against its own
predictions (calibration texts are unlabelled), normalised per layer. The N least important heads are
removed physically: their rows of the query/key/value projections and their columns of the attention
output projection are dropped, so the exported graph is smaller and faster (every layer keeps at least
one head). transformers 5 has no ``prune_heads`` any more, so this slices BERT-style attention modules
(``attention.self.{query,key,value}`` + ``attention.output.dense``) itself.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from ner_builder.errors import BuildError
from ner_gateway.artifact.manifest import PruningInfo

LOGGER = logging.getLogger(__name__)

METHOD = "head importance |dL/dgate| on calibration texts (Michel et al. 2019), self-labelled loss"


def attention_layers(model: Any) -> list[Any]:
    encoder = getattr(model.base_model, "encoder", None)
    layers = list(getattr(encoder, "layer", []) or [])
    if not layers or not all(_is_bert_attention(layer) for layer in layers):
        raise BuildError(f"--prune-heads supports BERT-style encoders; {type(model).__name__} is not one")
    return layers


def _is_bert_attention(layer: Any) -> bool:
    attention = getattr(layer, "attention", None)
    own = getattr(attention, "self", None)
    return all(hasattr(own, n) for n in ("query", "key", "value", "attention_head_size")) and hasattr(
        getattr(attention, "output", None), "dense")


def head_counts(model: Any) -> list[int]:
    return [layer.attention.self.query.out_features // layer.attention.self.attention_head_size
            for layer in attention_layers(model)]


def head_importance(model: Any, feeds: list[dict[str, npt.NDArray[np.int64]]]) -> list[torch.Tensor]:
    layers = attention_layers(model)
    gates = [torch.ones(n, requires_grad=True) for n in head_counts(model)]
    handles = []
    for layer, gate in zip(layers, gates, strict=True):
        size = layer.attention.self.attention_head_size

        def gated(module: Any, args: Any, output: Any, gate: torch.Tensor = gate, size: int = size) -> Any:
            context = output[0]
            shaped = context.view(*context.shape[:-1], -1, size) * gate.view(-1, 1)
            return (shaped.view_as(context), *output[1:])

        handles.append(layer.attention.self.register_forward_hook(gated))
    was_training = model.training
    requires = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    scores = [torch.zeros(len(g)) for g in gates]
    try:
        for batch in feeds:
            inputs = {k: torch.from_numpy(v) for k, v in batch.items()}
            logits = model(**inputs).logits
            mask = inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones(logits.shape[:2],
                                                                                                 dtype=torch.bool)
            loss = torch.nn.functional.cross_entropy(logits[mask], logits[mask].argmax(-1).detach())
            loss.backward()
            for score, gate in zip(scores, gates, strict=True):
                score += gate.grad.abs()  # type: ignore[union-attr]
                gate.grad = None
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return [s / (s.norm() + 1e-12) for s in scores]


def choose_heads(importance: list[torch.Tensor], count: int) -> dict[int, list[int]]:
    """The ``count`` least important heads overall, never the last head of a layer."""
    total = sum(len(s) for s in importance)
    if not 0 < count <= total - len(importance):
        raise BuildError(f"--prune-heads {count}: choose 1..{total - len(importance)} "
                         f"({total} heads in {len(importance)} layers, one must stay in each)")
    ranked = sorted((float(s[h]), layer, h) for layer, s in enumerate(importance) for h in range(len(s)))
    left = [len(s) for s in importance]
    chosen: dict[int, list[int]] = {}
    picked = 0
    for _, layer, head in ranked:
        if picked == count:
            break
        if left[layer] > 1:
            chosen.setdefault(layer, []).append(head)
            left[layer] -= 1
            picked += 1
    return {layer: sorted(heads) for layer, heads in sorted(chosen.items())}


def _slice_linear(linear: torch.nn.Linear, keep: torch.Tensor, dim: int) -> torch.nn.Linear:
    weight = linear.weight.detach().index_select(dim, keep).clone()
    bias = linear.bias.detach() if linear.bias is not None else None
    if dim == 0 and bias is not None:
        bias = bias.index_select(0, keep).clone()
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def remove_heads(model: Any, heads: dict[int, list[int]]) -> None:
    layers = attention_layers(model)
    for index, pruned in heads.items():
        own = layers[index].attention.self
        size = own.attention_head_size
        n_heads = own.query.out_features // size
        keep_heads = [h for h in range(n_heads) if h not in set(pruned)]
        keep = torch.tensor([h * size + j for h in keep_heads for j in range(size)], dtype=torch.long)
        own.query = _slice_linear(own.query, keep, 0)
        own.key = _slice_linear(own.key, keep, 0)
        own.value = _slice_linear(own.value, keep, 0)
        output = layers[index].attention.output
        output.dense = _slice_linear(output.dense, keep, 1)
        own.num_attention_heads = len(keep_heads)
        own.all_head_size = len(keep)


def prune_heads(model: Any, count: int, feeds: list[dict[str, npt.NDArray[np.int64]]]) -> PruningInfo:
    total = sum(head_counts(model))
    chosen = choose_heads(head_importance(model, feeds), count)
    remove_heads(model, chosen)
    LOGGER.info("pruned %d of %d attention heads (layer: heads) %s", count, total,
                ", ".join(f"{layer}: {heads}" for layer, heads in chosen.items()))
    return PruningInfo(heads_pruned=count, heads_total=total, method=METHOD,
                       per_layer={str(layer): heads for layer, heads in chosen.items()})
