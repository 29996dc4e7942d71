"""Several gateway processes on one port in front of one Triton (``ner-gateway serve --workers N``).

One Python process serves one core's worth of gRPC, tokenizing and decoding; in front of a GPU that, not the
engine, sets the speed. So the supervisor (this module, in the process ``serve`` started):

- starts the embedded Triton once and supervises it (or uses NER_TRITON_URL), then starts N workers: each a
  plain ``ner-gateway serve`` with that Triton as its remote one, on the same port (gRPC binds with
  SO_REUSEPORT, so the kernel spreads connections over the workers);
- restarts a worker that dies, after a short backoff;
- serves ``/metrics`` for all of them: the workers write their samples to a shared folder (prometheus_client's
  multiprocess mode, PROMETHEUS_MULTIPROC_DIR) and the supervisor sums them, as Prometheus users of gunicorn
  know it; counters and histograms are summed, gauges say how (``multiprocess_mode``);
- on SIGTERM/SIGINT passes the signal to every worker, so that each drains readiness-first as a single gateway
  does (NOT_SERVING, NER_SHUTDOWN_DRAIN_S of serving, then the grace), waits for them, then stops Triton. A
  second signal is passed on too (it cuts the drains short).

Health, TLS and token reloads are each worker's own, as in a single gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from ner_gateway.net import free_port
from ner_gateway.observability.metrics import MULTIPROC_ENV
from ner_gateway.settings import GatewaySettings
from ner_gateway.transport.signals import shutdown_events
from ner_gateway.triton.process import EmbeddedTriton, TritonPorts

LOGGER = logging.getLogger(__name__)
RESTART_BACKOFF_S = 1.0
# A worker that exits with an error this soon after it started was refused its start (settings, repository,
# Triton's models): restarting it would fail the same way, so the supervisor stops, as a single gateway would.
STARTUP_FAILURE_S = 60.0


class WorkerFailed(Exception):
    """A worker could not start; its own log says why."""
# Settings that are the supervisor's, not a worker's: a worker talks to the supervisor's Triton and serves no
# /metrics of its own.
_SUPERVISOR_ONLY = {"workers", "triton_url", "triton_grpc_port", "triton_http_port", "triton_metrics_port",
                    "triton_log_verbose", "triton_trace_endpoint", "metrics_port", "port"}


def worker_environment(settings: GatewaySettings, triton_url: str, port: int, metrics_dir: Path) -> dict[str, str]:
    """The environment of a worker: every setting as its NER_* variable (flags included), pointed at the
    supervisor's Triton and port, writing its metrics to ``metrics_dir``."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("NER_")}
    for name, value in settings.model_dump(exclude=_SUPERVISOR_ONLY).items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"NER_{name.upper()}"] = str(value)
    # No NER_METRICS_PORT: a worker that writes to the shared folder serves no /metrics of its own.
    env.update({"NER_TRITON_URL": triton_url, "NER_PORT": str(port), "NER_WORKERS": "1",
                MULTIPROC_ENV: str(metrics_dir)})
    return env


class Workers:
    """The supervisor: Triton, N worker processes and the summed /metrics."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.port = settings.port or free_port()  # 0 would give each worker a port of its own
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="ner-metrics-"))
        self.metrics_port: int | None = None
        self.triton: EmbeddedTriton | None = None
        self._processes: dict[int, asyncio.subprocess.Process] = {}  # worker index -> process
        self._stopping = False
        self._metrics_server: object | None = None

    async def run(self, stop: asyncio.Event, hurry: asyncio.Event) -> None:
        s = self.settings
        try:
            if s.triton_url is None:
                self.triton = EmbeddedTriton(
                    s.model_repository, ready_timeout_s=s.triton_ready_timeout_s, log_verbose=s.triton_log_verbose,
                    ports=TritonPorts(s.triton_grpc_port, s.triton_http_port, s.triton_metrics_port))
                await self.triton.start()
            triton_url = s.triton_url or self.triton.grpc_url  # type: ignore[union-attr]
            self._serve_metrics()
            env = worker_environment(s, triton_url, self.port, self.metrics_dir)
            keepers = [asyncio.create_task(self._keep(index, env), name=f"worker-{index}")
                       for index in range(s.workers)]
            LOGGER.info("ner-gateway: %d workers on %s:%d (Triton %s)", s.workers, s.host, self.port, triton_url)
            stopped = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([stopped, *keepers], return_when=asyncio.FIRST_COMPLETED)
            if stopped not in done:  # a worker could not start: stop the others, report it
                stopped.cancel()
                self._stopping = True
                self._signal_all(signal.SIGTERM)
                await asyncio.gather(*keepers, return_exceptions=True)
                for keeper in done:
                    keeper.result()
            LOGGER.info("shutting down: SIGTERM to %d workers (each drains, then stops)", len(self._processes))
            self._stopping = True
            self._signal_all(signal.SIGTERM)
            hurried = asyncio.create_task(self._pass_on(hurry))
            await asyncio.gather(*keepers, return_exceptions=True)
            hurried.cancel()
        finally:
            self._stopping = True
            await self._kill_all()
            if self.triton is not None:
                await self.triton.stop()
            if self._metrics_server is not None:
                self._metrics_server.shutdown()  # type: ignore[attr-defined]
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
            LOGGER.info("ner-gateway stopped")

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def _keep(self, index: int, env: dict[str, str]) -> None:
        """Run worker ``index`` until shutdown; restart it when it dies before."""
        from prometheus_client import multiprocess

        while not self._stopping:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ner_gateway.cli", "serve", env={**env, "NER_WORKER_INDEX": str(index)})
            self._processes[index] = process
            started = asyncio.get_running_loop().time()
            code = await process.wait()
            multiprocess.mark_process_dead(process.pid, str(self.metrics_dir))  # its live gauges go
            if self.stopping:
                LOGGER.info("worker %d (pid %d) stopped (code %s)", index, process.pid, code)
                return
            if code == 1 and asyncio.get_running_loop().time() - started < STARTUP_FAILURE_S:
                raise WorkerFailed(f"worker {index} could not start (exit code 1; its error is above)")
            LOGGER.error("worker %d (pid %d) exited unexpectedly (code %s); restarting", index, process.pid, code)
            await asyncio.sleep(RESTART_BACKOFF_S)

    async def _pass_on(self, hurry: asyncio.Event) -> None:
        await hurry.wait()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, signum: int) -> None:
        for process in self._processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)

    async def _kill_all(self) -> None:
        """Workers still running when the supervisor ends (a failed start, a second shutdown path)."""
        self._signal_all(signal.SIGKILL)
        for process in self._processes.values():
            with contextlib.suppress(ProcessLookupError):
                await process.wait()

    def _serve_metrics(self) -> None:
        if self.settings.metrics_port is None:
            return
        from prometheus_client import CollectorRegistry, multiprocess, start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.metrics_dir))
        server, _ = start_http_server(self.settings.metrics_port, addr=self.settings.host, registry=registry)
        self._metrics_server = server
        self.metrics_port = int(server.server_address[1])
        LOGGER.info("metrics of all workers on http://%s:%d/metrics", self.settings.host, self.metrics_port)


async def serve_workers(settings: GatewaySettings) -> None:
    """Run the supervisor until SIGTERM/SIGINT (a second signal hurries the workers' drains)."""
    stop, hurry = shutdown_events()
    await Workers(settings).run(stop, hurry)
