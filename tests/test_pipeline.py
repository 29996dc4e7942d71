"""The gateway in-process against a separately started Triton (the ``--triton-url`` mode)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from ner_gateway.core.domain import RecognizeRequest
from ner_gateway.core.errors import ConfigurationError, DeadlineExceeded, TooLate, TritonUnavailable
from ner_gateway.core.pipeline import CpuOffload, RecognitionPipeline
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.settings import GatewaySettings
from ner_gateway.transport.server import Gateway
from ner_gateway.triton.process import EmbeddedTriton

from conftest import TINY_MODEL, wait_for


@pytest.fixture(scope="module")
async def triton(tiny_repository: Path):
    server = EmbeddedTriton(tiny_repository)
    await server.start()
    yield server
    await server.stop()


def settings_for(repository: Path, triton_url: str) -> GatewaySettings:
    return GatewaySettings(model_repository=repository, triton_url=triton_url, port=0, metrics_port=None,
                           health_check_interval_s=0.2,
                           triton_ready_timeout_s=5)


@pytest.fixture(scope="module")
async def gateway(triton: EmbeddedTriton, tiny_repository: Path):
    service = Gateway(settings_for(tiny_repository, triton.grpc_url))
    await service.start()
    yield service
    await service.stop()


async def test_aio_client_against_external_triton(gateway: Gateway) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = ner_pb2_grpc.NerServiceStub(channel)
        response = await stub.Recognize(ner_pb2.RecognizeRequest(texts=["Angela Merkel visited Paris"]), timeout=10)
    assert response.model == TINY_MODEL and len(response.documents) == 1


async def test_the_batcher_is_sized_from_the_model_triton_serves(gateway: Gateway) -> None:
    """Calls in flight from Triton's instance_group, rows per call from max_batch_size, and the batch worth a call
    beside another from the smallest preferred_batch_size (the tiny model: 2 instances, 8 rows, preferred [8])."""
    pipeline = gateway.pipeline
    assert pipeline is not None
    limits = pipeline.batcher(pipeline.registry.get("")).limits
    assert (limits.max_calls, limits.max_rows, limits.overlap_rows) == (2, 8, 8)


async def test_deadline_is_enforced_inside_the_pipeline(gateway: Gateway, triton: EmbeddedTriton) -> None:
    """Each stage enforces the request's one deadline: spent before the request is read, it is refused before any
    work (TooLate); passing while Triton holds the call (here hung with SIGSTOP), the request ends at its deadline,
    not Triton's answer, and its rows in the call count as abandoned in Triton."""
    request = RecognizeRequest(texts=["Angela Merkel visited Paris"] * 8)
    pipeline = gateway.pipeline
    with pytest.raises(TooLate, match="before the request was read"):
        await pipeline.recognize(request, timeout_s=0.0)

    def abandoned_in_triton() -> float:
        return gateway.metrics.abandoned_windows.labels(TINY_MODEL, "in_triton")._value.get()

    before = abandoned_in_triton()
    assert triton.pid is not None
    os.killpg(triton.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="while waiting for the inference server") as raised:
            await pipeline.recognize(request, timeout_s=0.4)
        waited = time.monotonic() - started
    finally:
        os.killpg(triton.pid, signal.SIGCONT)
    assert not isinstance(raised.value, TooLate)  # admitted: it expired inside the call
    assert 0.4 <= waited < 2.0, waited
    assert abandoned_in_triton() - before == 8  # its 8 rows were in Triton when the deadline passed
    await wait_for(lambda: gateway.backend.model_ready(TINY_MODEL), 20, "the resumed Triton in rotation")
    assert len((await pipeline.recognize(request, timeout_s=10)).documents) == 8


@pytest.fixture
async def patient_gateway(triton: EmbeddedTriton, tiny_repository: Path):
    """A gateway whose health checks wait a minute (a Triton held for a few seconds stays in rotation) and that
    admits thousands of requests at once."""
    settings = settings_for(tiny_repository, triton.grpc_url)
    service = Gateway(settings.model_copy(update={"health_check_interval_s": 60, "max_inflight_requests": 10000,
                                                      "max_inflight_windows": 10000}))
    await service.start()
    yield service
    await service.stop()


async def test_a_deadline_shorter_than_the_queue_is_refused_at_once_with_a_retry_hint(patient_gateway: Gateway,
                                                                                       triton: EmbeddedTriton) -> None:
    """Admission weighs what is left of a call's deadline against the wait the model's queue means now. Triton is
    held (SIGSTOP), so that the queue of single-sentence requests stands still: a call over gRPC whose deadline is
    half that wait is answered RESOURCE_EXHAUSTED by the server, in its own words, with the retry hint, counted as
    refused for the queue, without a Triton call; one with time enough waits its turn, and once Triton runs again
    every queued request and it are answered."""
    gateway = patient_gateway
    pipeline = gateway.pipeline
    batcher = pipeline.batcher(pipeline.registry.get(""))
    sentence = RecognizeRequest(texts=["Angela Merkel visited Paris"])
    for _ in range(8):
        await pipeline.recognize(sentence, timeout_s=10)
    # Enough requests that the queue means ~1 s: a deadline of half that outlasts the trip to the handler.
    queued = min(8000, max(64, int(batcher.limits.max_calls / batcher.row_s)))
    refused = gateway.metrics.refused.labels("queue")
    refused_before = refused._value.get()
    assert triton.pid is not None
    os.killpg(triton.pid, signal.SIGSTOP)
    try:
        waiting = [asyncio.ensure_future(pipeline.recognize(sentence, timeout_s=120)) for _ in range(queued)]
        in_flight = batcher.limits.max_calls * batcher.limits.max_rows
        await wait_for(lambda: batcher.calls_in_flight == batcher.limits.max_calls
                       and batcher.queued_requests >= queued - in_flight, 60, "the requests queued")
        expected_s = batcher.expected_wait_s()
        assert expected_s >= 0.2, (expected_s, batcher.row_s, batcher.queued_requests)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = ner_pb2_grpc.NerServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Recognize(ner_pb2.RecognizeRequest(texts=[sentence.texts[0]]), timeout=expected_s / 2)
            before_patient = batcher.queued_requests
            patient = asyncio.ensure_future(
                stub.Recognize(ner_pb2.RecognizeRequest(texts=[sentence.texts[0]]), timeout=60))
            await wait_for(lambda: batcher.queued_requests == before_patient + 1, 10, "the patient call queued")
            os.killpg(triton.pid, signal.SIGCONT)
            assert (await patient).documents[0].entities
    finally:
        os.killpg(triton.pid, signal.SIGCONT)
    assert error.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
    assert re.fullmatch(r"the gateway's queue for this model would take ~(\d+) ms, more than the (\d+) ms left of "
                        r"the deadline; retry in 200 ms or on another replica", error.value.details() or "")
    assert ("grpc-retry-pushback-ms", "200") in tuple(error.value.trailing_metadata() or ())
    assert refused._value.get() - refused_before == 1
    answers = await asyncio.gather(*waiting)
    assert all(answer.documents[0].entities for answer in answers)


class CountingPool(ThreadPoolExecutor):
    """A real thread pool that counts the work handed to it."""

    def __init__(self) -> None:
        super().__init__(2, thread_name_prefix="test-cpu")
        self.submitted = 0

    def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def, override]
        self.submitted += 1
        return super().submit(*args, **kwargs)


async def test_large_requests_tokenize_and_decode_off_the_event_loop(gateway: Gateway) -> None:
    pool = CountingPool()
    served = gateway.pipeline
    offloading = RecognitionPipeline(served.registry, served.backend, served.limits,
                                     offload=CpuOffload(pool, min_chars=200))
    small = RecognizeRequest(texts=["Angela Merkel visited Paris"])
    large = RecognizeRequest(texts=["Angela Merkel visited Paris and met Ada Lovelace in London. " * 4] * 2)
    try:
        assert sum(map(len, large.texts)) >= 200 > sum(map(len, small.texts))
        # Tokenize and decode: one each (a call's arrays are built when the batcher forms it: at most a call's worth
        # of rows, on the loop).
        for request, handed in ((small, 0), (large, 2)):
            before = pool.submitted
            offloaded = await offloading.recognize(request, timeout_s=10)
            assert pool.submitted - before == handed
            inline = await served.recognize(request, timeout_s=10)  # the served pipeline: default threshold
            assert offloaded.documents == inline.documents
    finally:
        pool.shutdown()
    assert served.offload is not None and served.offload.min_chars == 2000  # the setting's default


def copy_repository(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target / TINY_MODEL / "1" / "manifest.json"


async def test_startup_refuses_a_tokenizer_that_does_not_match_the_manifest(
    triton: EmbeddedTriton, tiny_repository: Path, tmp_path: Path
) -> None:
    copy_repository(tiny_repository, tmp_path / "repo")
    with (tmp_path / "repo" / TINY_MODEL / "1" / "tokenizer.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ConfigurationError, match="does not match the manifest's tokenizer checksum"):
        await Gateway(settings_for(tmp_path / "repo", triton.grpc_url)).start()


async def test_startup_refuses_labels_that_do_not_match_the_served_model(
    triton: EmbeddedTriton, tiny_repository: Path, tmp_path: Path
) -> None:
    manifest_file = copy_repository(tiny_repository, tmp_path / "repo")
    manifest = json.loads(manifest_file.read_text())
    manifest["labels"].append("B-EXTRA")
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ConfigurationError, match=r"expected FP32 \['-1', '-1', '8'\]"):
        await Gateway(settings_for(tmp_path / "repo", triton.grpc_url)).start()


async def test_startup_refuses_an_empty_repository(triton: EmbeddedTriton, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no ner-builder models"):
        await Gateway(settings_for(tmp_path, triton.grpc_url)).start()


async def test_external_triton_down_then_back(tiny_repository: Path) -> None:
    first = EmbeddedTriton(tiny_repository)
    await first.start()
    service = Gateway(settings_for(tiny_repository, first.grpc_url))
    try:
        await service.start()
        request = RecognizeRequest(texts=["Angela Merkel"])
        await first.stop()
        with pytest.raises(TritonUnavailable):
            await service.pipeline.recognize(request)
        await wait_for(lambda: service.health.serving is False, 20, "health NOT_SERVING")
        second = EmbeddedTriton(tiny_repository, ports=first.ports)  # same address, as after a pod restart
        await second.start()
        try:
            await wait_for(lambda: service.health.serving is True, 20, "health SERVING again")
            assert len((await service.pipeline.recognize(request)).documents) == 1
        finally:
            await second.stop()
    finally:
        await service.stop()
        await first.stop()
