"""The gateway's only door to Triton: readiness and model checks over tritonclient.grpc.aio; inference on
Triton's own ``ModelInfer`` stub from the same package (tritonclient's per-call wrapper objects cost more than the
call's arrays on the hot path).

Errors are translated here, by gRPC status code, into the gateway's domain errors.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc.aio as triton_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.core.deadline import Deadline
from ner_gateway.core.errors import ConfigurationError, DeadlineExceeded, InferenceFailed, TritonUnavailable
from ner_gateway.core.ports import ServedModel
from ner_gateway.observability.tracing import trace_headers
from ner_gateway.triton.checks import served_model

LOGGER = logging.getLogger(__name__)

# Reconnect quickly after Triton restarts instead of gRPC's default backoff (up to 120 s).
_CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
]
_UNAVAILABLE = {str(grpc.StatusCode.UNAVAILABLE), str(grpc.StatusCode.CANCELLED)}
_DEADLINE = str(grpc.StatusCode.DEADLINE_EXCEEDED)


def translate(error: InferenceServerException, what: str) -> Exception:
    return _translate(error.status(), error.message(), what)


def _translate(status: str | None, message: str | None, what: str) -> Exception:
    if status == _DEADLINE:
        return DeadlineExceeded(f"deadline exceeded while waiting for {what}")
    if status in _UNAVAILABLE:
        return TritonUnavailable("the inference server is unavailable; retry later")
    LOGGER.error("Triton failed %s: status %s: %s", what, status, message)
    return InferenceFailed("inference failed")


async def _probe(answer: Awaitable[bool], what: str) -> bool | None:
    try:
        return bool(await answer)
    except InferenceServerException as e:
        LOGGER.debug("%s: %s", what, e.message())
        return None if e.status() == _DEADLINE else False


class TritonBackend:
    def __init__(self, url: str) -> None:
        self.url = url
        self._client = triton_grpc.InferenceServerClient(url, channel_args=_CHANNEL_ARGS)
        self._channel = grpc.aio.insecure_channel(url, options=_CHANNEL_ARGS)  # inference only
        self._infer = service_pb2_grpc.GRPCInferenceServiceStub(self._channel).ModelInfer

    async def close(self) -> None:
        await self._client.close()
        await self._channel.close()

    # The probes answer True/False as Triton does (False also when it cannot be reached or fails), and None
    # when no answer came within the timeout: a busy Triton, or this gateway's own busy event loop, under load.
    # That is not evidence of a server down, and the pool does not treat it as one.

    async def is_ready(self, timeout_s: float = 1.0) -> bool | None:
        return await _probe(self._client.is_server_ready(client_timeout=timeout_s), "readiness")

    async def is_live(self, timeout_s: float = 1.0) -> bool | None:
        """Triton is up and answering, whatever its models' states (``is_ready`` also needs every model it
        has loaded to be ready, under Triton's default strict readiness)."""
        return await _probe(self._client.is_server_live(client_timeout=timeout_s), "liveness")

    async def is_model_ready(self, name: str, version: str, timeout_s: float = 5.0) -> bool | None:
        return await _probe(self._client.is_model_ready(name, version, client_timeout=timeout_s),
                            f"readiness of {name} version {version}")

    async def check_model(self, manifest: ModelManifest) -> ServedModel:
        """Check that Triton serves the manifest's model version with the tensors the gateway sends."""
        try:
            metadata = await self._client.get_model_metadata(manifest.name, manifest.version, as_json=True)
            config = (await self._client.get_model_config(manifest.name, manifest.version, as_json=True))["config"]
        except InferenceServerException as e:
            raise ConfigurationError(f"Triton at {self.url} does not serve model {manifest.name!r}: "
                                     f"{e.message()}") from e
        return served_model(manifest, metadata, config)

    async def infer(
        self, model: ServedModel, inputs: Mapping[str, npt.NDArray[np.int64]], output: str, deadline: Deadline,
        request_id: str = "",
    ) -> npt.NDArray[np.float32]:
        timeout_s = deadline.check("before inference")
        request = service_pb2.ModelInferRequest(model_name=model.name, model_version=model.version, id=request_id)
        for name, array in inputs.items():
            request.inputs.add(name=name, datatype="INT64", shape=array.shape)
            request.raw_input_contents.append(array.tobytes())
        request.outputs.add(name=output)
        try:
            # W3C traceparent: Triton's spans join the caller's trace.
            response = await self._infer(request, timeout=timeout_s, metadata=tuple(trace_headers().items()))
        except grpc.aio.AioRpcError as e:
            raise _translate(str(e.code()), e.details(), f"model {model.name}") from e
        if len(response.outputs) != 1 or response.outputs[0].datatype != "FP32" or not response.raw_output_contents:
            LOGGER.error("Triton answered model %s with outputs %s", model.name,
                         [(t.name, t.datatype) for t in response.outputs])
            raise InferenceFailed("inference failed")
        shape = tuple(response.outputs[0].shape)
        logits: npt.NDArray[np.float32] = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(shape)
        return logits
