"""The gateway's one settings object. Precedence: CLI flag > NER_* environment > .env file > default."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="NER_", env_file=".env", extra="forbid", use_attribute_docstrings=True
    )

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
    triton_ready_timeout_s: float = Field(120.0, gt=0)
    """How long to wait at startup for Triton and its models to become ready."""
    health_check_interval_s: float = Field(1.0, gt=0)
    """How often Triton's readiness is polled to drive the gRPC health status."""
    shutdown_grace_s: float = Field(5.0, ge=0)
    """How long in-flight RPCs may finish after SIGTERM."""
    triton_grpc_port: int = Field(0, ge=0, le=65535)
    """Embedded Triton's gRPC port (0 = free port)."""
    triton_http_port: int = Field(0, ge=0, le=65535)
    """Embedded Triton's HTTP port (0 = free port)."""
    triton_metrics_port: int = Field(0, ge=0, le=65535)
    """Embedded Triton's metrics port (0 = free port)."""
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
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
