"""Garbage on the wire, on a real gateway: a message that does not parse is INVALID_ARGUMENT with a short
message (never UNKNOWN, no traceback in the log), echoed input is cut short, and hypothesis-generated raw
bytes and field values only ever get documented status codes."""

from __future__ import annotations

import re
from collections.abc import Callable

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ner_gateway.pb.ner.v1 import ner_pb2

from conftest import TINY_MODEL, GatewayProcess, metric_sum, scrape

RECOGNIZE = "/ner.v1.NerService/Recognize"
NOT_A_REQUEST = "request is not a valid ner.v1.RecognizeRequest message"
# The codes ner.proto and the README document for a request's content; anything else (UNKNOWN, INTERNAL)
# means the gateway failed on a client's input.
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
GOOD = ner_pb2.RecognizeRequest(texts=["Angela Merkel visited Paris and Berlin."])

Call = Callable[..., bytes]


def tag(field: int, wire_type: int) -> bytes:
    return bytes([field << 3 | wire_type])


# RecognizeRequest: texts = 1, model = 2 (strings, wire type 2: length-delimited).
UNDECODABLE = {
    "invalid UTF-8 in texts": tag(1, 2) + b"\x02\xff\xfe",
    "invalid UTF-8 in model": GOOD.SerializeToString() + tag(2, 2) + b"\x03a\xc3\x28",
    "truncated message": GOOD.SerializeToString()[:-5],
    "length past the end": tag(1, 2) + b"\x7fParis",
    "random bytes": bytes.fromhex("d1 9c ff 07 3a 81 ee 42 0f 9b"),
    "invalid wire type": tag(1, 7) + b"\x01",
    "end-group without a group": tag(1, 4),
}


def status(call: Call, *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10)
    return info.value


@pytest.fixture(scope="module", autouse=True)
def new_log(gateway: GatewayProcess) -> Callable[[], str]:
    """The gateway's log since this module started (the gateway is shared with other modules)."""
    start = len(gateway.output())
    return lambda: gateway.output()[start:]


@pytest.fixture(scope="module")
def channel(gateway: GatewayProcess) -> grpc.Channel:
    return gateway.channel()


@pytest.fixture(scope="module")
def raw(channel: grpc.Channel) -> Call:
    """Recognize with bytes in and bytes out (no serializer on either side)."""
    return channel.unary_unary(RECOGNIZE, request_serializer=None, response_deserializer=None)


def entities(response: bytes) -> list[list[tuple[str, int, int]]]:
    documents = ner_pb2.RecognizeResponse.FromString(response).documents
    return [[(e.label, e.start, e.end) for e in document.entities] for document in documents]


@pytest.fixture(scope="module")
def baseline(raw: Call) -> list[list[tuple[str, int, int]]]:
    """What the good request gets before any garbage was sent."""
    return entities(raw(GOOD.SerializeToString(), timeout=10))


def metric(gateway: GatewayProcess, method: str, code: str) -> float:
    port = re.findall(r"metrics on http://[^:]+:(\d+)/metrics", gateway.output())[-1]
    return metric_sum(scrape(int(port)), "ner_requests_total", method=method, code=code)  # any model


@pytest.mark.parametrize("data", UNDECODABLE.values(), ids=UNDECODABLE.keys())
def test_undecodable_request_is_invalid_argument(gateway, raw, baseline, new_log, data: bytes) -> None:
    with pytest.raises(DecodeError):  # the test's own premise: these bytes do not parse
        ner_pb2.RecognizeRequest.FromString(data)
    before = metric(gateway, "Recognize", "INVALID_ARGUMENT")
    error = status(raw, data)
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, NOT_A_REQUEST)
    assert metric(gateway, "Recognize", "INVALID_ARGUMENT") == before + 1  # counted, by its real code
    assert entities(raw(GOOD.SerializeToString(), timeout=10)) == baseline  # still serving, same answer
    assert "Traceback" not in new_log()


def test_wrong_but_valid_wire_type_is_an_unknown_field(raw) -> None:
    """Field 1 as a varint is legal protobuf (an unknown field, skipped): the request parses, without texts."""
    error = status(raw, tag(1, 0) + b"\x01")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "at least one text" in error.details()


def test_every_method_rejects_undecodable_requests(channel, raw, baseline, new_log) -> None:
    garbage = UNDECODABLE["invalid wire type"]
    unary = {
        "/ner.v1.NerService/ListModels": "ner.v1.ListModelsRequest",
        "/grpc.health.v1.Health/Check": health_pb2.HealthCheckRequest.DESCRIPTOR.full_name,
    }
    for method, message in unary.items():
        error = status(channel.unary_unary(method, request_serializer=None, response_deserializer=None), garbage)
        assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                   f"request is not a valid {message} message"), method
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=None,
                                 response_deserializer=None)
    error = status(lambda data, timeout: list(watch(data, timeout=timeout)), garbage)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    reflect = channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                    request_serializer=None, response_deserializer=None)
    listing = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    responses = reflect(iter([listing, garbage]), timeout=10)
    assert reflection_pb2.ServerReflectionResponse.FromString(next(responses)).list_services_response.service
    error = status(lambda timeout: next(responses))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert entities(raw(GOOD.SerializeToString(), timeout=10)) == baseline
    assert "Traceback" not in new_log()


def test_stream_ends_with_invalid_argument_at_the_bad_message(gateway, channel, baseline, new_log) -> None:
    stream = channel.stream_stream("/ner.v1.NerService/RecognizeStream", request_serializer=None,
                                   response_deserializer=None)
    good = GOOD.SerializeToString()
    before = metric(gateway, "RecognizeStream", "INVALID_ARGUMENT")
    responses = stream(iter([good, good, UNDECODABLE["invalid UTF-8 in texts"], good]), timeout=10)
    assert [entities(next(responses)), entities(next(responses))] == [baseline, baseline]
    error = status(lambda timeout: next(responses))
    assert (error.code(), error.details()) == (grpc.StatusCode.INVALID_ARGUMENT, NOT_A_REQUEST)
    assert metric(gateway, "RecognizeStream", "INVALID_ARGUMENT") == before + 1
    assert "Traceback" not in new_log()


def test_long_model_name_is_not_found_with_the_name_cut_short(raw) -> None:
    name = "m" * 100_000
    error = status(raw, ner_pb2.RecognizeRequest(texts=["Paris"], model=name).SerializeToString())
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert "m" * 64 + "'… (100000 characters) not found" in error.details()
    assert TINY_MODEL in error.details() and len(error.details()) < 200


def test_message_over_the_receive_limit_is_resource_exhausted(raw, baseline) -> None:
    """gRPC's default 4 MiB receive limit refuses it before the gateway sees it (the request limits of
    the README come first for any request under it: 400,000 characters are at most 1.6 MB of UTF-8)."""
    error = status(raw, ner_pb2.RecognizeRequest(texts=["a" * 5_000_000]).SerializeToString())
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
    assert entities(raw(GOOD.SerializeToString(), timeout=10)) == baseline


# --- fuzzing ---------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outcome(raw: Call, data: bytes) -> tuple[grpc.StatusCode, str, bytes]:
    try:
        result = grpc.StatusCode.OK, "", raw(data, timeout=10)
    except grpc.RpcError as e:
        result = e.code(), e.details() or "", b""
    event(result[0].name)  # the mix of outcomes: pytest --hypothesis-show-statistics
    return result


@FUZZ
@given(data=st.one_of(st.binary(max_size=64), st.binary(max_size=16).map(lambda b: GOOD.SerializeToString() + b)))
def test_fuzz_raw_bytes_get_documented_codes(raw, data: bytes) -> None:
    code, details, _ = outcome(raw, data)
    assert code in DOCUMENTED, (code, details)
    assert len(details) < 300


TEXT = st.one_of(st.text(max_size=40), st.text(max_size=1500))  # any code point but surrogates, "" included
VALID = {
    "texts": st.lists(TEXT, min_size=1, max_size=4),
    "model": st.sampled_from(["", TINY_MODEL]),
    "aggregation": st.sampled_from(ner_pb2.AggregationStrategy.values()),
    "offset_unit": st.sampled_from(ner_pb2.OffsetUnit.values()),
}
INT32 = st.integers(-(2**31), 2**31 - 1)  # proto3 enums are open: any int32 arrives
ANYTHING = {
    "texts": st.one_of(st.just([]), st.lists(st.just("x"), min_size=64, max_size=66),
                       st.lists(TEXT, max_size=2).map(lambda texts: [*texts, "a" * 100_001])),
    "model": st.text(max_size=300),
    "aggregation": INT32,
    "offset_unit": INT32,
}


@st.composite
def requests(draw: st.DrawFn) -> ner_pb2.RecognizeRequest:
    """Every field valid but at most one, which is anything of its type (so that no error hides another and
    a fifth or more of the requests, arbitrary texts and all, go through the whole pipeline)."""
    wild = draw(st.sampled_from([None, *ANYTHING]))
    fields = {name: draw(ANYTHING[name] if name == wild else VALID[name]) for name in VALID}
    return ner_pb2.RecognizeRequest(**fields, request_id=draw(st.text(max_size=100)),
                                    constrained_decoding=draw(st.booleans()))


@FUZZ
@given(request=requests())
def test_fuzz_fields_get_documented_codes(raw, request: ner_pb2.RecognizeRequest) -> None:
    code, details, response = outcome(raw, request.SerializeToString())
    assert code in DOCUMENTED, (code, details)
    assert len(details) < 300
    if code == grpc.StatusCode.OK:
        result = ner_pb2.RecognizeResponse.FromString(response)
        assert len(result.documents) == len(request.texts)
        assert result.request_id == (request.request_id or result.request_id) and result.request_id


def test_still_serving_after_fuzzing(raw, baseline, new_log) -> None:
    assert entities(raw(GOOD.SerializeToString(), timeout=10)) == baseline
    assert "Traceback" not in new_log()
