"""Finishing touches on the ONNX graph MindSpore writes: a modern opset, a symbolic batch, the model card.

MindSpore 2.10 writes opset 11 (IR 4). Tools our users run on the file expect more: onnxruntime's
static quantizer needs per-axis `DequantizeLinear` (opset 13), and TensorRT, Triton and timm's
own exports work at opset 17. So every export is converted with `onnx.version_converter` to
ONNX_OPSET, its IR version raised to match, and checked.

`mindspore.onnx.export(..., dynamic_axes=...)` marks the input's batch dimension symbolic but
still declares the output with the export batch, and any op whose constants were computed from
the export shape (MindSpore's `Resize` with a constant `sizes`, a `Reshape` to an explicit batch)
would make the graph fail at every other batch size. The network is written so that no such op
exists; this module proves it on each export with ONNX shape inference, which propagates a
baked batch through to the output, and refuses to write a file that would only work at one size.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import helper, version_converter

from core.metadata import METADATA_KEY, ModelMetadata

BATCH_DIM = "batch"
ONNX_OPSET = 17


class BakedBatchError(RuntimeError):
    """The exported graph fixes the batch size somewhere inside; the message names the op types."""


def _set_batch(value_info: onnx.ValueInfoProto, batch: int | None) -> None:
    dim = value_info.type.tensor_type.shape.dim[0]
    if batch is None:
        dim.dim_param = BATCH_DIM
    else:
        dim.dim_value = batch


def opset(model: onnx.ModelProto) -> int:
    """The version of the default (ai.onnx) operator set the graph uses."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph at ONNX_OPSET (never lowered), with the IR version that opset needs."""
    if opset(model) < ONNX_OPSET:
        model = version_converter.convert_version(model, ONNX_OPSET)
    model.ir_version = max(model.ir_version, helper.find_min_ir_version_for(list(model.opset_import)))
    return model


def attach_metadata(model: onnx.ModelProto, metadata: ModelMetadata) -> onnx.ModelProto:
    """Store the model card in `metadata_props` (replacing any) and describe the graph by it."""
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_KEY, value=metadata.to_json())
    model.producer_name = "hrnet"
    model.doc_string = (
        f"HRNet classifier {metadata.arch}, {metadata.num_classes} classes, {metadata.precision}"
    )
    return model


def finish_graph(model: onnx.ModelProto, metadata: ModelMetadata, batch: int | None) -> onnx.ModelProto:
    """Upgrade the opset, declare the batch on every graph input and output, attach the metadata, validate."""
    model = upgrade_opset(model)
    for value_info in [*model.graph.input, *model.graph.output]:
        _set_batch(value_info, batch)
    del model.graph.value_info[:]  # intermediate shapes recorded at the export batch; inference redoes them
    return check_graph(attach_metadata(model, metadata), batch)


def check_graph(model: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    """The ONNX checker, and for a dynamic export the proof that no op fixes the batch."""
    onnx.checker.check_model(model)
    if batch is None:
        _require_free_batch(model)
    return model


def _require_free_batch(model: onnx.ModelProto) -> None:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    baked = []
    for output in inferred.graph.output:
        dims = output.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            baked.append(f"{output.name} (batch fixed to {dims[0].dim_value})")
    if baked:
        suspects = sorted(
            {n.op_type for n in model.graph.node if n.op_type in ("Resize", "Reshape", "Expand")}
        )
        raise BakedBatchError(
            f"the exported ONNX graph fixes the batch size: {', '.join(baked)}; ops that can bake it: "
            f"{', '.join(suspects) or 'none found'}"
        )


def read_metadata(path: str | Path) -> ModelMetadata | None:
    """The model card stored in an ONNX file's metadata_props, or None when it has none."""
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return ModelMetadata.from_json(prop.value)
    return None
