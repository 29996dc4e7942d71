"""Triton Python-backend model: runs ``model.onnx`` from its version folder with ONNX Runtime.

The embedded CPU Triton (nvidia-pytriton's tritonserver) has only the Python backend, so this
file is copied next to the ONNX graph by ``ner-builder build``. It is self-contained: it runs in
Triton's Python stub, which imports only what the serving environment has installed
(numpy, onnxruntime, triton_python_backend_utils).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_num_threads", "0"))
        options.inter_op_num_threads = 1
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        self.session = ort.InferenceSession(
            os.path.join(version_dir, params.get("onnx_file", "model.onnx")), options,
            providers=["CPUExecutionProvider"],
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        # Triton hands over every request of a dynamic batch at once. Each may have its own
        # sequence length, so pad them to the longest (attention_mask 0 masks the padding)
        # and run one ONNX Runtime call for all of them.
        per_request = [
            {name: pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names}
            for r in requests
        ]
        longest = max(inputs[self.input_names[0]].shape[1] for inputs in per_request)
        feeds = {
            name: np.concatenate(
                [np.pad(inputs[name], ((0, 0), (0, longest - inputs[name].shape[1]))) for inputs in per_request]
            )
            for name in self.input_names
        }
        (logits,) = self.session.run([self.output_name], feeds)
        responses, start = [], 0
        for inputs in per_request:
            rows, length = inputs[self.input_names[0]].shape
            out = np.ascontiguousarray(logits[start : start + rows, :length], dtype=np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, out)]))
            start += rows
        return responses

    def finalize(self):
        self.session = None
