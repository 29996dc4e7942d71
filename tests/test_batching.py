"""Batching as served, on a real Triton: requests of different lengths batch together, and batching never
changes a result (fp32 and int8), whichever neighbours a text shares its batch with."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio

from ner_builder.triton_config import ServingOptions, python_onnx_config
from ner_gateway.manifest import ModelManifest
from ner_gateway.models import load_tokenizer
from ner_gateway.tokenization import TextTokenizer, Window
from ner_gateway.triton_process import EmbeddedTriton

WORDS = ("Ada Lovelace met Charles Babbage in London and Paris while Google hired engineers at the "
         "University of Cambridge near the river Thames on a rainy Tuesday").split()
TEXTS = [" ".join(WORDS[: 2 + (i * 7) % (len(WORDS) - 2)]) for i in range(48)]  # 2 .. 25 words


@pytest.fixture(scope="module")
async def triton(target_repository: Path):
    server = EmbeddedTriton(target_repository)
    await server.start()
    yield server
    await server.stop()


def tokenizer_of(repository: Path, model: str) -> tuple[TextTokenizer, ModelManifest]:
    version_dir = repository / model / "1"
    manifest = ModelManifest.read(version_dir)
    return load_tokenizer(version_dir, manifest), manifest


async def infer(client: triton_aio.InferenceServerClient, model: str, inputs: dict[str, np.ndarray]) -> np.ndarray:
    tensors = []
    for name, array in inputs.items():
        tensor = triton_aio.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    result = await client.infer(model, tensors, outputs=[triton_aio.InferRequestedOutput("logits")])
    return result.as_numpy("logits")


def one_window(tokenizer: TextTokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    tokens = tokenizer.tokenize(texts)
    return tokenizer.arrays(tokens, [Window(i, 0, len(t)) for i, t in enumerate(tokens)])


async def test_requests_of_different_lengths_form_batches(triton: EmbeddedTriton, target_repository: Path) -> None:
    tokenizer, _ = tokenizer_of(target_repository, "tiny")
    client = triton_aio.InferenceServerClient(triton.grpc_url)
    try:
        before = (await client.get_inference_statistics("tiny", as_json=True))["model_stats"][0]
        for _ in range(3):
            await asyncio.gather(*(infer(client, "tiny", one_window(tokenizer, [text])) for text in TEXTS))
        after = (await client.get_inference_statistics("tiny", as_json=True))["model_stats"][0]
    finally:
        await client.close()
    requests = int(after["inference_count"]) - int(before.get("inference_count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    assert requests == 3 * len(TEXTS)
    lengths = {one_window(tokenizer, [text])["input_ids"].shape[1] for text in TEXTS}
    assert len(lengths) > 10  # the requests really are ragged
    assert requests / executions >= 3, f"average batch {requests / executions:.2f}: Triton did not batch"


@pytest.mark.parametrize("model", ["tiny", "tiny-onnx-int8"])
async def test_a_texts_logits_do_not_depend_on_its_batch(triton: EmbeddedTriton, target_repository: Path,
                                                          model: str) -> None:
    tokenizer, _ = tokenizer_of(target_repository, model)
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


def test_python_entries_batch_ragged_and_engines_do_not() -> None:
    from ner_builder.triton_config import tensorrt_plan_config

    onnx = python_onnx_config("m", ["input_ids", "attention_mask"], "logits", 3, ServingOptions())
    assert all(tensor.allow_ragged_batch for tensor in onnx.input)
    assert onnx.parameters["max_padding_ratio"].string_value == "1.25"
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
