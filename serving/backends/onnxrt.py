"""ONNX models through onnxruntime: TensorRT -> CUDA -> CPU, threads set per instance."""

from __future__ import annotations

import numpy as np

from core.metadata import METADATA_KEY, ModelMetadata
from serving.backends.base import Backend, TensorSpec
from serving.errors import ModelLoadError

# Preference order per device; only the installed ones are used.
DEVICE_PROVIDERS = {
    "gpu": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "ascend": ("CANNExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}
ONNX_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


def choose_providers(wanted: tuple[str, ...], device: str, available: list[str]) -> list[str]:
    """Configured providers must all exist; otherwise the device's preference order, as installed."""
    if wanted:
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ModelLoadError(
                f"onnxruntime providers {missing} are not installed here; available: {', '.join(available)}"
            )
        return list(wanted)
    return [p for p in DEVICE_PROVIDERS[device] if p in available] or ["CPUExecutionProvider"]


def _shape(dims: list) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    suffixes = (".onnx",)
    platform = "onnxruntime_onnx"
    library = "onnxruntime"

    def load(self) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        # Each instance gets its share of the cores; instances run concurrently, so intra-op
        # pools must not overlap (throughput collapses when threads x instances > cores).
        options.intra_op_num_threads = self.config.intra_op_threads()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = choose_providers(self.config.providers, self.config.device, ort.get_available_providers())
        try:
            self._session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/NoSuchFile types
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or inputs[0].type not in ONNX_DTYPES:
            found = ", ".join(f"{i.name} {i.type} {i.shape}" for i in inputs)
            raise ModelLoadError(
                f"{self.path}: an image classifier needs one NCHW float input, found: {found}"
            )
        self.input = TensorSpec(inputs[0].name, _shape(inputs[0].shape), ONNX_DTYPES[inputs[0].type])
        out = outputs[0]
        self.output = TensorSpec(out.name, _shape(out.shape), ONNX_DTYPES.get(out.type, np.dtype(np.float32)))
        card = self._session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata = ModelMetadata.from_json(card) if card else None
        self.providers = self._session.get_providers()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        assert self.input is not None and self.output is not None
        feed = {self.input.name: batch.astype(self.input.dtype, copy=False)}
        return self._session.run([self.output.name], feed)[0]

    def close(self) -> None:
        self._session = None

    def describe(self) -> str:
        return f"{self.name} {self.path.name} providers={','.join(self.providers)}"
