"""The core's ports: what it needs from an inference server, as protocols that ``ner_gateway.triton`` implements.

The core names no implementation: ``server.py`` hands it a ``TritonPool``; tests may hand it any object with
these methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.core.deadline import Deadline

Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ServedModel:
    """What the inference server says about a model the gateway serves."""

    name: str
    version: str
    max_batch_size: int
    instances: int = 1  # execution instances (Triton's instance_group counts): calls it runs at once
    preferred_batch_size: int = 1  # the smallest batch its server prefers (Triton's dynamic_batching), else 1
    key: tuple[str, str] = field(init=False, repr=False, compare=False)  # (name, version), made once

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", (self.name, self.version))


class InferenceBackend(Protocol):
    """Runs a model on a batch of rows; raises the core's errors (DeadlineExceeded, TritonUnavailable, ...)."""

    async def infer(self, model: ServedModel, inputs: Mapping[str, Int64Array], output: str, deadline: Deadline,
                    request_id: str = "") -> Float32Array:
        """``output`` for ``inputs`` ([rows, width] each): [rows, width, classes], within ``deadline`` (retries
        included)."""
        ...

    def model_ready(self, model: ServedModel) -> bool:
        """The model version can take calls now (as of the backend's last look; reads no network)."""
        ...


class ModelSource(Protocol):
    """Where the registry learns which model versions are served and checks them (at startup, and as versions are
    loaded and unloaded while the gateway runs: core/discovery.py)."""

    url: str

    async def is_model_ready(self, name: str, version: str, timeout_s: float = 5.0) -> bool: ...

    async def check_model(self, manifest: ModelManifest) -> ServedModel: ...

    def watch(self, model: ServedModel) -> None:
        """From here on, follow where ``model`` is ready (``model_ready``)."""
        ...

    def unwatch(self, model: ServedModel) -> None: ...

    def model_ready(self, model: ServedModel) -> bool: ...
