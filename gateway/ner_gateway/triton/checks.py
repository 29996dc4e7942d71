"""Whether Triton serves a model as its manifest says: the version, the input and output tensors the gateway sends
and reads, a batch dimension; and how many calls it runs at once (its instances)."""

from __future__ import annotations

from typing import Any

from ner_gateway.artifact.manifest import ModelManifest
from ner_gateway.core.errors import ConfigurationError
from ner_gateway.core.ports import ServedModel


def served_model(manifest: ModelManifest, metadata: dict[str, Any], config: dict[str, Any]) -> ServedModel:
    """The model as Triton serves it, from its metadata and config (JSON); ConfigurationError on a mismatch."""
    name = manifest.name
    if manifest.version not in metadata.get("versions", []):
        raise ConfigurationError(
            f"Triton serves versions {metadata.get('versions')} of {name!r}, but the repository's "
            f"manifest describes version {manifest.version}"
        )
    inputs = {t["name"]: t for t in metadata.get("inputs", [])}
    for input_name in manifest.inputs:
        tensor = inputs.get(input_name)
        if tensor is None or tensor["datatype"] != "INT64" or len(tensor["shape"]) != 2:
            raise ConfigurationError(f"model {name!r}: Triton input {input_name!r} is {tensor}, "
                                     "expected INT64 [batch, sequence]")
    outputs = {t["name"]: t for t in metadata.get("outputs", [])}
    output = outputs.get(manifest.output)
    expected_shape = ["-1", "-1", str(len(manifest.labels))]
    if output is None or output["datatype"] != "FP32" or [str(d) for d in output["shape"]] != expected_shape:
        raise ConfigurationError(f"model {name!r}: Triton output {manifest.output!r} is {output}, "
                                 f"expected FP32 {expected_shape}")
    max_batch_size = int(config.get("max_batch_size", 0))
    if max_batch_size < 1:
        raise ConfigurationError(f"model {name!r} must be configured with max_batch_size >= 1")
    instances = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1
    preferred = [int(size) for size in config.get("dynamic_batching", {}).get("preferred_batch_size", [])]
    return ServedModel(name=name, version=manifest.version, max_batch_size=max_batch_size, instances=instances,
                       preferred_batch_size=min(min(preferred, default=1), max_batch_size))
