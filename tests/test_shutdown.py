"""Shutdown is readiness first: SIGTERM -> NOT_SERVING at once -> serve on for the drain -> no new calls,
in-flight ones finish within the grace period -> exit 0. A real ``ner-gateway serve`` process under load."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

from conftest import GatewayProcess, child_pids, poll_until

DRAIN_S = 2.0
GRACE_S = 30.0  # the default
CLIENTS = 8
# 64 texts of ~80 tokens: two windows each, so that 8 calls in flight stay within the gateway's admission limits.
TEXTS = ["Angela Merkel visited Paris and Berlin with the chairman of Siemens. " * 6] * 64
SERVICES = ("", "ner.v1.NerService")
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Call:
    client: int
    sent: float
    done: float
    code: grpc.StatusCode


def keep_calling(client: int, gateway: GatewayProcess, calls: list[Call], stop: threading.Event) -> None:
    """One client: 64-text calls back to back on one connection, until one fails (the port closed) or ``stop``."""
    with gateway.channel() as channel:
        stub = ner_pb2_grpc.NerServiceStub(channel)
        while not stop.is_set():
            sent = time.monotonic()
            try:
                response = stub.Recognize(ner_pb2.RecognizeRequest(texts=TEXTS), timeout=120)
                code = grpc.StatusCode.OK if len(response.documents) == len(TEXTS) else grpc.StatusCode.DATA_LOSS
            except grpc.RpcError as e:
                code = e.code()
            calls.append(Call(client, sent, time.monotonic(), code))
            if code != grpc.StatusCode.OK:
                return


def health_status(channel: grpc.Channel, service: str) -> int | grpc.StatusCode:
    try:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
    except grpc.RpcError as e:
        return e.code()


def test_sigterm_drains_readiness_first_under_load(start_gateway, tiny_repository: Path) -> None:
    gateway = start_gateway(tiny_repository, env={"NER_SHUTDOWN_DRAIN_S": str(DRAIN_S)})
    calls: list[Call] = []
    stop = threading.Event()
    clients = [threading.Thread(target=keep_calling, args=(k, gateway, calls, stop)) for k in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        # Every client has had a call answered, and so has its next one in flight.
        poll_until(lambda: {c.client for c in calls} == set(range(CLIENTS)), 60, lambda: f"a call per client: {calls}")
        assert all(c.code == grpc.StatusCode.OK for c in calls), calls
        (triton,) = child_pids(gateway.process.pid, "tritonserver")  # the embedded Triton
        triton_processes = [triton, *child_pids(triton, "")]  # and its Python-backend stubs
        assert len(triton_processes) > 1, triton_processes
        signalled = time.monotonic()
        gateway.process.send_signal(signal.SIGTERM)
        # A new connection: health says NOT_SERVING on every service at once, while the port still serves calls.
        with gateway.channel() as channel:
            seen: list[int | grpc.StatusCode] = []

            def not_serving() -> bool:
                seen.append(health_status(channel, ""))
                return seen[-1] == NOT_SERVING

            poll_until(not_serving, signalled + 1.0 - time.monotonic(), lambda: f"NOT_SERVING, health: {seen}")
            assert health_status(channel, SERVICES[1]) == NOT_SERVING
            sent = time.monotonic()
            response = ner_pb2_grpc.NerServiceStub(channel).Recognize(
                ner_pb2.RecognizeRequest(texts=["Angela Merkel visited Paris"]), timeout=60)
            assert len(response.documents) == 1 and sent < signalled + DRAIN_S
        code = gateway.process.wait(timeout=DRAIN_S + GRACE_S + 20)
        exited = time.monotonic()
    finally:
        stop.set()
        for client in clients:
            client.join(timeout=150)
    assert code == 0, gateway.output()[-3000:]
    assert exited - signalled >= DRAIN_S
    # Every call sent before the drain's end (less a margin for the signal's delivery) completed OK, including
    # those still in flight when the gateway stopped accepting; later ones were refused with UNAVAILABLE. A call
    # that reaches the server in the instant it stops, before a handler takes it, is CANCELLED by gRPC core
    # instead (grpc/grpc#41785, seen once in CI): allowed for those late calls only.
    drain_end = signalled + DRAIN_S
    early = [c for c in calls if c.sent < drain_end - 0.5]
    assert early and [c for c in early if c.code != grpc.StatusCode.OK] == []
    late_codes = {c.code for c in calls if c.sent >= drain_end - 0.5}
    assert late_codes <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, calls
    assert any(c.code == grpc.StatusCode.OK and c.sent > signalled for c in calls)  # served during the drain
    assert any(c.code == grpc.StatusCode.OK and c.sent < drain_end < c.done for c in calls)  # finished in grace
    # Stopped in order, to the end: its embedded Triton and the stubs stopped (and reaped) before the gateway
    # exited, not left to die after it.
    assert [pid for pid in triton_processes if Path(f"/proc/{pid}").exists()] == [], "Triton outlived the gateway"


def test_second_signal_ends_the_drain(start_gateway, tiny_repository: Path) -> None:
    gateway = start_gateway(tiny_repository, env={"NER_SHUTDOWN_DRAIN_S": "60"})
    gateway.process.send_signal(signal.SIGTERM)
    with gateway.channel() as channel:
        poll_until(lambda: health_status(channel, "") == NOT_SERVING, 5, "NOT_SERVING after SIGTERM")
        assert gateway.process.poll() is None  # draining, for 60 s
    gateway.process.send_signal(signal.SIGINT)
    assert gateway.process.wait(timeout=30) == 0  # not the 60 s drain
