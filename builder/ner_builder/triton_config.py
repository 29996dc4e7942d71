"""Triton ``config.pbtxt`` written through Triton's own ModelConfig protobuf, never a string template."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

TENSORRT_PLATFORM = "tensorrt_plan"


@dataclass(frozen=True)
class ServingOptions:
    max_batch_size: int = 32
    # Measured (bench/throughput.py, 2 cores, 16 clients): 2 instances x 1 ONNX Runtime thread served fp32
    # 163 / int8 200 sentences/s against 117 / 145 for 1 instance x automatic threads: while one instance
    # runs a batch the next one forms, instead of one instance's threads idling between batches.
    instances: int = 2
    # Triton's own default, 0: the gateway already coalesces windows into calls and waits for a fuller one only
    # while another is in flight (NER_TRITON_OVERLAP_*), so a wait at an idle instance is pure latency. Measured
    # (near-free model, 1 client): p50 4.6 / 4.0 ms at 500 us against 2.2 / 3.3 ms at 0; 16 clients and the demo
    # model unchanged within noise. Queued requests are still batched whenever the instances are busy.
    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 16])
    intra_op_threads: int = 1  # per instance; 0 = ONNX Runtime decides (one per core)
    # Python backend: the cost of one ONNX Runtime call in padded tokens, by which a dynamic batch is cut
    # into length groups (model.py length_groups). Measured on MiniLM, one thread: fp32 ~14, int8 ~7-12.
    call_overhead_tokens: int = 16
    # Versions Triton serves side by side (its default, with no version_policy, is the latest one only);
    # 2 lets a rollout load the new version while the old one keeps serving.
    keep_versions: int = 1


def _common(name: str, input_names: list[str], output_name: str, num_labels: int, options: ServingOptions,
            kind: str, ragged: bool) -> dict[str, Any]:
    preferred = [size for size in options.preferred_batch_sizes if size <= options.max_batch_size]
    keep = options.keep_versions
    # Ragged: Triton batches requests of different lengths (the model pads them itself); without it the
    # dynamic batcher groups only requests of identical shape, which sentences of varied length never are.
    ragged_input = {"allow_ragged_batch": True} if ragged else {}
    policy = {"version_policy": {"latest": {"num_versions": keep}}} if keep > 1 else {}
    return {
        "name": name,
        **policy,
        "max_batch_size": options.max_batch_size,
        # dims exclude the batch dimension (max_batch_size > 0): [sequence] and [sequence, labels].
        "input": [{"name": n, "data_type": "TYPE_INT64", "dims": [-1], **ragged_input} for n in input_names],
        "output": [{"name": output_name, "data_type": "TYPE_FP32", "dims": [-1, num_labels]}],
        "dynamic_batching": {
            "preferred_batch_size": preferred,
            "max_queue_delay_microseconds": options.max_queue_delay_us,
        },
        "instance_group": [{"kind": kind, "count": options.instances}],
    }


def python_onnx_config(
    name: str, input_names: list[str], output_name: str, num_labels: int, options: ServingOptions,
    rows_alone: bool = False,
) -> model_config_pb2.ModelConfig:
    """Config for the Python-backend model that runs the ONNX graph (any precision) on CPU.

    ``rows_alone``: the graph's activation scales are computed at run time over its whole input (dynamic
    int8), so the model runs every row alone and unpadded, never beside others.
    """
    as_dict = {
        **_common(name, input_names, output_name, num_labels, options, "KIND_CPU", ragged=True),
        "backend": "python",
        "parameters": {
            "call_overhead_tokens": {"string_value": str(options.call_overhead_tokens)},
            "rows_alone": {"string_value": "true" if rows_alone else "false"},
            "intra_op_num_threads": {"string_value": str(options.intra_op_threads)},
            "onnx_file": {"string_value": "model.onnx"},
        },
    }
    return json_format.ParseDict(as_dict, model_config_pb2.ModelConfig())


def tensorrt_plan_config(
    name: str, input_names: list[str], output_name: str, num_labels: int, options: ServingOptions
) -> model_config_pb2.ModelConfig:
    """Config for Triton's TensorRT backend (NVIDIA's container on a GPU).

    The engine's inputs are INT64 (TensorRT 10 binds INT64 I/O), [batch, sequence] with the batch
    dimension implicit here; max_batch_size must not exceed the engine profiles' batch maximum. Every
    instance gets all optimization profiles; the backend picks the closest one per batch.
    """
    as_dict = {
        # TensorRT takes no ragged input: the gateway pads every window to the engine's sequence bucket,
        # so requests of one bucket share a shape and Triton batches them.
        **_common(name, input_names, output_name, num_labels, options, "KIND_GPU", ragged=False),
        "platform": TENSORRT_PLATFORM,
        "default_model_filename": "model.plan",
    }
    return json_format.ParseDict(as_dict, model_config_pb2.ModelConfig())


def to_pbtxt(config: model_config_pb2.ModelConfig) -> str:
    return text_format.MessageToString(config)

