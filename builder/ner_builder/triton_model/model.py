"""Triton Python-backend model: runs ``model.onnx`` from its version folder with ONNX Runtime.

The embedded CPU Triton (nvidia-pytriton's tritonserver) has only the Python backend, so this
file is copied next to the ONNX graph by ``ner-builder build``. It is self-contained: it runs in
Triton's Python stub, which imports only what the serving environment has installed
(numpy, onnxruntime, triton_python_backend_utils).
"""

import json
import os
from typing import Any

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def length_groups(lengths: list[int], call_overhead_tokens: float) -> list[list[int]]:
    """Row indices sorted by length and cut into contiguous groups at the least total cost.

    One ONNX Runtime call costs about ``call_overhead_tokens + rows x longest row`` (in padded tokens): on a
    CPU a small batch is dominated by streaming the weights once per call (MiniLM fp32 on one thread: ~5 ms,
    the price of ~14 tokens), while padding costs as much as real tokens. A dynamic programme over the
    sorted lengths finds the cuts that minimise the sum, so short rows are not padded to a long one and a
    batch is not split into many small calls either.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    ordered = [lengths[i] for i in order]
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cheapest plan for the first j sorted rows
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + call_overhead_tokens + (end - start) * ordered[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups: list[list[int]] = []
    end = len(order)
    while end:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_num_threads", "0"))
        options.inter_op_num_threads = 1
        # ONNX Runtime's threads spin between calls by default, burning the cores that tokenization and
        # gRPC need; a served model waits for Triton's next batch, so let them sleep.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.session = ort.InferenceSession(
            os.path.join(version_dir, params.get("onnx_file", "model.onnx")), options,
            providers=["CPUExecutionProvider"],
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = config["output"][0]["name"]
        self.num_labels = int(config["output"][0]["dims"][-1])
        self.call_overhead_tokens = float(params.get("call_overhead_tokens", "16"))
        # A dynamically quantized graph computes its activation scales over the whole input tensor, padding
        # and neighbours included: such a graph runs each row alone and unpadded, so that its result never
        # depends on the batch it came in.
        self.rows_alone = params.get("rows_alone", "false") == "true"

    def execute(self, requests: list[Any]) -> list[Any]:
        # Triton hands over every request of a dynamic batch at once, each with its own sequence length
        # (ragged batching); the gateway sends one request per call with the rows of many of its own requests.
        # All rows go into one zero-padded [rows, width] array per input, are sorted by real length
        # (attention_mask) and run in groups padded only to their own longest row (see length_groups); padding
        # has attention_mask 0, so with fixed quantization scales (fp32, fp16, static int8) a row's logits do
        # not depend on its group.
        first = self.input_names[0]
        tensors = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
                   for request in requests]
        widths = [t[first].shape[1] for t in tensors]
        counts = [t[first].shape[0] for t in tensors]
        width = max(widths)
        if len(tensors) == 1:
            stacked = tensors[0]
        else:  # padded here rather than by ner_gateway's code: Triton's Python stub has no ner_gateway
            stacked = {name: np.concatenate([np.pad(t[name], ((0, 0), (0, width - t[name].shape[1])))
                                             for t in tensors]) for name in self.input_names}
        mask = stacked.get("attention_mask")
        lengths = (mask.sum(axis=1) if mask is not None else np.full(sum(counts), width)).tolist()
        logits_all = np.zeros((len(lengths), width, self.num_labels), dtype=np.float32)
        if self.rows_alone:
            groups = [[i] for i in range(len(lengths))]
        else:
            groups = length_groups(lengths, self.call_overhead_tokens)
        for group in groups:
            group_width = max(lengths[i] for i in group)
            rows = np.asarray(group)
            feeds = {name: array[rows, :group_width] for name, array in stacked.items()}  # fancy indexing: a copy
            (logits,) = self.session.run([self.output_name], feeds)
            logits_all[rows, :group_width] = logits
        responses = []
        start = 0
        for count, request_width in zip(counts, widths, strict=True):
            out = logits_all[start : start + count, :request_width]  # the request's own width (its padding: 0)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(self.output_name, np.ascontiguousarray(out))]))
            start += count
        return responses

    def finalize(self) -> None:
        self.session = None
