"""A minimal onnxruntime runtime for MLServer: what an MLServer user would write to serve our export.

MLServer loads this file itself (it is on the PYTHONPATH of the MLServer process, never imported
by our code); batching is MLServer's own adaptive batching, configured in model-settings.json.
The session gets the same threads as one instance of `hrnet serve` (all cores), so both servers
run the same onnxruntime with the same resources and differ only in what surrounds it.
"""

from __future__ import annotations

import os

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxImageClassifier(MLModel):
    async def load(self) -> bool:
        extra = (self.settings.parameters.extra or {}) if self.settings.parameters else {}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(extra.get("threads") or os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        cpu = ["CPUExecutionProvider"]
        providers = ["CUDAExecutionProvider", *cpu] if extra.get("device") == "gpu" else cpu
        self._session = ort.InferenceSession(await get_model_uri(self.settings), options, providers=providers)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        batch = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        logits = self._session.run([self._output], {self._input: batch})[0]
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(self._output, logits)],
        )
