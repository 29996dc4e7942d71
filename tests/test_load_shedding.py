"""Admission, fair shares of Triton and abandoned work, on a real gateway and its embedded Triton.

Asserted are orderings and counts (Triton's own counters), never absolute times."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from ner_gateway.net import free_port
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

from conftest import metric_sum, scrape, wait_for

SENTENCE = "Angela Merkel met Emmanuel Macron in Berlin on Monday."
# Short for the load: 256 callers of one sentence with 1 s deadlines are more than the gateway and Triton can
# answer in time on 2 cores, so calls are both refused at the door and timed out. (With 0.5 s and one busy loop
# beside the tests, too few calls reached the gateway's handler before their deadline to fill its 4 places; with
# 0.1 s almost none do: the callers and the gateway's event loop share the two cores. bench/flood.py measures it.)
FLOOD_DEADLINE = 1.0
LARGE = " ".join([SENTENCE] * 1800)  # ~100,000 characters: ~540 windows of the tiny model's 64 tokens


def total(port: int, name: str) -> float:
    """Sum of a metric's samples, all label sets, at http://127.0.0.1:port/metrics."""
    return metric_sum(scrape(port), name)


@pytest.fixture(scope="module")
def shedding_gateway(start_gateway, tiny_repository: Path):  # type: ignore[no-untyped-def]
    """Small limits so that a test can reach them: 4 requests, one 512-token call in Triton per request."""
    ports = {"triton": free_port(), "gateway": free_port()}
    gateway = start_gateway(tiny_repository, env={
        "NER_MAX_INFLIGHT_REQUESTS": "4", "NER_REQUEST_INFLIGHT_TOKENS": "512", "NER_RETRY_AFTER_MS": "250",
        "NER_TRITON_METRICS_PORT": str(ports["triton"]), "NER_METRICS_PORT": str(ports["gateway"]),
    })
    return gateway, ports


def recognize(channel: grpc.aio.Channel, text: str, timeout: float) -> grpc.aio.UnaryUnaryCall:
    stub = ner_pb2_grpc.NerServiceStub(channel)
    return stub.Recognize(ner_pb2.RecognizeRequest(texts=[text]), timeout=timeout)


@dataclass
class Flood:
    """What the callers of one flood got: calls by code, the details by code (digits as N), the retry hints."""

    codes: dict[grpc.StatusCode, int] = field(default_factory=dict)
    details: dict[grpc.StatusCode, set[str]] = field(default_factory=dict)
    pushback: set[str] = field(default_factory=set)


async def flood(channel: grpc.aio.Channel, seconds: float, deadline_s: float, wait_the_hint: bool) -> Flood:
    """256 callers sending one sentence per call for ``seconds``; with ``wait_the_hint``, a caller refused with a
    retry hint waits that long before its next call (as gRPC's retry policy does), else it calls again at once."""
    result = Flood()
    stop_at = time.monotonic() + seconds

    async def caller() -> None:
        while time.monotonic() < stop_at:
            wait_ms = 0
            try:
                await recognize(channel, SENTENCE, deadline_s)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
                result.details.setdefault(code, set()).add(re.sub(r"\d+", "N", e.details() or ""))
                hints = [v for k, v in (e.trailing_metadata() or ()) if k == "grpc-retry-pushback-ms"]
                result.pushback.update(hints)
                wait_ms = int(hints[0]) if hints and wait_the_hint else 0
            result.codes[code] = result.codes.get(code, 0) + 1
            if wait_ms:
                await asyncio.sleep(wait_ms / 1000)

    await asyncio.gather(*(caller() for _ in range(256)))
    return result


async def test_a_sentence_overtakes_a_large_request_whose_windows_wait_in_the_gateway(shedding_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway, ports = shedding_gateway
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        await recognize(channel, SENTENCE, 30)  # warm
        before = total(ports["triton"], "nv_inference_count_total")
        large = asyncio.ensure_future(recognize(channel, LARGE, 120))
        pending = []
        while total(ports["triton"], "nv_inference_count_total") - before < 16:  # the large request is in Triton
            await asyncio.sleep(0.005)
        for _ in range(20):  # Triton's queue while it runs: one call of the large request at most
            pending.append(total(ports["triton"], "nv_inference_pending_request_count"))
        done_when_small_sent = total(ports["triton"], "nv_inference_count_total") - before
        answer = await recognize(channel, SENTENCE, 30)
        done_when_small_returned = total(ports["triton"], "nv_inference_count_total") - before
        response = await large
    windows = response.documents[0].windows
    assert windows > 400 and answer.documents[0].entities
    assert max(pending) <= 1, pending
    # The sentence did not wait behind the large request's ~70 calls: while it was answered, fewer than half of
    # the large request's windows ran (counted from when it was sent: the scrapes above take a loaded machine a
    # while, and the large request runs meanwhile).
    ran_meanwhile = done_when_small_returned - done_when_small_sent
    assert ran_meanwhile < windows / 2, (done_when_small_sent, done_when_small_returned, windows)


async def test_a_flood_is_shed_with_a_retry_hint_and_triton_runs_nothing_given_up(shedding_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway, ports = shedding_gateway
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        await recognize(channel, SENTENCE, 30)
        triton_before = total(ports["triton"], "nv_inference_count_total")
        result = await flood(channel, 4.0, FLOOD_DEADLINE, wait_the_hint=False)
        codes, details, pushback = result.codes, result.details, result.pushback
        await asyncio.sleep(0.5)
        rows_run = total(ports["triton"], "nv_inference_count_total") - triton_before
        # Still serving normally afterwards.
        assert (await recognize(channel, SENTENCE, 30)).documents[0].entities
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED}, details
    refused = codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)
    assert refused >= 10 and pushback == {"250"}, (codes, details)
    assert codes.get(grpc.StatusCode.OK, 0) > 0, codes
    # At capacity, and (once the loaded loop has taught the estimate) deadlines shorter than the model's queue.
    assert "the gateway is at capacity (requests: limit N); retry in N ms or on another replica" in details[
        grpc.StatusCode.RESOURCE_EXHAUSTED], details
    assert details[grpc.StatusCode.RESOURCE_EXHAUSTED] <= {
        "the gateway is at capacity (requests: limit N); retry in N ms or on another replica",
        "the gateway's queue for this model would take ~N ms, more than the N ms left of the deadline; retry in N ms "
        "or on another replica"}, details
    # Triton's work went to answers: refused calls and calls out of time before their turn never reach it; what
    # it ran beyond the answers is calls whose answer came back late (the +1 is this test's last call): up to
    # ~0.55 per answer measured on a loaded machine. The unprotected gateway ran 71 windows per answer in the same
    # flood (issue 9).
    assert rows_run <= 2 * codes.get(grpc.StatusCode.OK, 0) + 1, (rows_run, codes)
    assert total(ports["gateway"], "ner_refused_requests_total") >= refused


@pytest.fixture(scope="module")
def default_gateway(start_gateway, tiny_repository: Path):  # type: ignore[no-untyped-def]
    """The gateway's default limits (256 requests at once), and both /metrics ports."""
    ports = {"triton": free_port(), "gateway": free_port()}
    gateway = start_gateway(tiny_repository, env={"NER_TRITON_METRICS_PORT": str(ports["triton"]),
                                                  "NER_METRICS_PORT": str(ports["gateway"])})
    return gateway, ports


async def test_a_flood_of_short_deadlines_is_refused_for_the_queue_and_callers_that_wait_the_hint_get_answers(
        default_gateway) -> None:  # type: ignore[no-untyped-def]
    """256 callers with 100 ms deadlines, each waiting the retry hint after a refusal as gRPC's retry policy does.
    The admission limit (256) is never reached: what refuses is the wait the model's queue means against each
    call's deadline, at once and with the hint, so the callers back off, the gateway keeps answering, and Triton's
    work goes to answers."""
    gateway, ports = default_gateway
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        await recognize(channel, SENTENCE, 30)
        triton_before = total(ports["triton"], "nv_inference_count_total")
        refused_before = total(ports["gateway"], "ner_refused_requests_total")
        result = await flood(channel, 5.0, 0.1, wait_the_hint=True)
        codes, details, pushback = result.codes, result.details, result.pushback
        await asyncio.sleep(0.5)
        rows_run = total(ports["triton"], "nv_inference_count_total") - triton_before
        assert (await recognize(channel, SENTENCE, 30)).documents[0].entities
    refused = codes.get(grpc.StatusCode.RESOURCE_EXHAUSTED, 0)
    assert details[grpc.StatusCode.RESOURCE_EXHAUSTED] == {
        "the gateway's queue for this model would take ~N ms, more than the N ms left of the deadline; retry in N ms "
        "or on another replica"}, details
    assert pushback == {"200"}
    # Measured here: 1,000-2,000 refused and 2,400-4,300 answered in 5 s. (The tiny model costs Triton almost
    # nothing: the rest time out in the gateway's own gRPC queues, which the callers share 2 cores with; the demo
    # model's flood, in bench/soak.py, is Triton's, and there 98% of the calls not answered are refused.)
    assert refused >= 100 and codes.get(grpc.StatusCode.OK, 0) >= 200, codes
    assert rows_run <= 2 * codes.get(grpc.StatusCode.OK, 0) + 1, (rows_run, codes)
    assert total(ports["gateway"], "ner_refused_requests_total") - refused_before >= refused


async def send_past_its_deadline(stub: ner_pb2_grpc.NerServiceStub, ports: dict[str, int], texts: list[str],
                                  deadline_s: float) -> tuple[int, int] | None:
    """Send ``texts`` with ``deadline_s``; None if the answer came in time, else (windows Triton ran for the call,
    windows the gateway counted as abandoned), once nothing more runs for it."""
    before = total(ports["triton"], "nv_inference_count_total")
    abandoned_before = total(ports["gateway"], "ner_abandoned_windows_total")
    try:
        await stub.Recognize(ner_pb2.RecognizeRequest(texts=texts), timeout=deadline_s)
        return None
    except grpc.aio.AioRpcError as e:
        assert e.code() is grpc.StatusCode.DEADLINE_EXCEEDED, (e.code(), e.details())
    await asyncio.sleep(0.3)  # the call in Triton when the deadline passed ends
    settled = total(ports["triton"], "nv_inference_count_total")
    await asyncio.sleep(1.0)
    assert total(ports["triton"], "nv_inference_count_total") == settled  # nothing more runs for it
    return int(settled - before), int(total(ports["gateway"], "ner_abandoned_windows_total") - abandoned_before)


async def test_the_work_of_a_request_whose_deadline_passed_stops(shedding_gateway) -> None:  # type: ignore[no-untyped-def]
    gateway, ports = shedding_gateway
    texts = [LARGE] * 4
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        stub = ner_pb2_grpc.NerServiceStub(channel)
        started = time.monotonic()
        windows = 4 * (await stub.Recognize(ner_pb2.RecognizeRequest(texts=[LARGE]), timeout=60)).documents[0].windows
        # The deadline must pass while the request is in Triton. Where that is depends on the machine's load
        # (all of the request's CPU work comes first: on a loaded CI machine half the work once passed before any
        # Triton call), so it is searched for, starting from half the work measured here.
        low, high = 0.0, None
        deadline_s = 2 * (time.monotonic() - started)
        tries = []
        for _ in range(5):
            outcome = await send_past_its_deadline(stub, ports, texts, deadline_s)
            tries.append((round(deadline_s, 2), outcome))
            if outcome is None or outcome[0] >= windows:  # answered, or passed after Triton's part: shorter
                high = deadline_s
            elif outcome[0] == 0:  # passed before Triton's first call: a longer one
                low = deadline_s
            else:
                break
            deadline_s = (low + high) / 2 if high is not None else 2 * low
    assert outcome is not None and 0 < outcome[0] < windows, (tries, windows)
    ran, abandoned = outcome
    # Every window Triton did not run is counted as abandoned (never sent, or, with cancel_calls, cancelled there).
    assert ran + abandoned >= windows, (ran, abandoned, windows)


async def test_at_capacity_a_call_is_refused_before_its_request_is_parsed(shedding_gateway) -> None:  # type: ignore[no-untyped-def]
    """The door (transport/door.py): at the request limit, even bytes that are no RecognizeRequest get
    RESOURCE_EXHAUSTED with the retry hint, so nothing was parsed; with room, the same bytes are INVALID_ARGUMENT.
    Health checks are answered meanwhile."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    gateway, ports = shedding_gateway
    garbage = b"\xff\xff\xff\xff"
    async with grpc.aio.insecure_channel(gateway.address) as channel:
        raw = channel.unary_unary("/ner.v1.NerService/Recognize")
        # Four long requests (~300 windows each: under the windows limit together) hold the 4 places.
        long_text = " ".join([SENTENCE] * 1000)
        holders = [asyncio.ensure_future(recognize(channel, long_text, 120)) for _ in range(4)]
        try:
            await wait_for(lambda: total(ports["gateway"], "ner_inflight_requests") >= 4, 60,
                           "the gateway's 4 places taken")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await raw(garbage, timeout=10)
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, refused.value.details()
            assert ("grpc-retry-pushback-ms", "250") in tuple(refused.value.trailing_metadata() or ())
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            for holder in holders:
                holder.cancel()
        await asyncio.gather(*holders, return_exceptions=True)
        await wait_for(lambda: total(ports["gateway"], "ner_inflight_requests") == 0, 60, "the places given back")
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await raw(garbage, timeout=10)
    assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
