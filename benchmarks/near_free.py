"""A near-free image classifier made on the fly: one 1x1 convolution whose stride is the image
size (it reads 3 numbers per image), then Flatten. What serves it measures the server, not the
model. Light on purpose (numpy and onnx only): `deploy/image_test.py` imports it beside
tritonclient, whose protobuf files clash with ours in one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.errors import CommandError

CLASSES = 10


def near_free_model(path: Path, size: int, classes: int = CLASSES) -> Path:
    """An NCHW FP32 classifier that costs next to nothing: Conv 1x1 with stride `size`, Flatten."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise CommandError(
            "hrnet bench overhead builds its model with the onnx package: pip install onnx"
        ) from None
    weights = np.random.default_rng(0).normal(0, 1, (classes, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input", "w"], ["c"], strides=[size, size]),
            helper.make_node("Flatten", ["c"], ["output"]),
        ],
        "near_free",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes])],
        initializer=[numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
