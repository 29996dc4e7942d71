"""Per-model readiness: one model unloaded in Triton takes out that model only, never the gateway or the others.

A real ``ner-gateway serve`` process in front of a Triton the test starts itself (so that it can unload and
load models through Triton's model-control API, which needs the server's admin header)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.aio as triton_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ner_gateway.core.domain import RecognizeRequest
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc
from ner_gateway.settings import GatewaySettings
from ner_gateway.transport.server import Gateway
from ner_gateway.triton.process import EmbeddedTriton

from conftest import TINY_MODEL, stop_process, wait_for

OTHER = f"{TINY_MODEL}-b"
TEXTS = ["Angela Merkel visited Paris and Berlin"]
SERVICES = ("", "ner.v1.NerService")
SERVING = health_pb2.HealthCheckResponse.SERVING
POLL_S = GatewaySettings.model_fields["health_check_interval_s"].default  # the pace of Triton polls and health


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint built twice: ``tiny`` (the default) and ``tiny-b``."""
    from ner_builder.build import BuildOptions, build_model
    from ner_builder.triton_config import ServingOptions

    repository = tmp_path_factory.mktemp("two_models")
    for name in (TINY_MODEL, OTHER):
        build_model(tiny_checkpoint, repository, name, BuildOptions(serving=ServingOptions(max_batch_size=8)))
    return repository


@pytest.fixture(scope="module")
async def triton(two_models: Path):
    server = EmbeddedTriton(two_models)
    await server.start()
    yield server
    await server.stop()


async def outcome(call: grpc.aio.UnaryUnaryCall) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""


async def models_ready(ner: ner_pb2_grpc.NerServiceStub) -> dict[str, bool]:
    return {m.name: m.ready for m in (await ner.ListModels(ner_pb2.ListModelsRequest(), timeout=5)).models}


async def test_unloading_one_model_leaves_the_others_serving(start_gateway, two_models: Path,
                                                             triton: EmbeddedTriton) -> None:
    gateway = await asyncio.to_thread(start_gateway, two_models, "--triton-url", triton.grpc_url,
                                      "--default-model", TINY_MODEL)
    control = triton_grpc.InferenceServerClient(triton.grpc_url)
    unavailable = (grpc.StatusCode.UNAVAILABLE,
                   f"model {OTHER!r} version 1 is not ready on any inference server; retry later")
    ok = (grpc.StatusCode.OK, "")
    try:
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            ner, health = ner_pb2_grpc.NerServiceStub(channel), health_pb2_grpc.HealthStub(channel)

            async def recognize(model: str = "") -> tuple[grpc.StatusCode, str]:
                return await outcome(ner.Recognize(ner_pb2.RecognizeRequest(texts=TEXTS, model=model), timeout=10))

            async def ready_is(expected: dict[str, bool]) -> bool:
                return await models_ready(ner) == expected

            assert await recognize(OTHER) == ok
            # Health as the gateway streams it (Watch), throughout: a message for every change, however brief.
            watched: dict[str, list[int]] = {service: [] for service in SERVICES}

            async def watch(service: str) -> None:
                async for response in health.Watch(health_pb2.HealthCheckRequest(service=service)):
                    watched[service].append(response.status)

            watchers = [asyncio.create_task(watch(service)) for service in SERVICES]
            try:
                await wait_for(lambda: all(watched.values()), 10, "the health watches' first status")

                await control.unload_model(OTHER, headers=triton.admin_headers)
                # Until the gateway's own poll finds the unload (no call for that model meanwhile, so only the poll
                # can tell: ListModels turns it ready: false), the default model answers every call.
                default: list[tuple[grpc.StatusCode, str]] = []

                async def unload_seen() -> bool:
                    default.append(await recognize())
                    return await ready_is({TINY_MODEL: True, OTHER: False})

                await wait_for(unload_seen, 30, f"the gateway's poll to find {OTHER} unloaded")
                # From then on, for two more poll intervals (health follows the pool at that pace): the default
                # model still answers every call, the unloaded one's calls fail fast, naming it.
                loop = asyncio.get_running_loop()
                seen_at, other = loop.time(), []
                while loop.time() < seen_at + 2 * POLL_S:
                    default.append(await recognize())
                    other.append(await recognize(OTHER))
                assert other and other == [unavailable] * len(other)
                assert default == [ok] * len(default)
                # A name the gateway never knew is still NOT_FOUND.
                assert (await recognize("no-such-model"))[0] == grpc.StatusCode.NOT_FOUND

                await control.load_model(OTHER, headers=triton.admin_headers)
                await wait_for(lambda: ready_is({TINY_MODEL: True, OTHER: True}), 30,
                               f"the gateway's poll to find {OTHER} loaded again")
                response = await ner.Recognize(ner_pb2.RecognizeRequest(texts=TEXTS, model=OTHER), timeout=10)
                assert response.model == OTHER and len(response.documents) == 1

                # Unloaded again, and called at once: the call that finds it unloaded in Triton (before any poll
                # does) fails fast too, naming it, and takes it out at once; the default model answers.
                await control.unload_model(OTHER, headers=triton.admin_headers)
                assert await recognize(OTHER) == unavailable
                assert await models_ready(ner) == {TINY_MODEL: True, OTHER: False}
                assert await recognize() == ok
                for service in SERVICES:
                    request = health_pb2.HealthCheckRequest(service=service)
                    assert (await health.Check(request, timeout=5)).status == SERVING
            finally:
                for watcher in watchers:
                    watcher.cancel()
                await asyncio.gather(*watchers, return_exceptions=True)
            # Health never left SERVING on any service, from before the first unload to after the second.
            assert watched == {service: [SERVING] for service in SERVICES}
    finally:
        if not await control.is_model_ready(OTHER):  # for the next test, whatever failed here
            await control.load_model(OTHER, headers=triton.admin_headers)
        await control.close()
        await asyncio.to_thread(stop_process, gateway.process)


async def inference_counts(triton: EmbeddedTriton) -> dict[str, int]:
    client = triton_grpc.InferenceServerClient(triton.grpc_url)
    try:
        stats = await client.get_inference_statistics(as_json=True)
    finally:
        await client.close()
    return {m["name"]: int(m.get("inference_count", 0)) for m in stats.get("model_stats", [])}


async def test_a_model_unloaded_on_one_endpoint_is_served_by_the_others(two_models: Path,
                                                                        triton: EmbeddedTriton) -> None:
    second = EmbeddedTriton(two_models)
    await second.start()
    settings = GatewaySettings(model_repository=two_models, port=0, metrics_port=None, default_model=TINY_MODEL,
                               triton_url=f"{triton.grpc_url},{second.grpc_url}", health_check_interval_s=0.2)
    gateway = Gateway(settings)
    control = triton_grpc.InferenceServerClient(second.grpc_url)

    async def recognize_all(model: str, times: int = 10) -> None:
        for _ in range(times):
            result = await gateway.pipeline.recognize(RecognizeRequest(texts=TEXTS, model=model), timeout_s=10)
            assert result.model == model

    try:
        await gateway.start()
        await control.unload_model(OTHER, headers=second.admin_headers)
        # Calls that reach the second endpoint before the next poll are retried on the first: none fails.
        await recognize_all(OTHER)
        for _ in range(2):  # polls, run here rather than waited for: each began after the calls above
            await gateway.backend.refresh()
        assert gateway.backend.ready_endpoints == [triton.grpc_url, second.grpc_url]
        assert gateway.backend.model_ready(OTHER) and gateway.health.serving
        # The unloaded model goes to the first endpoint only; the default model still to both.
        before = await inference_counts(second)
        await recognize_all(OTHER)
        await recognize_all(TINY_MODEL)
        after = await inference_counts(second)
        assert after.get(OTHER, 0) == before.get(OTHER, 0) and after[TINY_MODEL] > before[TINY_MODEL]
        # Loaded again: the second endpoint serves it again once the gateway's own poll has found it there.
        await control.load_model(OTHER, headers=second.admin_headers)

        async def second_serves_it_again() -> bool:
            await recognize_all(OTHER, times=2)  # round-robin: one of two goes to the second, once it is back
            return (await inference_counts(second)).get(OTHER, 0) > after.get(OTHER, 0)

        await wait_for(second_serves_it_again, 20, f"the second endpoint to serve {OTHER} again")
        assert gateway.backend.model_ready(OTHER) and gateway.health.serving
    finally:
        await gateway.stop()
        await control.close()
        await second.stop()
