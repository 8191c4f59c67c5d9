"""The v2 REST wire format <-> the protobuf messages gRPC carries, so one decoder (`codec`) serves both.

An inference request body is JSON, optionally followed by binary tensor data (Triton's binary
tensor extension): the `Inference-Header-Content-Length` header then gives the JSON's length,
and each input with the parameter `binary_data_size` takes that many bytes of the rest, in input
order (BYTES elements length-prefixed, as in gRPC's raw contents). Other inputs carry `data`, flat
or nested, row-major; BYTES data is strings, or base64 with the input parameter
`content_type: "base64"` (how an encoded image fits in a curl command line). Every input becomes
raw contents, so `codec` checks shapes, sizes and datatypes with the messages gRPC users get.

Outputs come back as JSON `data` unless binary is asked for: the output parameter
`binary_data: true`, or the request parameter `binary_data_output: true` (which an output's own
`binary_data: false` overrides); binary outputs follow the JSON, which the response's
`Inference-Header-Content-Length` header then delimits.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from protos import grpc_service_pb2 as pb
from serving.api.codec import DATATYPES, join_bytes_elements, split_bytes_elements
from serving.errors import InvalidArgument

HEADER_LENGTH = "Inference-Header-Content-Length"
INT64 = (-(1 << 63), (1 << 63) - 1)


@dataclass(frozen=True)
class RestInferRequest:
    """A decoded request: the protobuf message, and which outputs it wants in binary."""

    message: pb.ModelInferRequest
    binary_default: bool  # the request parameter binary_data_output
    binary: dict[str, bool]  # per requested output, its own binary_data

    def wants_binary(self, output: str) -> bool:
        return self.binary.get(output, self.binary_default)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {json.dumps(value)[:80]}")
    return value


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {json.dumps(value)[:80]}")
    return value


def _set_parameters(target: Any, values: dict[str, Any], what: str) -> None:
    """JSON parameters into a protobuf `map<string, InferParameter>`."""
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int) and INT64[0] <= value <= INT64[1]:
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        elif isinstance(value, str):
            target[key].string_param = value
        else:
            raise InvalidArgument(
                f"{what} parameter {key!r} must be a boolean, a 64-bit integer, a number or a string, "
                f"got {json.dumps(value)[:80]}"
            )


def _flatten(data: Any) -> Iterator[Any]:
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _json_tensor(data: Any, datatype: str, shape: list[int], parameters: dict[str, Any], what: str) -> bytes:
    """JSON `data` as the raw contents gRPC would carry (empty for a datatype `codec` refuses)."""
    count = math.prod(shape) if all(d >= 0 for d in shape) else None
    if datatype == "BYTES":
        items = list(_flatten(data))
        encoded = parameters.get("content_type") == "base64"
        elements = []
        for i, item in enumerate(items):
            if not isinstance(item, str):
                raise InvalidArgument(
                    f"{what}: BYTES data must be strings; element {i} is {json.dumps(item)[:40]}"
                )
            try:
                elements.append(base64.b64decode(item, validate=True) if encoded else item.encode())
            except binascii.Error as exc:
                raise InvalidArgument(f"{what}: element {i} is not base64 ({exc})") from None
        return join_bytes_elements(elements)
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        return b""  # codec names the datatypes it takes
    try:
        array = np.asarray(data, dtype=np.float64 if dtype.kind == "u" else dtype)
    except (ValueError, TypeError) as exc:
        raise InvalidArgument(
            f"{what}: data must be (nested lists of) numbers for {datatype}: {exc}"
        ) from None
    if count is not None and array.size != count:
        raise InvalidArgument(f"{what}: shape {shape} holds {count} values, got {array.size}")
    if dtype.kind == "u":  # checked before the cast, which would wrap 256 to 0 silently
        top = np.iinfo(dtype).max
        if array.size and (array.min() < 0 or array.max() > top or np.any(array != np.floor(array))):
            raise InvalidArgument(f"{what}: {datatype} values must be integers in 0..{top}")
        array = array.astype(dtype)
    return array.tobytes()


def decode_infer(body: bytes, header_length: str | None, model: str, version: str) -> RestInferRequest:
    """An inference request body (and its header-length header) as a ModelInferRequest."""
    json_end = len(body)
    if header_length is not None:
        try:
            json_end = int(header_length)
        except ValueError:
            json_end = -1
        if not 0 <= json_end <= len(body):
            raise InvalidArgument(
                f"{HEADER_LENGTH} {header_length!r} must be within 0..{len(body)} (the body's size)"
            )
    try:
        doc = _object(json.loads(body[:json_end]), "the request")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the request is not valid JSON: {exc}") from None
    binary = memoryview(body)[json_end:]
    message = pb.ModelInferRequest(
        model_name=model, model_version=version, id=_string(doc.get("id", ""), "id")
    )
    request_params = dict(_object(doc.get("parameters", {}), "parameters"))
    binary_default = request_params.pop("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise InvalidArgument(f"parameter 'binary_data_output' must be a boolean, got {binary_default!r}")
    _set_parameters(message.parameters, request_params, "request")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("the request needs 'inputs': a list of tensors")
    offset = 0
    for i, item in enumerate(inputs):
        item = _object(item, f"inputs[{i}]")
        name = _string(item.get("name"), f"inputs[{i}].name")
        what = f"input {name!r}"
        datatype = _string(item.get("datatype"), f"{what} datatype")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidArgument(f"{what}: shape must be a list of integers, got {json.dumps(shape)[:80]}")
        parameters = dict(_object(item.get("parameters", {}), f"{what} parameters"))
        size = parameters.pop("binary_data_size", None)
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        _set_parameters(tensor.parameters, parameters, what)
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise InvalidArgument(f"{what}: binary_data_size must be an integer >= 0, got {size!r}")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"{what}: binary_data_size {size} at byte {offset} overruns the {len(binary)} bytes "
                    f"after the JSON"
                )
            message.raw_input_contents.append(binary[offset : offset + size].tobytes())
            offset += size
        elif "data" in item:
            message.raw_input_contents.append(_json_tensor(item["data"], datatype, shape, parameters, what))
        else:
            raise InvalidArgument(f"{what}: give 'data' or the parameter 'binary_data_size'")
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes after the JSON belong to no input's binary_data_size"
        )
    binary_outputs = {}
    for i, item in enumerate(doc.get("outputs") or []):
        item = _object(item, f"outputs[{i}]")
        name = _string(item.get("name"), f"outputs[{i}].name")
        parameters = dict(_object(item.get("parameters", {}), f"output {name!r} parameters"))
        wants = parameters.pop("binary_data", None)
        if wants is not None:
            if not isinstance(wants, bool):
                raise InvalidArgument(f"output {name!r}: binary_data must be a boolean, got {wants!r}")
            binary_outputs[name] = wants
        _set_parameters(message.outputs.add(name=name).parameters, parameters, f"output {name!r}")
    return RestInferRequest(message, binary_default, binary_outputs)


def _json_values(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        return [item.decode("utf-8", "replace") for item in split_bytes_elements(raw, "output")]
    return np.frombuffer(raw, dtype=DATATYPES[datatype]).tolist()


def encode_infer(response: pb.ModelInferResponse, request: RestInferRequest) -> tuple[bytes, int | None]:
    """The response body, and the JSON's length when binary outputs follow it (else None)."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    outputs, chunks = [], []
    for output, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if request.wants_binary(output.name):
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_values(output.datatype, raw)
        outputs.append(entry)
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def to_json(message: Message) -> dict[str, Any]:
    """A protobuf answer as the REST API sends it: field names as in the .proto, zeros included,
    64-bit integers as numbers, InferParameter values plain (`"FP32"`, not `{"string_param": ...}`)."""
    data = json_format.MessageToDict(
        message,
        always_print_fields_with_no_presence=True,
        preserving_proto_field_name=True,
        unquote_int64_if_possible=True,
    )
    return _plain(message.DESCRIPTOR, data)


def _plain(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    for field in descriptor.fields:
        kind = field.message_type
        if kind is None or field.name not in data:
            continue
        if kind.GetOptions().map_entry:
            value_kind = kind.fields_by_name["value"].message_type
            if value_kind is not None:
                data[field.name] = {k: _one(value_kind, v) for k, v in data[field.name].items()}
        elif field.is_repeated:
            data[field.name] = [_one(kind, v) for v in data[field.name]]
        else:
            data[field.name] = _one(kind, data[field.name])
    return data


def _one(descriptor: Descriptor, data: dict[str, Any]) -> Any:
    if descriptor is pb.InferParameter.DESCRIPTOR:
        return next(iter(data.values()), None)
    return _plain(descriptor, data)
