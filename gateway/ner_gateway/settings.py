"""The gateway's one settings object. Precedence: CLI flag > NER_* environment > .env file > default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NER_", env_file=".env", extra="forbid", use_attribute_docstrings=True
    )

    workers: int = Field(1, ge=1)
    """Gateway processes serving ``port`` in front of one Triton (SO_REUSEPORT): one process serves about one
    core's worth of gRPC, tokenizing and decoding. On a GPU host, about one per core left after Triton; on a
    CPU host, where the model needs the cores too, 1 (docs/sizing.md). /metrics sums them."""
    host: str = "127.0.0.1"
    """Address the gRPC server binds (0.0.0.0 in a container)."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free one (logged at startup)."""
    model_repository: Path = Path("model_repository")
    """Triton model repository built by ner-builder; the gateway reads manifests and tokenizers from it."""
    triton_url: str | None = None
    """Running Triton(s), gRPC: ``host:port``, a comma-separated list, and/or ``dns:///name:port`` (every address
    of a headless Service, re-resolved). Balanced over the ready ones. Unset: start and supervise the embedded
    tritonserver."""
    default_model: str | None = None
    """Model used when a request names none. Unset: the only model, or the first by name."""
    max_texts_per_request: int = Field(64, ge=1)
    """Most texts in one RecognizeRequest."""
    max_text_chars: int = Field(100_000, ge=1)
    """Most characters (code points) in one text; longer-than-model texts are split into windows."""
    max_request_chars: int = Field(400_000, ge=1)
    """Most characters in all texts of one request together."""
    window_stride: int | None = Field(None, ge=0)
    """Tokens shared by consecutive windows of a long text (0 <= stride < max length - special tokens).
    Unset: a quarter of the window."""
    default_timeout_s: float = Field(30.0, gt=0)
    """Deadline for requests whose client set none."""
    cpu_offload_chars: int = Field(2000, ge=0)
    """Requests whose texts hold at least this many characters in all are tokenized and decoded in a worker
    thread, so that the event loop goes on serving other RPCs meanwhile; smaller ones (a tweet: ~0.8 ms of
    both) stay on the loop, where the thread hop would cost more than it frees. 0: every request."""
    cpu_offload_threads: int = Field(2, ge=1)
    """Worker threads for those large requests (tokenizing runs in Rust without Python's lock)."""
    max_inflight_requests: int = Field(256, ge=1)
    """Most requests (RPCs of NerService and messages of its streams) served at once; past it a call is refused
    at once with RESOURCE_EXHAUSTED and a retry hint (``grpc-retry-pushback-ms``) instead of queueing."""
    max_inflight_windows: int = Field(2048, ge=1)
    """Most model inputs (windows) of all requests being served; past it, RESOURCE_EXHAUSTED likewise. A single
    request larger than this is still served when it is the only one."""
    retry_after_ms: int = Field(200, ge=0)
    """The retry hint sent with RESOURCE_EXHAUSTED."""
    triton_inflight_tokens: int = Field(8192, ge=1)
    """Most padded tokens the gateway has in Triton at once, per model; further calls wait in the gateway, in
    fair order, where deadlines and cancellation apply before any work is done. Big enough for Triton's
    dynamic batcher to form full batches of sentences (32 x ~40 tokens per instance)."""
    request_inflight_tokens: int = Field(2048, ge=1)
    """Most padded tokens one request has in Triton at once: a long document runs one bounded share after
    another and leaves the rest of each call, and Triton's other instances, to everyone else (4 windows of 512)."""
    triton_calls_in_flight: int | None = Field(None, ge=1)
    """Calls the gateway has in flight per model. Windows of all requests wait in the gateway's queue while they
    are, and leave together in the next call (up to max_batch_size rows and triton_inflight_tokens / calls in
    flight padded tokens each). Unset: the model's instance count in Triton (instance_group), so every instance
    has a call to run."""
    triton_overlap_rows: int | None = Field(None, ge=1)
    """Rows that must be queued before the gateway starts a call of a model beside one already in flight (the first
    call always leaves at once), unless they have waited triton_overlap_wait_ms. Unset: the smallest of the model's
    preferred_batch_size in Triton (dynamic_batching), else 1 (start calls whenever there is room). Fuller calls
    cost the gateway, Triton's frontend and its stubs less per sentence."""
    triton_overlap_wait_ms: float = Field(5.0, ge=0)
    """The longest queued rows wait for a fuller call (triton_overlap_rows) beside one in flight: a few times a
    call's fixed cost (gateway, Triton's frontend and a Python stub: ~1.5 ms of CPU here), so that a cheap model's
    rows mostly wait for the call in flight to end and an expensive model's idle instance is not left waiting long.
    Of 2, 5 and 10 ms, 5 served both the near-free and the demo model best on 2 CPU cores (bench/results)."""
    triton_cancel_calls: bool = False
    """Cancel a Triton call once none of its requests still wants it (their deadlines passed, their clients went).
    Off: such a call runs to its end and its answer is dropped, and a call's gRPC timeout is the latest deadline of
    its requests plus a grace, so the gateway never cancels a Triton call. Triton's gRPC frontend before 2.56
    (NGC 25.04) can crash on a cancelled call (a race fixed by triton-inference-server/server PRs 7840 and 8078;
    seen here under a flood of short deadlines with the embedded 2.51): turn it on with Triton 2.56 or later."""
    triton_ready_timeout_s: float = Field(120.0, gt=0)
    """How long to wait at startup for Triton and its models to become ready."""
    health_check_interval_s: float = Field(1.0, gt=0)
    """How often Triton's readiness is polled to drive the gRPC health status."""
    shutdown_drain_s: float = Field(5.0, ge=0)
    """After SIGTERM, how long the gateway reports NOT_SERVING yet goes on serving every call normally, so that
    load balancers take it out before it stops accepting: at least the readiness probe's periodSeconds times its
    failureThreshold (Kubernetes), or the health-checking client's interval. A second SIGTERM/SIGINT ends the
    drain early. 0: stop accepting at once."""
    shutdown_grace_s: float = Field(30.0, ge=0)
    """After the drain, how long RPCs already in flight may finish while no new ones are accepted; the rest are
    cancelled. As long as the default deadline (default_timeout_s), so that a call sent just before the drain
    ended completes. Then Triton is stopped: terminationGracePeriodSeconds must cover drain + grace + Triton's
    stop (embedded: up to 15 s)."""
    triton_grpc_port: int = Field(0, ge=0, le=65535)
    """Embedded Triton's gRPC port (0 = free port). Each port setting applies on its own; with ``triton_url`` (a
    remote Triton) setting one is refused."""
    triton_http_port: int = Field(0, ge=0, le=65535)
    """Embedded Triton's HTTP port (0 = free port)."""
    triton_metrics_port: int = Field(0, ge=0, le=65535)
    """Embedded Triton's metrics port (0 = free port)."""

    @model_validator(mode="after")
    def _triton_ports_only_for_the_embedded_triton(self) -> GatewaySettings:
        if self.triton_url is not None:
            ports = {"NER_TRITON_GRPC_PORT": self.triton_grpc_port, "NER_TRITON_HTTP_PORT": self.triton_http_port,
                     "NER_TRITON_METRICS_PORT": self.triton_metrics_port}
            if set_ports := [name for name, port in ports.items() if port]:
                raise ValueError(f"{', '.join(set_ports)} set the embedded Triton's ports, but NER_TRITON_URL "
                                 "points at a running Triton: unset one or the other")
        return self

    triton_log_verbose: int = Field(0, ge=0)
    """Embedded Triton's --log-verbose level."""
    tensorrt_version: str | None = None
    """TensorRT version of the Triton that serves tensorrt_plan models (NVIDIA's container; e.g. 10.5.0.18, or
    a prefix such as 10.5). Set: engines built with another TensorRT (or with TensorRT-RTX) are refused at
    startup. Unset: not checked (Triton's API does not report it); such engines then fail to load in Triton
    and are skipped as not READY."""
    gpu_compute_capability: str | None = None
    """Compute capability of the serving GPU (e.g. 9.0 for H100/H200). Set: engines built for other GPUs are
    refused at startup. Unset: not checked."""
    metrics_port: int | None = Field(9464, ge=0, le=65535)
    """Port of the gateway's Prometheus /metrics endpoint (bound on ``host``; 0 = free port; unset = off)."""
    triton_trace_endpoint: str | None = None
    """OTLP/HTTP traces URL for the embedded Triton's own spans (e.g. http://collector:4318/v1/traces), used
    when tracing is enabled. Unset: derived from OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT when the gateway itself
    exports over http/protobuf; Triton only speaks OTLP/HTTP."""
    log_level: LogLevel = "INFO"
    """Lowest level of the gateway's log records that are written (to stderr)."""
    tls_cert_file: Path | None = None
    """Server certificate chain (PEM) for TLS; needs ``tls_key_file``. Re-read when it changes on disk, so a
    rotated certificate is served to new connections without a restart. Unset: plaintext (a WARNING unless
    ``host`` is a loopback address)."""
    tls_key_file: Path | None = None
    """Private key (PEM) of ``tls_cert_file``."""
    tls_client_ca_file: Path | None = None
    """CA bundle (PEM) for mutual TLS: clients must present a certificate signed by it, or the handshake
    fails. Needs ``tls_cert_file``. Unset: clients are not asked for a certificate."""
    rollout_policy_file: Path | None = None
    """YAML rollout policy (e.g. a mounted ConfigMap): per model, the stable version, a canary with the share of the
    calls naming no version it answers, a shadow with the share of the stable version's calls mirrored to it
    (docs/operations.md). Re-read when it changes; a bad file keeps the last good policy, with a WARNING. Unset:
    each model's highest version ready is stable. Versions loaded in Triton while the gateway runs are picked up
    either way (checked first), and serve calls that pin them."""
    shadow_max_inflight: int = Field(4, ge=0)
    """Most shadow (mirrored) calls at once. A mirrored call is refused (counted) past it, or while live calls hold
    half of the admission limits (max_inflight_requests, max_inflight_windows): shadow is the first work shed."""
    auth_tokens_file: Path | None = None
    """File of accepted bearer tokens, one per line (blank lines and ``#`` comments ignored), e.g. a mounted
    Kubernetes Secret; re-read when it changes, so tokens rotate without a restart. Set (or ``auth_tokens``):
    every RPC but health checks needs ``authorization: Bearer <token>``."""
    auth_tokens: SecretStr | None = None
    """Accepted bearer tokens, comma-separated (a Secret injected as an environment variable); added to those
    of ``auth_tokens_file``."""
    auth_exempt_reflection: bool = False
    """Serve gRPC reflection without a token (health checks never need one)."""

    @model_validator(mode="after")
    def _tls_files_go_together(self) -> GatewaySettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both NER_TLS_CERT_FILE and NER_TLS_KEY_FILE (or neither, for plaintext)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("NER_TLS_CLIENT_CA_FILE (mutual TLS) needs NER_TLS_CERT_FILE and NER_TLS_KEY_FILE")
        if self.auth_tokens is not None and not self.auth_tokens.get_secret_value().strip(" ,"):
            raise ValueError("NER_AUTH_TOKENS is set but holds no token")
        return self
