"""Build targets: which graph, which runtime, which model name, and what to fall back to.

A target is ``<runtime>-<precision>`` for every registered runtime (``ner_builder.runtimes``) and each of its
precisions. ``onnx-fp32`` installs as ``NAME`` (the model's own name); every other target installs as its
own model ``NAME-<target>`` with its own config.pbtxt and manifest. A target whose accuracy gate fails falls
back to the next precision of the same runtime, keeping its model name.
"""

from __future__ import annotations

from dataclasses import dataclass

from ner_builder.errors import BuildError
from ner_builder.runtimes import RUNTIMES
from ner_builder.runtimes.base import Runtime
from ner_gateway.artifact.manifest import Precision


@dataclass(frozen=True)
class Target:
    runtime: Runtime
    precision: Precision

    @property
    def name(self) -> str:
        return f"{self.runtime.name}-{self.precision.value}"

    def model_name(self, base: str) -> str:
        return base if self == DEFAULT_TARGET else f"{base}-{self.name}"

    def fallbacks(self) -> list[Target]:
        """Higher precisions of the same runtime, nearest first (int8 -> fp16 -> fp32)."""
        chain = FALLBACK_ORDER[FALLBACK_ORDER.index(self.precision) + 1 :]
        return [Target(self.runtime, precision) for precision in chain if precision in self.runtime.precisions]

    def __str__(self) -> str:
        return self.name


FALLBACK_ORDER = [Precision.INT8, Precision.FP16, Precision.FP32]
DEFAULT_TARGET = Target(RUNTIMES["onnx"], Precision.FP32)
ALL_TARGETS = [Target(runtime, precision) for runtime in RUNTIMES.values() for precision in runtime.precisions]
TARGET_NAMES = [t.name for t in ALL_TARGETS]


def parse_target(name: str) -> Target:
    for target in ALL_TARGETS:
        if target.name == name.strip():
            return target
    raise BuildError(f"unknown target {name!r}; choose from {', '.join(TARGET_NAMES)}")


def parse_targets(text: str) -> list[Target]:
    """``onnx-fp32,onnx-int8`` -> targets in the given order, duplicates dropped."""
    targets: list[Target] = []
    for part in text.split(","):
        if part.strip() and (target := parse_target(part)) not in targets:
            targets.append(target)
    if not targets:
        raise BuildError("no build target given")
    return targets
