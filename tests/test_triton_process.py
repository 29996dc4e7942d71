"""The embedded Triton on a real tritonserver: nothing of it outlives it (processes, /dev/shm regions), each port
setting takes effect on its own, and its admin protocols are closed to anyone without the per-start key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.net import free_port
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.settings import GatewaySettings
from ner_gateway.transport.server import Gateway
from ner_gateway.triton.process import EmbeddedTriton, TritonPorts

from conftest import TINY_MODEL, wait_for

KILLS = 3  # before the fix, a busy stub outlived a SIGKILLed Triton in 4 of 5 tries
_CHANNEL_ARGS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]


def group_members(pgid: int) -> list[str]:
    """Live processes whose process group is ``pgid`` (zombies hold nothing), as "pid comm"."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, group = text.rsplit(")", 1)[1].split()[:3]
        if int(group) == pgid and state not in {"Z", "X"}:
            found.append(f"{stat.parent.name} {text.split('(', 1)[1].rsplit(')', 1)[0]}")
    return found


def shm_regions(prefix: str) -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"{prefix}*")}


def tiny_inputs(repository: Path, batch: int = 8, length: int = 64) -> list[triton_aio.InferInput]:
    manifest = ModelManifest.read(repository / TINY_MODEL / "1")
    shape = (batch, length)
    arrays = {"input_ids": np.random.default_rng(0).integers(1000, 2000, shape, dtype=np.int64),
              "attention_mask": np.ones(shape, np.int64), "token_type_ids": np.zeros(shape, np.int64)}
    tensors = []
    for name in manifest.inputs:
        tensor = triton_aio.InferInput(name, [batch, length], "INT64")
        tensor.set_data_from_numpy(arrays[name])
        tensors.append(tensor)
    return tensors


@contextlib.asynccontextmanager
async def busy(triton: EmbeddedTriton, repository: Path, clients: int = 4) -> AsyncIterator[list[int]]:
    """Keep Triton busy with ``clients`` concurrent infer loops; yields [successful calls so far]."""
    done = [0]
    inputs = tiny_inputs(repository)

    async def loop(client: triton_aio.InferenceServerClient) -> None:
        while True:
            try:
                await client.infer(TINY_MODEL, inputs, client_timeout=10)
                done[0] += 1
            except InferenceServerException:
                await asyncio.sleep(0.05)  # Triton killed or restarting

    client = triton_aio.InferenceServerClient(triton.grpc_url, channel_args=_CHANNEL_ARGS)
    tasks = [asyncio.create_task(loop(client)) for _ in range(clients)]
    try:
        yield done
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()


async def test_killed_or_stopped_triton_leaves_no_process_or_shared_memory(tiny_repository: Path) -> None:
    triton = EmbeddedTriton(tiny_repository, restart_backoff_s=0.2)
    prefix = triton.shm_prefix
    await triton.start()
    try:
        async with busy(triton, tiny_repository) as done:
            for attempt in range(KILLS):
                before = done[0]
                await wait_for(lambda n=before: done[0] >= n + 20, 60, "inferences on the (re)started Triton")
                old = triton.pid
                assert old is not None
                members, regions = group_members(old), shm_regions(prefix)
                assert any("triton_python" in m for m in members), members  # its stubs share its group
                assert regions, "the Python backend's regions carry this server's prefix"
                os.kill(old, signal.SIGKILL)  # mid-load
                await wait_for(lambda pid=old: triton.pid != pid, 60, "the supervisor to restart Triton")
                # The supervisor ends the old group and removes its regions before starting the new server.
                assert group_members(old) == [], (attempt, group_members(old))
                assert not regions & shm_regions(prefix), (attempt, regions & shm_regions(prefix))
            before = done[0]
            await wait_for(lambda: done[0] >= before + 20, 60, "inferences on the restarted Triton")
            last = triton.pid
            assert last is not None and group_members(last)
            await triton.stop()  # under load
    finally:
        await triton.stop()
    assert group_members(last) == []
    assert shm_regions(prefix) == set()


async def test_admin_protocols_need_the_key_inference_does_not(
        tiny_repository: Path, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)
    triton = EmbeddedTriton(tiny_repository, log_verbose=1)
    await triton.start()
    try:
        key = triton.admin_headers["triton-grpc-protocol-admin-key"]
        assert len(key) >= 32
        async with triton_aio.InferenceServerClient(triton.grpc_url) as client:
            for call in (lambda: client.load_model(TINY_MODEL), lambda: client.unload_model(TINY_MODEL),
                         client.get_model_repository_index, client.get_system_shared_memory_status,
                         lambda: client.update_log_settings({"log_verbose_level": 0}), client.get_trace_settings):
                with pytest.raises(InferenceServerException) as refused:
                    await call()
                assert refused.value.status() == str(grpc.StatusCode.UNAVAILABLE)
                assert "This protocol is restricted, expecting header" in refused.value.message()
            assert await client.is_model_ready(TINY_MODEL)  # the unload was refused
            # What the gateway uses stays open.
            assert await client.is_server_ready()
            assert (await client.get_model_metadata(TINY_MODEL, as_json=True))["name"] == TINY_MODEL
            assert (await client.get_model_config(TINY_MODEL, as_json=True))["config"]["name"] == TINY_MODEL
            result = await client.infer(TINY_MODEL, tiny_inputs(tiny_repository, batch=2, length=8))
            assert result.as_numpy("logits").shape[:2] == (2, 8)
            # With the key, the repository API answers: the refusals above are the restriction, nothing else.
            index = await client.get_model_repository_index(headers=triton.admin_headers, as_json=True)
            assert TINY_MODEL in {m["name"] for m in index["models"]}
        request = urllib.request.Request(f"http://127.0.0.1:{triton.ports.http}/v2/repository/models/{TINY_MODEL}"
                                         "/unload", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as forbidden:
            await asyncio.to_thread(urllib.request.urlopen, request, timeout=5)
        assert forbidden.value.code == 403
    finally:
        await triton.stop()
    # The key is in Triton's command line only: neither the gateway's log nor Triton's (verbose) output has it.
    assert key not in caplog.text
    out, err = capfd.readouterr()
    assert "python_be" in out + err  # Triton's log was captured
    assert key not in out + err


async def test_the_triton_metrics_port_alone_takes_effect(tiny_repository: Path) -> None:
    metrics_port = free_port()
    gateway = Gateway(GatewaySettings(model_repository=tiny_repository, port=0, metrics_port=None,
                                      triton_metrics_port=metrics_port, health_check_interval_s=0.2))
    await gateway.start()
    try:
        assert gateway.triton is not None
        ports = gateway.triton.ports
        assert ports.metrics == metrics_port and 0 not in {ports.grpc, ports.http}
        assert len({ports.grpc, ports.http, ports.metrics}) == 3
        # The gateway works against its restricted Triton: it needs none of the admin protocols.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            request = ner_pb2.RecognizeRequest(texts=["Angela Merkel visited Paris"])
            assert len((await ner_pb2_grpc.NerServiceStub(channel).Recognize(request, timeout=30)).documents) == 1
        with await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{metrics_port}/metrics",
                                     timeout=5) as response:
            text = response.read().decode()
        assert f'nv_inference_count{{model="{TINY_MODEL}",version="1"}}' in text
    finally:
        await gateway.stop()


def test_ports_left_at_zero_are_free_ones() -> None:
    ports = TritonPorts(0, 0, 12345).resolved()
    assert ports.metrics == 12345 and ports.grpc and ports.http and ports.grpc != ports.http
