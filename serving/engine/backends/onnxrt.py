"""ONNX models through onnxruntime: TensorRT -> CUDA -> CPU, with provider options from config.

Batches run through an IOBinding on buffers the instance keeps: the input buffer the batcher
fills (page-locked on CUDA, so the copy to the GPU runs at full speed) and an output buffer of
the same rows. On CPU this costs nothing against `session.run` and saves its per-call output
allocation; on a GPU it is what lets the host->device copy be one fast DMA.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.metadata import METADATA_KEY, ModelMetadata
from serving.engine.backends.base import Backend, TensorSpec
from serving.errors import ModelLoadError

log = logging.getLogger(__name__)

# Preference order per device; only the installed ones are used.
DEVICE_PROVIDERS = {
    "gpu": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"),
    "ascend": ("CANNExecutionProvider", "CPUExecutionProvider"),
    "cpu": ("CPUExecutionProvider",),
}
ONNX_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}
# Providers that run on one of several accelerators and take `device_id`.
DEVICE_ID_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CANNExecutionProvider")
# Our defaults under the user's provider_options. CUDA: the cuDNN algorithm search is EXHAUSTIVE
# by default, 2-4 s per new input shape on an H100 for the same steady-state speed as HEURISTIC
# (1,591 vs 1,647 img/s at batch 64); NHWC kernels gave +18% at batch 64.
PROVIDER_DEFAULTS: dict[str, dict[str, str]] = {
    "CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC", "prefer_nhwc": "1"},
    "TensorrtExecutionProvider": {"trt_engine_cache_enable": "True", "trt_timing_cache_enable": "True"},
}
CUDA_RUNTIME_LIBRARIES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")


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


def tensorrt_cache_dir() -> Path:
    """Where TensorRT keeps built engines and timing data: building W48 takes minutes, once."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hrnet" / "tensorrt"


def provider_options(
    providers: Sequence[str],
    configured: dict[str, dict[str, str]],
    device_id: int,
    input_name: str,
    item_shape: tuple[int, ...],
    buckets: Sequence[int],
) -> list[dict[str, str]]:
    """Each provider's options: our defaults, then the configured ones, then this instance's device.

    TensorRT gets one shape profile spanning the batch buckets (min: the smallest, opt and max:
    the largest) when the item shape is fixed, so it builds one engine for every batch the
    batcher can send instead of one per new shape.
    """
    out = []
    for provider in providers:
        options = dict(PROVIDER_DEFAULTS.get(provider, {}))
        if provider == "TensorrtExecutionProvider":
            cache = str(tensorrt_cache_dir())
            options |= {"trt_engine_cache_path": cache, "trt_timing_cache_path": cache}
            if buckets and all(d > 0 for d in item_shape):
                dims = "x".join(map(str, item_shape))
                options |= {
                    "trt_profile_min_shapes": f"{input_name}:{min(buckets)}x{dims}",
                    "trt_profile_opt_shapes": f"{input_name}:{max(buckets)}x{dims}",
                    "trt_profile_max_shapes": f"{input_name}:{max(buckets)}x{dims}",
                }
        options |= configured.get(provider, {})
        if provider in DEVICE_ID_PROVIDERS:
            options["device_id"] = str(device_id)
        out.append(options)
    return out


def _shape(dims: list) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else -1 for d in dims)


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    suffixes = (".onnx",)
    platform = "onnxruntime_onnx"
    library = "onnxruntime"

    def load(self) -> None:
        import onnxruntime as ort

        self._bindings: dict[tuple[int, int], Any] = {}  # (input address, rows) -> IOBinding
        self._outputs: np.ndarray | None = None
        self._pinned: dict[int, Any] = {}  # address -> the CUDA runtime that registered it
        options = ort.SessionOptions()
        # Each instance gets its share of the cores; instances run concurrently, so intra-op
        # pools must not overlap (throughput collapses when threads x instances > cores).
        options.intra_op_num_threads = self.config.intra_op_threads()
        options.inter_op_num_threads = 1
        # Spinning threads would take the cores the front ends need (see ModelConfig.spin).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.config.spin else "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        unknown = sorted(set(self.config.provider_options) - set(ort.get_all_providers()))
        if unknown:
            raise ModelLoadError(
                f"provider_options names unknown onnxruntime providers {unknown}; "
                f"known: {', '.join(ort.get_all_providers())}"
            )
        providers = choose_providers(self.config.providers, self.config.device, ort.get_available_providers())
        inputs = self._probe_inputs(ort) if "TensorrtExecutionProvider" in providers else []
        item_shape = _shape(inputs[0].shape)[1:] if inputs else ()
        self.requested = dict(
            zip(
                providers,
                provider_options(
                    providers,
                    self.config.provider_options,
                    self.device_id,
                    inputs[0].name if inputs else "",
                    item_shape,
                    self.buckets,
                ),
                strict=True,
            )
        )
        try:
            self._session = ort.InferenceSession(
                str(self.path), options, providers=providers, provider_options=list(self.requested.values())
            )
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
        self._on_gpu = any(
            p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in self.providers
        )
        if self.config.device == "gpu" and not self._on_gpu:
            # onnxruntime falls back to the CPU quietly, and its own messages blame cuDNN or TensorRT.
            log.warning(
                "device gpu, but no GPU is usable here: %s serves on the CPU (providers %s; "
                "onnxruntime offers %s). Check nvidia-smi, the driver and onnxruntime-gpu's CUDA libraries",
                self.path.name,
                ",".join(self.providers),
                ",".join(ort.get_available_providers()),
            )

    def _probe_inputs(self, ort: Any) -> list:
        """The input's name and shape before the real session, for TensorRT's shape profile: a CPU
        session that only reads the graph (no optimization)."""
        probe_options = ort.SessionOptions()
        probe_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            probe = ort.InferenceSession(str(self.path), probe_options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime cannot load {self.path}: {exc}") from exc
        return probe.get_inputs()

    def infer(self, batch: np.ndarray) -> np.ndarray:
        assert self.input is not None and self.output is not None
        feed = {self.input.name: batch.astype(self.input.dtype, copy=False)}
        return self._session.run([self.output.name], feed)[0]

    def compute(self, batch: np.ndarray) -> np.ndarray:
        """Run the bound buffers: onnxruntime reads the input buffer where it is (on CUDA: one
        DMA from page-locked memory) and writes the logits into the output buffer."""
        assert self.input is not None and self.output is not None
        classes = self.output.shape[-1]
        if classes < 1:  # an output of unknown width cannot be bound ahead: plain run
            return self.infer(batch)
        rows = len(batch)
        if self._outputs is None or len(self._outputs) < rows:
            self._outputs = np.empty(
                (max(rows, self.config.batching.max_batch_size), classes), self.output.dtype
            )
            self._bindings.clear()
        key = (batch.ctypes.data, rows)
        binding = self._bindings.get(key)
        if binding is None:
            binding = self._session.io_binding()
            binding.bind_input(
                self.input.name, "cpu", 0, self.input.dtype, list(batch.shape), batch.ctypes.data
            )
            binding.bind_output(
                self.output.name, "cpu", 0, self.output.dtype, [rows, classes], self._outputs.ctypes.data
            )
            self._bindings[key] = binding
        self._session.run_with_iobinding(binding)
        return self._outputs[:rows]

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buffer = np.empty(shape, dtype)
        if self.pins_input:
            self._pin(buffer)
        return buffer

    def release(self, buffer: np.ndarray) -> None:
        self._bindings.clear()  # they point into the buffer
        cudart = self._pinned.pop(buffer.ctypes.data, None)
        if cudart is not None:
            cudart.cudaHostUnregister(ctypes.c_void_p(buffer.ctypes.data))

    def _pin(self, buffer: np.ndarray) -> None:
        """Page-lock `buffer` with the CUDA runtime onnxruntime already loaded (cudaHostRegister),
        so host->device copies are DMA at full bus speed instead of staged through a bounce
        buffer. Without it everything still works, slower, and the log says so."""
        for name in (ctypes.util.find_library("cudart"), *CUDA_RUNTIME_LIBRARIES):
            if not name:
                continue
            try:
                cudart = ctypes.CDLL(name)
            except OSError:
                continue
            status = cudart.cudaHostRegister(
                ctypes.c_void_p(buffer.ctypes.data), ctypes.c_size_t(buffer.nbytes), ctypes.c_uint(0)
            )
            if status == 0:
                self._pinned[buffer.ctypes.data] = cudart
                return
            log.warning("cudaHostRegister failed with CUDA error %d: the input buffer stays pageable", status)
            return
        log.warning("no CUDA runtime library found to page-lock the input buffer: it stays pageable")

    @property
    def pins_input(self) -> bool:
        return self._on_gpu

    @property
    def pinned(self) -> bool:
        """Whether the input buffer is page-locked (only ever on a GPU)."""
        return bool(self._pinned)

    def runtime_options(self) -> dict[str, str]:
        """The providers in use and each one's options as onnxruntime reports them (all of them,
        defaults included); a provider it dropped (not loadable here) is absent."""
        effective = self._session.get_provider_options()
        out = {"providers": ",".join(self.providers)}
        for provider in self.providers:
            options = effective.get(provider) or {}
            out[f"provider_options.{provider}"] = ",".join(f"{k}={v}" for k, v in sorted(options.items()))
        return out

    def close(self) -> None:
        super().close()
        self._bindings.clear()
        self._session = None

    def describe(self) -> str:
        return f"{self.name} {self.path.name} providers={','.join(self.providers)}"
