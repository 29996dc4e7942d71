"""Start, watch and stop the embedded ``tritonserver`` shipped in the nvidia-pytriton wheel.

That build has only the Python backend. What it needs on a CPU machine (see shared/TRITON.md):
a backend directory holding the Python backend plus the stub for this interpreter's version,
the interpreter's libpython and the wheel's bundled libraries on LD_LIBRARY_PATH, and this
environment's ``bin`` first on PATH because the stub finds its Python through ``python3``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.util
import logging
import os
import secrets
import shutil
import signal
import sys
import sysconfig
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from ner_gateway.core.errors import ConfigurationError, TritonUnavailable
from ner_gateway.net import free_ports

LOGGER = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# Triton protocols the gateway never uses (it needs health, metadata, model-config and inference; statistics
# stay open: the metrics port serves the same numbers). Each needs ADMIN_KEY=<per-start random value>:
# over gRPC as the header ``triton-grpc-protocol-admin-key``, over HTTP as ``admin-key``.
RESTRICTED_PROTOCOLS = ("model-repository", "shared-memory", "trace", "logging")
ADMIN_KEY = "admin-key"
# How long the rest of a Triton process group may take to die after SIGKILL.
_GROUP_EXIT_S = 10.0


@dataclass(frozen=True)
class TritonPorts:
    """Embedded Triton's ports; each 0 means a free port for that one."""

    grpc: int
    http: int
    metrics: int

    def resolved(self) -> TritonPorts:
        given = (self.grpc, self.http, self.metrics)
        free = iter(free_ports(3))
        ports = [port or next(free) for port in given]
        while len(set(ports)) < len(ports):  # a given port that one of the free ones happens to equal
            ports = [port or next(iter(free_ports(1))) for port in given]
        return TritonPorts(*ports)


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(
            "the embedded Triton needs the nvidia-pytriton wheel: pip install 'triton-ner[triton]' "
            "(or pass --triton-url to use a running Triton)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_backend_dir(target: Path) -> Path:
    """Assemble ``target/python`` = Python backend + the stub matching this interpreter."""
    server_dir = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server_dir / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ConfigurationError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    python_dir = target / "python"
    shutil.copytree(server_dir / "backends" / "python", python_dir, dirs_exist_ok=True)
    shutil.copy2(stub, python_dir / stub.name)
    return target


def loadable_models(repository: Path) -> list[str]:
    """The repository's models this Triton can load: Python-backend ones (the ONNX targets).

    tensorrt_plan (and any other backend's) entries need NVIDIA's Triton on a GPU; they are not loaded,
    so the embedded server still starts and serves the rest (the gateway skips models not READY).
    """
    names = []
    for config_file in sorted(repository.glob("*/config.pbtxt")):
        name = config_file.parent.name
        try:
            config = text_format.Parse(config_file.read_text(), model_config_pb2.ModelConfig())
        except (OSError, text_format.ParseError) as e:
            LOGGER.warning("embedded Triton skips %s: unreadable config.pbtxt (%s)", name, e)
            continue
        if config.backend == "python":
            names.append(name)
        else:
            LOGGER.info("embedded Triton skips %s: %s needs NVIDIA's Triton (see deploy/README.md)", name,
                        config.platform or config.backend or "its backend")
    return names


def triton_environment() -> dict[str, str]:
    env = dict(os.environ)
    libs = [
        sysconfig.get_config_var("LIBDIR"),
        str(_pytriton_root().parent / "nvidia_pytriton.libs"),
        env.get("LD_LIBRARY_PATH", ""),
    ]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


class EmbeddedTriton:
    """One supervised tritonserver process on loopback ports; restarted if it dies."""

    def __init__(
        self,
        model_repository: Path,
        *,
        ports: TritonPorts | None = None,
        ready_timeout_s: float = 120.0,
        restart_backoff_s: float = 1.0,
        log_verbose: int = 0,
        trace_endpoint: str | None = None,
        on_state_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.model_repository = model_repository.resolve()
        self.ports = (ports or TritonPorts(0, 0, 0)).resolved()
        # Unique per instance: this server's Python-backend regions in /dev/shm, removed once it is gone.
        self.shm_prefix = f"ner_triton_{os.getpid()}_{secrets.token_hex(4)}_"
        self._admin_key = ""  # new at every start; in the command line only, never logged
        self.ready_timeout_s = ready_timeout_s
        self.restart_backoff_s = restart_backoff_s
        self.log_verbose = log_verbose
        self.trace_endpoint = trace_endpoint
        self.on_state_change = on_state_change or (lambda ready: None)
        self._process: asyncio.subprocess.Process | None = None
        self._backend_dir: Path | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def admin_headers(self) -> dict[str, str]:
        """gRPC headers that open the RESTRICTED_PROTOCOLS of the running server (the gateway sends none)."""
        return {f"triton-grpc-protocol-{ADMIN_KEY}": self._admin_key}

    def command(self) -> list[str]:
        """tritonserver's command line. It holds the admin key: never log it."""
        assert self._backend_dir is not None
        restricted = f"{','.join(RESTRICTED_PROTOCOLS)}:{ADMIN_KEY}={self._admin_key}"
        return [
            str(_pytriton_root() / "tritonserver" / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self._backend_dir}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.ports.grpc}",
            "--http-address=127.0.0.1", f"--http-port={self.ports.http}",
            "--metrics-address=127.0.0.1", f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            f"--grpc-restricted-protocol={restricted}", f"--http-restricted-api={restricted}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            "--exit-on-error=true",
            f"--log-verbose={self.log_verbose}",
            # Explicit control: load only what this CPU build can run (see loadable_models).
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in loadable_models(self.model_repository)),
            *self._trace_flags(),
        ]

    def _trace_flags(self) -> list[str]:
        """Triton's OpenTelemetry tracing: every request, OTLP/HTTP to the endpoint. Triton joins the caller's
        trace through the ``traceparent`` the gateway sends with each infer call."""
        if not self.trace_endpoint:
            return []
        return [
            "--trace-config=mode=opentelemetry",
            f"--trace-config=opentelemetry,url={self.trace_endpoint}",
            "--trace-config=opentelemetry,resource=service.name=triton",
            "--trace-config=rate=1",
            "--trace-config=level=TIMESTAMPS",
        ]

    async def start(self) -> None:
        """Start Triton and wait until it reports ready (all models loaded), then supervise it."""
        if self._backend_dir is None:
            self._backend_dir = prepare_backend_dir(Path(tempfile.mkdtemp(prefix="ner-triton-backends-")))
        await self._spawn_and_wait()
        self._supervisor = asyncio.create_task(self._supervise(), name="triton-supervisor")

    async def _spawn_and_wait(self) -> None:
        LOGGER.info("starting tritonserver (gRPC %s) on %s", self.grpc_url, self.model_repository)
        self._remove_shm()  # stale regions of a previous server of this instance, if any
        self._admin_key = secrets.token_hex(32)
        self._process = await asyncio.create_subprocess_exec(
            *self.command(), env=triton_environment(), start_new_session=True, preexec_fn=_die_with_parent,
        )
        try:
            await self._wait_ready()
        except BaseException:
            await self._terminate()
            raise
        LOGGER.info("tritonserver ready (pid %d)", self._process.pid)
        self.on_state_change(True)

    async def _wait_ready(self) -> None:
        url = f"http://127.0.0.1:{self.ports.http}/v2/health/ready"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout_s
        while loop.time() < deadline:
            assert self._process is not None
            if self._process.returncode is not None:
                raise TritonUnavailable(f"tritonserver exited with code {self._process.returncode} while starting")
            if await asyncio.to_thread(_http_ok, url):
                return
            await asyncio.sleep(0.2)
        raise TritonUnavailable(f"tritonserver not ready after {self.ready_timeout_s:.0f} s")

    @property
    def stopping(self) -> bool:
        return self._stopping

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self._process is not None
            code = await self._process.wait()
            if self.stopping:  # stop() ran while we waited
                return
            LOGGER.error("tritonserver exited unexpectedly (code %s); restarting", code)
            self.on_state_change(False)
            await self._end_group(self._process.pid)  # its Python-backend stubs may outlive it
            while not self._stopping:
                await asyncio.sleep(self.restart_backoff_s)
                try:
                    await self._spawn_and_wait()
                    break
                except TritonUnavailable as e:
                    LOGGER.error("restarting tritonserver failed: %s", e)

    async def stop(self) -> None:
        """SIGTERM Triton (it drains in-flight requests), SIGKILL its process group after a grace period, remove
        its shared-memory regions. Idempotent."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        await self._terminate()
        if self._backend_dir is not None:
            shutil.rmtree(self._backend_dir, ignore_errors=True)
            self._backend_dir = None

    async def _terminate(self, grace_s: float = 15.0) -> None:
        """SIGTERM Triton's process group (its stubs ignore SIGTERM: Triton stops them), then end the group."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            _signal_group(process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), grace_s)
            except TimeoutError:
                LOGGER.warning("tritonserver ignored SIGTERM for %.0f s; killing it", grace_s)
        await self._end_group(process.pid)

    async def _end_group(self, pgid: int) -> None:
        """SIGKILL what is left of a Triton's process group (started with its own session: pgid == its pid),
        wait until it is gone, then remove the server's shared-memory regions."""
        _signal_group(pgid, signal.SIGKILL)
        if self._process is not None and self._process.pid == pgid:
            await self._process.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _GROUP_EXIT_S
        while (left := group_members(pgid)) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if left:
            LOGGER.warning("processes %s of tritonserver's group %d survived SIGKILL", left, pgid)
        self._remove_shm()

    def _remove_shm(self) -> None:
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):
            with contextlib.suppress(OSError):
                region.unlink()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state not in {"Z", "X"}:
            members.append(int(stat.parent.name))
    return members


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _die_with_parent() -> None:
    """Linux: SIGTERM Triton if the gateway dies without stopping it (e.g. SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
