"""The one small interface every backend implements, and the one rule for the thread that calls it.

A backend is one instance of one model file: `load()` once, then `run(parts, rows)` (or the plain
`infer(batch)`) per batch, then `close()`. It knows nothing of batching, queues or gRPC. Heavy
libraries are imported inside `load()`, so importing a backend module costs nothing.

**Each instance owns one thread for its whole life.** `load()`, the warm-up, every `run`/`infer`
and `close()` of one instance are called from that instance's own thread
(`serving.engine.backends.instance.ModelInstance`) and from no other, ever. Runtimes keep per-thread
state: onnxruntime's CUDA provider caches its cuDNN algorithm choice per (thread, shape), so a
shape that reached an instance from a new thread was searched again (seconds per shape on an
H100, the server's first bottleneck there). A backend may rely on the rule: it needs no lock of
its own, and may keep thread-bound resources (CUDA streams, bindings, buffers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from core.metadata import ModelMetadata
from serving.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output; -1 marks a dimension of any size (the batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def back_to_back(parts: Sequence[np.ndarray], rows: int) -> np.ndarray | None:
    """The parts (`rows` rows in all) as one array when they are C-contiguous views of one buffer,
    each starting where the one before ends; None otherwise. The span lies inside the buffer the
    parts share, which keeps it alive (it is their `base`)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    if first.base is None or not first.flags.c_contiguous:  # arrays of their own never abut
        return None
    base, item, end = first.base, first.shape[1:], first.ctypes.data + first.nbytes
    for part in parts[1:]:
        if (
            part.base is not base
            or part.dtype != first.dtype
            or part.shape[1:] != item
            or not part.flags.c_contiguous
            or part.ctypes.data != end
        ):
            return None
        end += part.nbytes
    return np.lib.stride_tricks.as_strided(first, (rows, *item), first.strides, writeable=False)


class Backend(ABC):
    """One backend module declares these four and `serving/engine/backends/__init__.py` lists it once."""

    name: ClassVar[str]  # as in config.yaml `backend:`
    suffixes: ClassVar[tuple[str, ...]]  # model file types it runs (`model<suffix>` in a repository)
    platform: ClassVar[str]  # as KServe ModelMetadata reports it
    library: ClassVar[str]  # the module `load()` imports; absent -> the backend is unavailable

    def __init__(
        self, path: Path, config: ModelConfig, device_id: int = 0, buckets: Sequence[int] = ()
    ) -> None:
        self.path = Path(path)
        self.config = config
        self.device_id = device_id  # the accelerator this instance runs on (ignored on cpu)
        self.buckets = tuple(buckets)  # the batch sizes it warms up with: their range for TensorRT's profile
        self.input: TensorSpec | None = None
        self.output: TensorSpec | None = None
        self.metadata: ModelMetadata | None = None  # the model card the file carries, if any
        self._batch: np.ndarray | None = None  # the reusable input buffer of `run`

    @abstractmethod
    def load(self) -> None:
        """Open the file; fill `input`, `output` and `metadata`. Raise on a missing or corrupt file."""

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) -> (N, classes) logits, a new array. Blocking."""

    def run(self, parts: Sequence[np.ndarray], rows: int) -> np.ndarray:
        """One batch as the batcher forms it: the requests' rows `parts`, padded to `rows`.

        The parts are copied by one vectorized call, converted to the input dtype on the way,
        into a buffer reused from batch to batch (wherever the parts lie: a front end's arena,
        a request's own array); zero rows fill it up to `rows`. The logits of the real rows come
        back as a new FP32 array (one copy out of the runtime's output), those of the padding
        rows are dropped.

        A batch that needs no padding and no conversion and whose parts lie back to back in one
        buffer (one request; or a front end's consecutive requests, whose blocks it places one
        after the other) is read where it lies, when the backend can (`_reads_in_place`):
        copying a 224x224 FP32 image into the buffer took 48 of the 130 us the owner's instance
        thread spent on each, onnxruntime's run of the near-free model 43 (docs/serving.md).
        """
        real = sum(len(p) for p in parts)
        if not parts or real > rows:
            raise ValueError(f"a batch of {real} rows cannot run as {rows}")
        span = back_to_back(parts, rows) if real == rows else None
        if span is not None and self._reads_in_place(span):
            return np.asarray(self.infer(span), dtype=np.float32)
        batch = self._buffer(rows, parts[0].shape[1:])
        np.concatenate(parts, out=batch[:real], casting="unsafe")
        batch[real:] = 0
        return np.array(self.compute(batch)[:real], dtype=np.float32)

    def _reads_in_place(self, part: np.ndarray) -> bool:
        """Whether `infer` can take `part` as it is, with no copy of ours: the input dtype, one
        contiguous block, and no page-locked buffer to fill for a device's DMA."""
        assert self.input is not None
        return part.dtype == self.input.dtype and part.flags.c_contiguous and not self.pins_input

    @property
    def pins_input(self) -> bool:
        """Whether the input buffer is page-locked memory a device copies from (see `allocate`)."""
        return False

    def compute(self, batch: np.ndarray) -> np.ndarray:
        """Logits for `batch`, a view of the buffer from `allocate`. May return a view of an output
        buffer that the next call overwrites (`run` copies what it keeps)."""
        return self.infer(batch)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """Host memory for the input buffer: plain here; page-locked where a GPU copies from it."""
        return np.empty(shape, dtype)

    def release(self, buffer: np.ndarray) -> None:  # noqa: B027 - plain memory needs nothing
        """Give back what `allocate` took beyond the array itself."""

    def _buffer(self, rows: int, item_shape: tuple[int, ...]) -> np.ndarray:
        """`rows` rows of the input buffer, grown (never shrunk) as larger batches come."""
        assert self.input is not None
        if self._batch is None or self._batch.shape[1:] != item_shape or len(self._batch) < rows:
            capacity = max(rows, self.config.batching.max_batch_size)
            if self._batch is not None:
                self.release(self._batch)
            self._batch = self.allocate((capacity, *item_shape), self.input.dtype)
        return self._batch[:rows]

    def runtime_options(self) -> dict[str, str]:
        """What the runtime really runs with (providers, their options), for ModelConfig."""
        return {}

    def close(self) -> None:
        """Release what `load()` acquired."""
        if self._batch is not None:
            self.release(self._batch)
            self._batch = None

    def describe(self) -> str:
        return f"{self.name} {self.path.name}"
