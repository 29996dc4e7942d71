"""The runtimes build targets name, by name. A new runtime is one module here plus its line below."""

from __future__ import annotations

from ner_builder.runtimes.base import Runtime
from ner_builder.runtimes.onnx import OnnxRuntime
from ner_builder.runtimes.tensorrt import TensorRtRuntime

# In the order targets are listed (CLI help, error messages).
RUNTIMES: dict[str, Runtime] = {runtime.name: runtime for runtime in (OnnxRuntime(), TensorRtRuntime())}
