"""Batching as served, on a real Triton: requests of different lengths batch together, and batching never
changes a result (fp32, dynamic int8, static int8), whichever neighbours a text shares its batch with."""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ner_builder.repository import PYTHON_MODEL_SOURCE
from ner_builder.triton_config import ServingOptions, python_onnx_config
from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.core.batching import InputEncoder
from ner_gateway.core.compatibility import load_tokenizer
from ner_gateway.core.tokenizing import TextTokenizer, TextTokens
from ner_gateway.core.windowing import Window
from ner_gateway.triton.process import EmbeddedTriton

WORDS = ("Ada Lovelace met Charles Babbage in London and Paris while Google hired engineers at the "
         "University of Cambridge near the river Thames on a rainy Tuesday").split()
TEXTS = [" ".join(WORDS[: 2 + (i * 7) % (len(WORDS) - 2)]) for i in range(48)]  # 2 .. 25 words


@pytest.fixture(scope="module")
async def triton(int8_repository: Path):
    server = EmbeddedTriton(int8_repository)
    await server.start()
    yield server
    await server.stop()


@dataclass(frozen=True)
class ModelInputs:
    """A model's tokenizer and input encoder, as the gateway builds its calls."""

    tokenizer: TextTokenizer
    encoder: InputEncoder

    def tokenize(self, texts: list[str]) -> list[TextTokens]:
        return self.tokenizer.tokenize(texts)

    def arrays(self, tokens: list[TextTokens], windows: list[Window], buckets: tuple[int, ...] = ()
               ) -> dict[str, np.ndarray]:
        return self.encoder.windows(tokens, windows, buckets)


def tokenizer_of(repository: Path, model: str) -> tuple[ModelInputs, ModelManifest]:
    version_dir = repository / model / "1"
    manifest = ModelManifest.read(version_dir)
    tokenizer = load_tokenizer(version_dir, manifest)
    return ModelInputs(tokenizer, InputEncoder(tokenizer.special, manifest.inputs)), manifest


async def infer(client: triton_aio.InferenceServerClient, model: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    tensors = []
    for name, array in inputs.items():
        tensor = triton_aio.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = await client.infer(model, tensors, outputs=[triton_aio.InferRequestedOutput("logits")])
    return result.as_numpy("logits")


def one_window(tokenizer: ModelInputs, texts: list[str]) -> dict[str, np.ndarray]:
    tokens = tokenizer.tokenize(texts)
    return tokenizer.arrays(tokens, [Window(i, 0, len(t)) for i, t in enumerate(tokens)])


@pytest.mark.parametrize("model", ["tiny", "tiny-onnx-int8"])
async def test_requests_of_different_lengths_form_batches(triton: EmbeddedTriton, int8_repository: Path,
                                                          model: str) -> None:
    tokenizer, _ = tokenizer_of(int8_repository, model)
    client = triton_aio.InferenceServerClient(triton.grpc_url)
    try:
        before = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
        for _ in range(3):
            await asyncio.gather(*(infer(client, model, one_window(tokenizer, [text])) for text in TEXTS))
        after = (await client.get_inference_statistics(model, as_json=True))["model_stats"][0]
    finally:
        await client.close()
    requests = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert requests == 3 * len(TEXTS)
    lengths = {one_window(tokenizer, [text])["input_ids"].shape[1] for text in TEXTS}
    assert len(lengths) > 10  # the requests really are ragged
    assert requests / executions >= 3, f"average batch {requests / executions:.2f}: Triton did not batch"


@pytest.mark.parametrize("model", ["tiny", "tiny-onnx-int8", "tiny-static-onnx-int8"])
async def test_a_texts_logits_do_not_depend_on_its_batch(triton: EmbeddedTriton, int8_repository: Path,
                                                          model: str) -> None:
    tokenizer, manifest = tokenizer_of(int8_repository, model)
    short, middle, longest = TEXTS[1], TEXTS[5], max(TEXTS, key=len)
    client = triton_aio.InferenceServerClient(triton.grpc_url)
    try:
        alone = (await infer(client, model, one_window(tokenizer, [middle])))[0]
        n = alone.shape[0]
        # In one request beside a longer and a shorter text (padded to the longest by the gateway)...
        together = (await infer(client, model, one_window(tokenizer, [longest, middle, short])))[1, :n]
        # ...and in Triton's dynamic batch beside concurrent requests of other lengths.
        crowd = await asyncio.gather(*(infer(client, model, one_window(tokenizer, [text]))
                                       for text in [longest, middle, short, *TEXTS[:20]]))
    finally:
        await client.close()
    np.testing.assert_allclose(together, alone, atol=1e-4)
    np.testing.assert_allclose(crowd[1][0], alone, atol=1e-4)
    assert (together.argmax(-1) == alone.argmax(-1)).all()
    if manifest.rows_alone:
        # Dynamic int8 runs each row alone and unpadded: the very same computation whatever the batch.
        np.testing.assert_array_equal(together, alone)
        np.testing.assert_array_equal(crowd[1][0], alone)


def test_only_dynamic_int8_entries_run_rows_alone(int8_repository: Path) -> None:
    modes = {}
    for model in ("tiny", "tiny-onnx-int8", "tiny-static-onnx-int8"):
        config = text_format.Parse((int8_repository / model / "config.pbtxt").read_text(),
                                   model_config_pb2.ModelConfig())
        calibration = ModelManifest.read(int8_repository / model / "1").calibration
        alone = config.parameters["rows_alone"].string_value == "true"
        modes[model] = (calibration.mode if calibration else None, alone)
    assert modes == {"tiny": (None, False), "tiny-onnx-int8": ("dynamic", True),
                     "tiny-static-onnx-int8": ("static", False)}


def length_groups():  # type: ignore[no-untyped-def]
    """model.py's length_groups. model.py imports Triton's stub-only module at the top, so an empty module
    stands in for it here: length_groups itself never touches it."""
    sys.modules.setdefault("triton_python_backend_utils", types.ModuleType("triton_python_backend_utils"))
    spec = importlib.util.spec_from_file_location("ner_triton_model", str(PYTHON_MODEL_SOURCE))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.length_groups


@pytest.mark.parametrize(("lengths", "overhead", "expected"), [
    ([7, 7, 7, 7], 16, [[0, 1, 2, 3]]),  # equal lengths: one call
    ([100, 5, 6], 16, [[1, 2], [0]]),  # 16 + 2x6 + 16 + 100 beats 16 + 3x100
    ([100, 5, 6], 0, [[1], [2], [0]]),  # free calls: never pad
    ([100, 5, 6], 1000, [[1, 2, 0]]),  # dear calls: one call, padding and all
    ([], 16, []),
])
def test_length_groups_cut_at_the_least_cost(lengths: list[int], overhead: float, expected: list[list[int]]) -> None:
    groups = length_groups()(lengths, overhead)
    assert groups == expected
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))


def test_python_entries_batch_ragged_and_engines_do_not() -> None:
    from ner_builder.triton_config import tensorrt_plan_config

    onnx = python_onnx_config("m", ["input_ids", "attention_mask"], "logits", 3, ServingOptions())
    assert all(tensor.allow_ragged_batch for tensor in onnx.input)
    assert onnx.parameters["call_overhead_tokens"].string_value == "16"
    assert onnx.parameters["rows_alone"].string_value == "false"
    alone = python_onnx_config("m", ["input_ids"], "logits", 3, ServingOptions(), rows_alone=True)
    assert alone.parameters["rows_alone"].string_value == "true"
    plan = tensorrt_plan_config("m", ["input_ids", "attention_mask"], "logits", 3, ServingOptions())
    assert not any(tensor.allow_ragged_batch for tensor in plan.input)


def test_engine_inputs_are_padded_to_their_bucket(target_repository: Path) -> None:
    tokenizer, manifest = tokenizer_of(target_repository, "tiny-trt-fp16")
    assert manifest.engine is not None
    buckets = manifest.engine.sequence_buckets
    assert buckets == (16, 32, 64)
    tokens = tokenizer.tokenize(["Ada Lovelace", TEXTS[-1]])
    windows = [Window(i, 0, len(t)) for i, t in enumerate(tokens)]
    assert tokenizer.arrays(tokens, windows[:1], buckets)["input_ids"].shape == (1, 16)
    width = tokenizer.arrays(tokens, windows)["input_ids"].shape[1]
    assert 16 < width <= 32 and tokenizer.arrays(tokens, windows, buckets)["input_ids"].shape == (2, 32)


@pytest.mark.parametrize("model", ["tiny-onnx-int8", "tiny"])
async def test_the_gateway_coalesces_concurrent_requests_into_shared_triton_calls(
    start_gateway, int8_repository: Path, model: str  # type: ignore[no-untyped-def]
) -> None:
    """Served: concurrent one-text calls leave in fewer, larger Triton calls (core/batching.py), and each text's
    answer is the one it gets alone (dynamic int8: identical; fp32: the same entities, scores within 1e-4)."""
    import grpc

    from ner_gateway.net import free_port
    from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

    from conftest import metric_sum, scrape

    ports = {"triton": free_port(), "gateway": free_port()}
    gateway = start_gateway(int8_repository, env={"NER_TRITON_METRICS_PORT": str(ports["triton"]),
                                                  "NER_METRICS_PORT": str(ports["gateway"])})

    def counts() -> tuple[float, float, float, float]:
        triton, ours = scrape(ports["triton"]), scrape(ports["gateway"])
        return (metric_sum(triton, "nv_inference_request_success_total", model=model),
                metric_sum(triton, "nv_inference_count_total", model=model),
                metric_sum(ours, "ner_triton_call_rows_count", model=model),
                metric_sum(ours, "ner_triton_call_rows_sum", model=model))

    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = ner_pb2_grpc.NerServiceStub(channel)

        async def recognize(text: str) -> ner_pb2.Document:
            return (await stub.Recognize(ner_pb2.RecognizeRequest(texts=[text], model=model), timeout=60)).documents[0]

        def settled() -> tuple[float, float, float, float]:
            """The counts once Triton's (updated a moment after it answers) show every row the gateway sent."""
            for _ in range(100):
                now = counts()
                if now[1] == now[3]:
                    return now
                time.sleep(0.1)
            raise AssertionError(f"Triton's counts never caught up with the gateway's: {now}")

        await recognize(TEXTS[0])  # warm
        before = settled()
        together = await asyncio.gather(*(recognize(text) for text in TEXTS))
        after = settled()
        alone = [await recognize(text) for text in TEXTS]
    triton_requests, rows, calls, call_rows = (a - b for a, b in zip(after, before, strict=True))
    assert rows == call_rows == len(TEXTS)  # every text ran once
    assert calls == triton_requests  # one Triton request per coalesced call
    # ... carrying 2 texts or more each on average (alone, each text would be a call of its own: 48; coalesced, 8-10
    # calls most runs, ~20 when the calls trickle in as fast as Triton answers them, in old and new code alike)
    assert triton_requests <= len(TEXTS) / 2, (triton_requests, len(TEXTS))
    for shared, single in zip(together, alone, strict=True):
        assert [(e.label, e.start, e.end) for e in shared.entities] == [(e.label, e.start, e.end)
                                                                          for e in single.entities]
        scores = np.array([e.score for e in shared.entities]), np.array([e.score for e in single.entities])
        if model == "tiny-onnx-int8":
            np.testing.assert_array_equal(*scores)
        else:
            np.testing.assert_allclose(*scores, atol=1e-4)
