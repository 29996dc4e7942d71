"""The models the gateway serves and how a request finds its own (routing by name, the default)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.core.batching import InputEncoder
from ner_gateway.core.decoding import LabelTable
from ner_gateway.core.errors import ConfigurationError, ModelNotFound, echo
from ner_gateway.core.ports import ServedModel
from ner_gateway.core.tokenizing import TextTokenizer


@dataclass(frozen=True)
class NerModel:
    manifest: ModelManifest
    tokenizer: TextTokenizer
    encoder: InputEncoder
    labels: LabelTable
    served: ServedModel
    window_stride: int  # tokens shared by consecutive windows of a long text

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def sequence_buckets(self) -> tuple[int, ...]:
        """Lengths every input is padded up to: a TensorRT engine's profile maxima; () for ragged models."""
        engine = self.manifest.engine
        return engine.sequence_buckets if engine is not None else ()


class ModelRegistry:
    def __init__(self, models: list[NerModel], default_model: str | None = None) -> None:
        self._models = {m.name: m for m in models}
        self.default_name = default_model or sorted(self._models)[0]
        if self.default_name not in self._models:
            raise ConfigurationError(f"default model {self.default_name!r} is not in the repository "
                                     f"(found: {', '.join(sorted(self._models))})")

    def get(self, name: str) -> NerModel:
        model = self._models.get(name or self.default_name)
        if model is None:
            raise ModelNotFound(f"model {echo(name)} not found; available: {', '.join(sorted(self._models))}")
        return model

    def __iter__(self) -> Iterator[NerModel]:
        return iter(self._models[name] for name in sorted(self._models))
