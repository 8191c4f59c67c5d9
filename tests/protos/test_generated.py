"""Generated code matches the `.proto` sources; the KServe subset matches Triton on the wire."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from google.protobuf.descriptor import Descriptor

from protos import classifier_pb2, grpc_service_pb2, health_pb2, model_config_pb2
from protos.generate import PROTO_DIR, generate


def test_committed_code_is_fresh(tmp_path: Path) -> None:
    fresh = generate(tmp_path)
    assert fresh, "protoc produced nothing"
    stale = [p.name for p in fresh if (PROTO_DIR / p.name).read_bytes() != p.read_bytes()]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_generated_imports_are_package_relative() -> None:
    text = (PROTO_DIR / "grpc_service_pb2.py").read_text()
    assert "from protos import model_config_pb2" in text
    assert classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name == "hrnet.v1.Classifier"


# tritonclient's generated modules register the same `inference.*` symbols as ours, and one
# protobuf descriptor pool refuses duplicates: its descriptors are read in a child process.
_DUMP_TRITON = """
import json
from tritonclient.grpc import model_config_pb2, service_pb2

def fields(d, prefix=""):
    out = {}
    name = prefix + d.name
    out[name] = {f.name: [f.number, f.type, f.is_repeated] for f in d.fields}
    for nested in d.nested_types:
        out.update(fields(nested, name + "."))
    return out

result = {"service": {m.name: [m.input_type.full_name, m.output_type.full_name]
                      for m in service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods}}
for module in (service_pb2, model_config_pb2):
    for d in module.DESCRIPTOR.message_types_by_name.values():
        result.update(fields(d))
print(json.dumps(result))
"""


def _fields(d: Descriptor, prefix: str = "") -> dict[str, dict[str, list]]:
    name = prefix + d.name
    out = {name: {f.name: [f.number, f.type, f.is_repeated] for f in d.fields}}
    for nested in d.nested_types:
        out.update(_fields(nested, name + "."))
    return out


# Ours alone, each under a number Triton leaves unused in that message, so its clients skip it.
NOT_IN_TRITON = {("ModelMetadataResponse.TensorMetadata", "parameters")}


def test_kserve_subset_is_wire_compatible_with_triton() -> None:
    proc = subprocess.run([sys.executable, "-c", _DUMP_TRITON], capture_output=True, text=True, check=True)
    triton = json.loads(proc.stdout)
    ours: dict[str, dict[str, list]] = {}
    for module in (grpc_service_pb2, model_config_pb2):
        for d in module.DESCRIPTOR.message_types_by_name.values():
            ours.update(_fields(d))
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in service.methods:
        assert triton["service"][method.name] == [method.input_type.full_name, method.output_type.full_name]
    for message, our_fields in ours.items():
        if message == "ModelMetadataResponse.TensorMetadata.ParametersEntry":
            continue  # the map entry of the field above
        assert message in triton, f"{message} is not a Triton message"
        for name, spec in our_fields.items():
            if (message, name) in NOT_IN_TRITON:
                assert name not in triton[message]
                assert spec[0] not in [number for number, _, _ in triton[message].values()]
                continue
            theirs = triton[message].get(name)
            assert theirs == spec, f"{message}.{name}: ours {spec}, Triton {theirs}"
    assert len(service.methods) == 16  # 9 core and stream RPCs, TraceSetting, 3 shared-memory, 3 repository


def test_health_messages_match_grpc_health_checking() -> None:
    """Ours travel as grpc.health.v1's: same fields, numbers, types and enum values."""
    from grpc_health.v1 import health_pb2 as standard

    for name in ("HealthCheckRequest", "HealthCheckResponse"):
        assert _fields(getattr(health_pb2, name).DESCRIPTOR) == _fields(getattr(standard, name).DESCRIPTOR)
    status = health_pb2.HealthCheckResponse.ServingStatus
    assert dict(status.items()) == dict(standard.HealthCheckResponse.ServingStatus.items())
