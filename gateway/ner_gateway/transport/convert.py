"""Protobuf <-> domain conversion, in one place."""

from __future__ import annotations

from ner_gateway.artifact.manifest import Precision
from ner_gateway.artifact.schemes import TaggingScheme
from ner_gateway.core.domain import Aggregation, OffsetUnit, Recognition, RecognizeRequest
from ner_gateway.core.errors import InvalidRequest
from ner_gateway.core.registry import NerModel, ServedVersion
from ner_gateway.core.rollout import Role
from ner_gateway.pb.ner.v1 import ner_pb2

_AGGREGATIONS = {
    ner_pb2.AGGREGATION_STRATEGY_UNSPECIFIED: Aggregation.SIMPLE,
    ner_pb2.AGGREGATION_STRATEGY_NONE: Aggregation.NONE,
    ner_pb2.AGGREGATION_STRATEGY_SIMPLE: Aggregation.SIMPLE,
    ner_pb2.AGGREGATION_STRATEGY_FIRST: Aggregation.FIRST,
    ner_pb2.AGGREGATION_STRATEGY_AVERAGE: Aggregation.AVERAGE,
    ner_pb2.AGGREGATION_STRATEGY_MAX: Aggregation.MAX,
}
_OFFSET_UNITS = {
    ner_pb2.OFFSET_UNIT_UNSPECIFIED: OffsetUnit.CODE_POINT,
    ner_pb2.OFFSET_UNIT_CODE_POINT: OffsetUnit.CODE_POINT,
    ner_pb2.OFFSET_UNIT_UTF8_BYTE: OffsetUnit.UTF8_BYTE,
    ner_pb2.OFFSET_UNIT_UTF16_CODE_UNIT: OffsetUnit.UTF16_CODE_UNIT,
}
# The proto's enum values are named after the Python enums' members (TAGGING_SCHEME_BIO, PRECISION_FP32).
_SCHEMES: dict[TaggingScheme, ner_pb2.TaggingScheme] = {
    scheme: getattr(ner_pb2, f"TAGGING_SCHEME_{scheme.name}") for scheme in TaggingScheme}
_PRECISIONS: dict[Precision, ner_pb2.Precision] = {
    precision: getattr(ner_pb2, f"PRECISION_{precision.name}") for precision in Precision}
_ROLES: dict[Role, ner_pb2.VersionRole] = {role: getattr(ner_pb2, f"VERSION_ROLE_{role.name}") for role in Role}


def request_from_pb(message: ner_pb2.RecognizeRequest) -> RecognizeRequest:
    # proto3 enums are open: an unknown number arrives intact and must be rejected here.
    aggregation = _AGGREGATIONS.get(message.aggregation)
    if aggregation is None:
        raise InvalidRequest(f"unknown aggregation value {message.aggregation}")
    offset_unit = _OFFSET_UNITS.get(message.offset_unit)
    if offset_unit is None:
        raise InvalidRequest(f"unknown offset_unit value {message.offset_unit}")
    return RecognizeRequest(texts=list(message.texts), model=message.model, aggregation=aggregation,
                            offset_unit=offset_unit, request_id=message.request_id,
                            constrained=message.constrained_decoding, model_version=message.model_version)


def response_to_pb(result: Recognition) -> ner_pb2.RecognizeResponse:
    timings = result.timings
    response = ner_pb2.RecognizeResponse(
        model=result.model, model_version=result.model_version, request_id=result.request_id,
        timings=ner_pb2.StageTimings(tokenize_us=timings.tokenize_us, infer_us=timings.infer_us,
                                     decode_us=timings.decode_us),
    )
    # Built in place with add(): a message passed to a constructor or extend() is built, then copied (twice the
    # cost, ~1 us per entity, which a response of 32 tweets pays hundreds of times).
    for document in result.documents:
        add = response.documents.add(windows=document.windows).entities.add
        for e in document.entities:
            add(label=e.label, start=e.start, end=e.end, text=e.text, score=e.score)
    return response


def model_info_to_pb(model: NerModel, is_default: bool, versions: list[ServedVersion]) -> ner_pb2.ModelInfo:
    """``model``: the stable version; ``versions``: every served version (the registry's listing)."""
    manifest = model.manifest
    info = ner_pb2.ModelInfo(
        name=manifest.name, version=model.version, labels=manifest.labels,
        tagging_scheme=_SCHEMES[manifest.tagging_scheme], max_sequence_length=manifest.max_sequence_length,
        precision=_PRECISIONS[manifest.precision], is_default=is_default, ready=any(v.ready for v in versions),
    )
    for v in versions:
        info.versions.add(version=v.model.version, role=_ROLES[v.role], traffic_share=v.share, ready=v.ready,
                          precision=_PRECISIONS[v.model.manifest.precision], labels=v.model.manifest.labels)
    return info
