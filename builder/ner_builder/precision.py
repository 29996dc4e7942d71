"""Reduced-precision ONNX graphs derived from the exported fp32 graph.

- fp16: ONNX Runtime's float16 converter; LayerNormalization, Softmax and the ops of an unfused
  LayerNorm stay fp32 (their sums overflow or lose too much in fp16); inputs (INT64) and the logits
  output (FP32) keep their types, so Triton's config and the gateway do not change.
- int8 static: ONNX Runtime quantization to an explicit Q/DQ graph, weights symmetric per output
  channel, activation ranges calibrated (MinMax) on texts; activations symmetric int8 for TensorRT
  engines (zero point 0, what TensorRT requires), asymmetric uint8 for the CPU (ONNX Runtime's fast
  u8 x s8 kernels; ``bench/int8_choice.py`` measured the choices). Fixed scales: batch-invariant.
  The FFN down-projections are left in float: their inputs are GELU outputs whose outliers a
  per-tensor int8 scale cannot hold (on the WNUT-16 MiniLM quantizing them costs ~11 F1 points).
- int8 dynamic (the CPU default): weights int8 per channel (7-bit range), activations quantized at run
  time (ONNX Runtime only: TensorRT has no dynamic quantization, so engines always use the static Q/DQ
  graph). Its activation scale is computed over the whole input tensor, padding included, so the served
  model runs each row alone and unpadded (``CalibrationInfo.rows_alone``), and the accuracy gate scores it
  the same way: a text's result never depends on its batch neighbours.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import onnx

from ner_builder.errors import BuildError
from ner_gateway.artifact.manifest import CalibrationInfo

if TYPE_CHECKING:
    from onnxruntime.quantization import CalibrationDataReader

LOGGER = logging.getLogger(__name__)

FP32_OPS = ["LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization", "Softmax",
            "ReduceMean", "Pow", "Sqrt"]
# Producers that mark a MatMul input as a GELU output (exact GELU exports as Div/Erf/Add/Mul).
_GELU_OPS = {"Erf", "Gelu", "FastGelu", "BiasGelu", "Tanh"}
INT8_MODES = ("static", "dynamic")


def convert_fp16(source: Path, target: Path) -> None:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(source))
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=DEFAULT_OP_BLOCK_LIST + FP32_OPS)
    onnx.save(converted, str(target))


def gelu_fed_matmuls(model: onnx.ModelProto, depth: int = 4) -> list[str]:
    """MatMul nodes whose activation input comes (within ``depth`` producers) from a GELU."""
    producers = {output: node for node in model.graph.node for output in node.output}
    initializers = {init.name for init in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type != "MatMul":
            continue
        frontier = [name for name in node.input if name not in initializers]
        for _ in range(depth):
            parents = [producers[name] for name in frontier if name in producers]
            if any(parent.op_type in _GELU_OPS for parent in parents):
                found.append(node.name)
                break
            frontier = [name for parent in parents for name in parent.input if name not in initializers]
    return found


def _reader(feeds: list[dict[str, npt.NDArray[np.int64]]]) -> CalibrationDataReader:
    from onnxruntime.quantization import CalibrationDataReader

    class Feeds(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime ships no type information
        def __init__(self) -> None:
            self._iter: Iterator[dict[str, npt.NDArray[np.int64]]] = iter(feeds)

        def get_next(self) -> dict[str, npt.NDArray[np.int64]] | None:
            return next(self._iter, None)

    return Feeds()


def fuse_transformer(source: Path, target: Path, heads_and_hidden: tuple[int, int]) -> None:
    """ONNX Runtime's BERT graph fusion (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNormalization)."""
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = heads_and_hidden
    optimized = optimize_model(str(source), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=1)
    optimized.save_model_to_file(str(target))


def quantize_dynamic_graph(source: Path, target: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # reduce_range: 7-bit weights. Without VNNI (AVX2), x86 multiplies u8 x s8 through 16-bit sums that
    # saturate; on the WNUT-16 MiniLM served row by row, F1 0.481 with 8-bit weights, 0.505 with 7-bit
    # (PyTorch: 0.502), at the same speed.
    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True)


def quantize_static_graph(
    source: Path, target: Path, calibration: list[dict[str, npt.NDArray[np.int64]]], *, activation: str,
    fuse: tuple[int, int] | None = None,
) -> int:
    """A calibrated (MinMax) Q/DQ int8 graph; returns how many GELU-fed MatMuls stayed float.

    ``activation`` s8: symmetric int8 activations (zero point 0, what TensorRT requires); u8: asymmetric
    uint8 activations, which x86 CPUs run with their fast u8 x s8 dot-product kernels. Scales are fixed at
    build time, so a row's result never depends on the rows beside it (unlike dynamic quantization).
    ``fuse`` (attention heads, hidden size): apply ONNX Runtime's transformer fusion first (measured only).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not calibration:
        raise BuildError("static int8 needs calibration texts")
    with tempfile.TemporaryDirectory(prefix="ner-quant-") as scratch:
        graph = source
        if fuse is not None:
            graph = Path(scratch) / "fused.onnx"
            fuse_transformer(source, graph, fuse)
        prepared = Path(scratch) / "prepared.onnx"
        # Constant folding + ONNX shape inference (symbolic inference does not cover HF BERT graphs).
        quant_pre_process(str(graph), str(prepared), skip_symbolic_shape=True)
        excluded = gelu_fed_matmuls(onnx.load(str(prepared)))
        symmetric = activation == "s8"
        quantize_static(
            str(prepared), str(target), _reader(calibration),
            quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax, calibration_providers=["CPUExecutionProvider"],
            extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
        )
    return len(excluded)


def quantize_int8(
    source: Path, target: Path, calibration: list[dict[str, npt.NDArray[np.int64]]], *, mode: str = "static",
    activation: str = "s8", source_description: str = "",
) -> CalibrationInfo:
    if mode not in INT8_MODES:
        raise BuildError(f"unknown int8 mode {mode!r}; choose from {', '.join(INT8_MODES)}")
    if mode == "dynamic":
        quantize_dynamic_graph(source, target)
        return CalibrationInfo(mode="dynamic", per_channel=True, source="none: activations quantized at run time")
    excluded = quantize_static_graph(source, target, calibration, activation=activation)
    LOGGER.info("int8 Q/DQ graph (%s activations) calibrated on %d texts; %d GELU-fed MatMuls kept in float",
                activation, len(calibration), excluded)
    return CalibrationInfo(mode="static", method="minmax", per_channel=True, texts=len(calibration),
                           activations=activation, source=source_description, excluded_nodes=excluded)
