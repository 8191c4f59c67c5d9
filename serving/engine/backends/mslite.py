"""MINDIR models through MindSpore Lite (Ascend, GPU or CPU), the light runtime for serving.

`mindspore_lite` is imported in `load()` only. PyPI publishes it for few Python versions; where
it is missing, `backend: auto` falls back to the `mindspore` backend.
"""

from __future__ import annotations

import numpy as np

from core.metadata import read_sidecar
from serving.engine.backends.base import Backend, TensorSpec
from serving.errors import ModelLoadError

LITE_TARGETS = {"cpu": ["cpu"], "gpu": ["gpu", "cpu"], "ascend": ["ascend", "cpu"]}


class MindSporeLiteBackend(Backend):
    name = "mindspore_lite"
    suffixes = (".mindir",)
    platform = "mindspore_mindir"
    library = "mindspore_lite"

    def load(self) -> None:
        import mindspore_lite as mslite

        context = mslite.Context()
        context.target = LITE_TARGETS[self.config.device]
        context.cpu.thread_num = self.config.intra_op_threads()
        self._model = mslite.Model()
        try:
            self._model.build_from_file(str(self.path), mslite.ModelType.MINDIR, context)
        except Exception as exc:
            raise ModelLoadError(f"MindSpore Lite cannot load {self.path}: {exc}") from exc
        self._inputs = self._model.get_inputs()
        self.metadata = read_sidecar(self.path)
        shape = tuple(d if d > 0 else -1 for d in self._inputs[0].shape)
        self.input = TensorSpec(self._inputs[0].name, (-1, *shape[1:]), np.dtype(np.float32))
        classes = self.metadata.num_classes if self.metadata else -1
        self.output = TensorSpec("logits", (-1, classes), np.dtype(np.float32))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        # resize + predict need no lock: only this instance's own thread calls (base.py)
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if list(self._inputs[0].shape) != list(batch.shape):
            self._model.resize(self._inputs, [list(batch.shape)])
        self._inputs[0].set_data_from_numpy(batch)
        return self._model.predict(self._inputs)[0].get_data_to_numpy()
