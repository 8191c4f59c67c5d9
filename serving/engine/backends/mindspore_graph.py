"""MINDIR models through MindSpore itself (`mindspore.load` + `nn.GraphCell`).

The fallback where MindSpore Lite is not installed (e.g. Python 3.11 on PyPI). MindSpore is
imported in `load()` only. Its graph executor is process-wide, so calls are serialized: extra
instances add no parallelism here, use onnxruntime for that.
"""

from __future__ import annotations

import threading

import numpy as np

from core.metadata import read_sidecar
from core.onednn import cap_onednn_isa
from serving.engine.backends.base import Backend, TensorSpec
from serving.errors import ModelLoadError

MS_TARGETS = {"cpu": "CPU", "gpu": "GPU", "ascend": "Ascend"}
_EXECUTOR_LOCK = threading.Lock()


class MindSporeBackend(Backend):
    name = "mindspore"
    suffixes = (".mindir",)
    platform = "mindspore_mindir"
    library = "mindspore"

    def load(self) -> None:
        cap_onednn_isa()  # before MindSpore's first convolution
        import mindspore as ms

        ms.set_device(MS_TARGETS[self.config.device])
        try:
            self._cell = ms.nn.GraphCell(ms.load(str(self.path)))
        except Exception as exc:
            raise ModelLoadError(f"MindSpore cannot load {self.path}: {exc}") from exc
        self._tensor = ms.Tensor
        self.metadata = read_sidecar(self.path)
        size = self.config.input_size or (self.metadata.input_size if self.metadata else 0)
        if not size:
            raise ModelLoadError(
                f"{self.path} has no sidecar {self.path.name}.json: set input_size in the model's config.yaml"
            )
        name = self.metadata.input_name if self.metadata else "image"
        self.input = TensorSpec(name, (-1, 3, size, size), np.dtype(np.float32))
        probe = self.infer(np.zeros((1, 3, size, size), np.float32))
        self.output = TensorSpec(
            self.metadata.output_name if self.metadata else "logits",
            (-1, probe.shape[1]),
            np.dtype(np.float32),
        )

    def infer(self, batch: np.ndarray) -> np.ndarray:
        with _EXECUTOR_LOCK:
            return self._cell(self._tensor(np.ascontiguousarray(batch, dtype=np.float32))).asnumpy()
