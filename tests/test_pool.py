"""Several Tritons behind one gateway: balanced over the ready ones; one killed mid-load costs no call; one too
busy to answer a poll stays in rotation, one that never answers is taken out."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from ner_gateway.core.deadline import Deadline
from ner_gateway.core.discovery import read_manifest
from ner_gateway.core.domain import RecognizeRequest
from ner_gateway.settings import GatewaySettings
from ner_gateway.transport.health import serving
from ner_gateway.transport.server import Gateway
from ner_gateway.triton.endpoints import resolve
from ner_gateway.triton.pool import TritonPool
from ner_gateway.triton.process import EmbeddedTriton
from ner_gateway.triton.routing import TritonRouter

from conftest import TINY_MODEL, wait_for


def test_resolve_lists_and_dns_entries() -> None:
    assert resolve("a:1, b:2,a:1") == ["a:1", "b:2"]
    assert "127.0.0.1:8001" in resolve("dns:///localhost:8001")
    assert resolve("dns:///no-such-host.invalid:8001") == []


async def inference_counts(triton: EmbeddedTriton) -> int:
    import tritonclient.grpc.aio as triton_grpc

    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        stats = await client.get_inference_statistics(as_json=True)
        return sum(int(m.get("inference_count", 0)) for m in stats.get("model_stats", []))
    finally:
        await client.close()


async def test_two_tritons_balanced_and_one_killed_mid_load(tiny_repository: Path) -> None:
    tritons = [EmbeddedTriton(tiny_repository), EmbeddedTriton(tiny_repository)]
    await asyncio.gather(*(t.start() for t in tritons))
    settings = GatewaySettings(model_repository=tiny_repository, port=0, metrics_port=None,
                               triton_url=",".join(t.grpc_url for t in tritons), health_check_interval_s=0.2)
    gateway = Gateway(settings)
    try:
        await gateway.start()
        assert gateway.backend.ready_endpoints == [t.grpc_url for t in tritons]
        request = RecognizeRequest(texts=["Angela Merkel visited Paris and Berlin"])
        results: list[tuple[float, str]] = []  # (time, outcome)
        killed_at: list[float] = []

        async def client(stop_at: float) -> None:
            while time.monotonic() < stop_at:
                try:
                    await gateway.pipeline.recognize(request, timeout_s=10)
                    results.append((time.monotonic(), "ok"))
                except Exception as e:  # counted, asserted below
                    results.append((time.monotonic(), type(e).__name__))

        served_before_kill: list[int] = []

        async def killer() -> None:
            # Until traffic has reached the first Triton (and leaving time to serve after the kill).
            while (served := await inference_counts(tritons[0])) <= 5 and time.monotonic() < stop_at - 2.5:
                await asyncio.sleep(0.05)
            served_before_kill.append(served)
            killed_at.append(time.monotonic())
            os.killpg(tritons[0].pid, signal.SIGKILL)  # like a node loss: no drain

        stop_at = time.monotonic() + 4.0
        await asyncio.gather(*(client(stop_at) for _ in range(4)), killer())
        # Traffic went to both before the kill, and every call succeeded (retried on the live endpoint).
        failures = [(t - killed_at[0], outcome) for t, outcome in results if outcome != "ok"]
        assert failures == []
        assert len([1 for t, _ in results if t > killed_at[0]]) > 10
        assert served_before_kill[0] > 5 and await inference_counts(tritons[1]) > 10
        assert gateway.health.serving is True
        # The killed Triton's supervisor restarts it on the same port; the pool takes it back in rotation.
        await wait_for(lambda: gateway.backend.ready_endpoints == [t.grpc_url for t in tritons], 30,
                       "the restarted Triton back in rotation")
    finally:
        await gateway.stop()
        for triton in tritons:
            await triton.stop()


async def test_a_triton_that_does_not_answer_a_poll_stays_until_it_misses_several(
        tiny_repository: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Under load a poll can go unanswered within its interval (Triton, or the gateway's own event loop, busy).
    Taking the only Triton out for that turned a flood into UNAVAILABLE for every call; only a Triton that leaves
    ``unanswered_polls_down`` polls in a row unanswered (hung: here, stopped with SIGSTOP) is taken out."""
    caplog.set_level(logging.INFO, logger="ner_gateway.triton.pool")
    triton = EmbeddedTriton(tiny_repository)
    await triton.start()
    pool = TritonPool(triton.grpc_url, refresh_interval_s=0.25, unanswered_polls_down=4)
    manifest = read_manifest(tiny_repository / TINY_MODEL / "1")

    def polls_unanswered() -> int:
        return sum("did not answer a poll" in r.getMessage() for r in caplog.records)

    try:
        await pool.wait_ready(30)
        model = await pool.check_model(manifest)
        pool.watch(model)
        pool.start()
        await pool.refresh()
        assert pool.model_ready(model.name) and polls_unanswered() == 0
        assert triton.pid is not None
        os.killpg(triton.pid, signal.SIGSTOP)  # no answer at all, the connection stays open
        try:
            # Polls go unanswered; the endpoint and its model stay in rotation meanwhile.
            states, deadline = [], time.monotonic() + 20
            while polls_unanswered() < 2 and time.monotonic() < deadline:
                states.append((serving(pool), pool.model_ready(model.name)))
                await asyncio.sleep(0.02)
            assert set(states) == {(True, True)} and polls_unanswered() == 2, (set(states), polls_unanswered())
            # Still no answer: taken out at the fourth poll in a row.
            await wait_for(lambda: not serving(pool), 20, "the pool to take the stopped Triton out")
            assert polls_unanswered() == 3 and not pool.model_ready(model.name)
            assert pool.ready_endpoints == []
            assert any("left 4 polls in a row unanswered" in r.getMessage() for r in caplog.records)
        finally:
            os.killpg(triton.pid, signal.SIGCONT)
        # Back in rotation once it answers, and serving.
        await wait_for(lambda: pool.model_ready(model.name), 20, "the resumed Triton back in rotation")
        logits = await TritonRouter(pool).infer(
            model, {name: np.ones((1, 8), dtype=np.int64) for name in manifest.inputs}, manifest.output,
            Deadline.after(30))
        assert logits.shape == (1, 8, len(manifest.labels))
    finally:
        await pool.close()
        await triton.stop()
