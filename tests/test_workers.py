"""Several gateway workers on one port (``ner-gateway serve --workers 2``) in front of one embedded Triton, on
real servers: each worker serves, a worker that dies is replaced, /metrics sums the workers, tokens reload in
every worker, Triton is supervised once, and SIGTERM drains every worker readiness-first."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ner_gateway.net import free_port
from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

from conftest import child_pids as children
from conftest import metric_sum, scrape, wait_for

SENTENCE = "Angela Merkel visited Paris"


def recognize(address: str, token: str, timeout: float = 30) -> ner_pb2.RecognizeResponse:
    """One call on a connection of its own: the kernel spreads connections over the workers (SO_REUSEPORT)."""
    with grpc.insecure_channel(address) as channel:
        return ner_pb2_grpc.NerServiceStub(channel).Recognize(
            ner_pb2.RecognizeRequest(texts=[SENTENCE]), timeout=timeout,
            metadata=[("authorization", f"Bearer {token}")])


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


@pytest.fixture(scope="module")
def workers(start_gateway, tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    tokens = tmp_path_factory.mktemp("worker-tokens") / "tokens"
    tokens.write_text("first-token\n")
    metrics_port = free_port()
    gateway = start_gateway(tiny_repository, "--workers", "2", env={
        "NER_METRICS_PORT": str(metrics_port), "NER_AUTH_TOKENS_FILE": str(tokens)})
    return gateway, metrics_port, tokens


async def test_every_worker_serves_one_port_and_metrics_sum_over_them(workers) -> None:  # type: ignore[no-untyped-def]
    gateway, metrics_port, _ = workers
    pids = children(gateway.process.pid, "ner_gateway.cli")
    assert len(pids) == 2, pids
    assert len(children(gateway.process.pid, "tritonserver")) == 1  # one Triton for both
    before = metric_sum(scrape(metrics_port), "ner_requests_total")
    for _ in range(12):
        assert recognize(gateway.address, "first-token").documents[0].entities
    # /metrics is the supervisor's: the sum over both workers' samples.
    assert metric_sum(scrape(metrics_port), "ner_requests_total") - before == 12
    # Each worker serves on its own: with either one killed, the other answers every call; the supervisor
    # replaces the dead one with a new process.
    for victim in pids:
        os.kill(victim, signal.SIGKILL)
        # Once it is gone its listening socket is closed (a connection queued to it in the instant it died is
        # reset: UNAVAILABLE, which clients retry).
        await wait_for(lambda: victim not in children(gateway.process.pid, "ner_gateway.cli"), 10,  # noqa: B023
                       "the worker to die")
        for _ in range(6):
            assert recognize(gateway.address, "first-token").documents[0].entities
        await wait_for(lambda: _replaced(gateway.process.pid, pids), 60, "a new worker")  # noqa: B023
        new = next(p for p in children(gateway.process.pid, "ner_gateway.cli") if p not in pids)
        await wait_for(lambda: _listening(new), 60, "the new worker to serve")  # noqa: B023 (awaited here)
        pids = children(gateway.process.pid, "ner_gateway.cli")
    assert "exited unexpectedly" in gateway.output()


def _replaced(parent: int, before: list[int]) -> bool:
    """Two workers again, one of them new."""
    now = children(parent, "ner_gateway.cli")
    return len(now) == 2 and now != before and len(set(now) & set(before)) == 1


def _listening(pid: int) -> bool:
    """The worker has bound its gRPC port (it has a listening TCP socket)."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
        table += Path(f"/proc/{pid}/net/tcp6").read_text().splitlines()[1:]
    except OSError:
        return False
    return any(line.split()[3] == "0A" and line.split()[9] in inodes for line in table)  # 0A: LISTEN


async def test_a_rotated_token_takes_effect_in_every_worker(workers) -> None:  # type: ignore[no-untyped-def]
    gateway, _, tokens = workers
    tokens.write_text("second-token\n")

    def rotated() -> bool:
        # Ten connections: with two workers, both are reached.
        for _ in range(10):
            try:
                recognize(gateway.address, "second-token", timeout=10)
            except grpc.RpcError:
                return False
        return True

    await wait_for(rotated, 30, "every worker to accept the new token")
    for _ in range(10):
        with pytest.raises(grpc.RpcError) as refused:
            recognize(gateway.address, "first-token")
        assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_triton_is_supervised_once_for_all_workers(workers) -> None:  # type: ignore[no-untyped-def]
    gateway, _, _ = workers
    (triton,) = children(gateway.process.pid, "tritonserver")
    os.kill(triton, signal.SIGKILL)

    def answered() -> bool:
        try:
            return bool(recognize(gateway.address, "second-token", timeout=5).documents[0].entities)
        except grpc.RpcError:
            return False

    await wait_for(lambda: children(gateway.process.pid, "tritonserver") not in ([], [triton]), 60, "a new Triton")
    # Each worker polls Triton on its own (NER_HEALTH_CHECK_INTERVAL_S): until both have seen it back, a call may
    # land on one that has not. Ten fresh connections in a row answered: both serve again.
    await wait_for(lambda: all(answered() for _ in range(10)), 60, "every worker to answer again")


def test_sigterm_drains_every_worker_then_stops(start_gateway, tiny_repository: Path) -> None:  # type: ignore[no-untyped-def]
    gateway = start_gateway(tiny_repository, "--workers", "2", env={"NER_SHUTDOWN_DRAIN_S": "3"})
    pids = children(gateway.process.pid, "ner_gateway.cli")
    triton = children(gateway.process.pid, "tritonserver")
    assert len(pids) == 2 and len(triton) == 1
    gateway.process.send_signal(signal.SIGTERM)
    # Readiness first: every worker says NOT_SERVING (six fresh connections reach both) and still answers.
    not_serving = {health_pb2.HealthCheckResponse.NOT_SERVING}
    deadline = time.monotonic() + 2.5
    while {health(gateway.address) for _ in range(6)} != not_serving:
        assert time.monotonic() < deadline, "the workers did not all turn NOT_SERVING within the drain"
    with grpc.insecure_channel(gateway.address) as channel:
        answer = ner_pb2_grpc.NerServiceStub(channel).Recognize(ner_pb2.RecognizeRequest(texts=[SENTENCE]), timeout=10)
    assert answer.documents[0].entities
    assert gateway.process.wait(60) == 0
    for pid in [*pids, *triton]:  # every worker and Triton are gone (at most a zombie not yet reaped)
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", pid
