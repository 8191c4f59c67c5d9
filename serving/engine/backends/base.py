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

import itertools
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np

from core.metadata import ModelMetadata
from serving.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output; -1 marks a dimension of any size (the batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


SMOOTHING = 0.1  # weight of the newest measurement in `run`'s running means


def _smoothed(mean: float | None, value: float) -> float:
    """The running mean with `value` in it; the first value (`mean` None) stands alone."""
    return value if mean is None else mean + SMOOTHING * (value - mean)


class Span(NamedTuple):
    """Parts of a batch that lie back to back in one buffer: `rows` as one array, and the parts'
    indices in the batch, in the order they lie."""

    rows: np.ndarray
    parts: tuple[int, ...]


def spans(parts: Sequence[np.ndarray]) -> list[Span]:
    """The parts grouped into runs that lie one after the other in memory, in address order.

    A front end places its consecutive requests' blocks back to back in its arena, so a batch of
    its requests is one span and a batch from two front ends two, however the requests
    interleaved on the way. Views of one buffer (their common `base`) only: an array of its own
    ends its span. A span of several parts is a view inside their buffer, which keeps it alive.
    Runs on the instance thread for every batch, holding the GIL the event loop wants: kept to
    a few attribute reads per part.
    """
    address = [p.ctypes.data for p in parts]
    order = sorted(range(len(parts)), key=address.__getitem__)
    runs: list[list[int]] = []
    first = parts[order[0]]
    joinable = False  # whether parts may join the current run: views of one buffer, contiguous
    end = -1
    for i in order:
        part = parts[i]
        if (
            joinable
            and address[i] == end
            and part.base is first.base
            and part.dtype == first.dtype
            and part.shape[1:] == first.shape[1:]
            and part.flags.c_contiguous
        ):
            runs[-1].append(i)
        else:
            runs.append([i])
            first = part
            joinable = part.base is not None and part.flags.c_contiguous
        end = address[i] + part.nbytes
    return [span for run in runs for span in _joined(parts, run, address[run[0]])]


def _joined(parts: Sequence[np.ndarray], run: list[int], address: int) -> list[Span]:
    """The parts of `run`, lying back to back from `address`, as one read-only view of their
    buffer: made with np.ndarray over the buffer's bytes, not with as_strided, on which
    onnxruntime ran the near-free model in 16 us against 9 (and which took 2.7 us to make
    against 0.7), per span of every batch. A buffer numpy cannot see as bytes leaves the
    parts apart."""
    head = parts[run[0]]
    if len(run) == 1:
        return [Span(head, (run[0],))]
    try:
        whole = np.frombuffer(head.base, np.uint8)
    except (TypeError, ValueError, BufferError):
        return [Span(parts[i], (i,)) for i in run]
    rows = sum(len(parts[i]) for i in run)
    view = np.ndarray((rows, *head.shape[1:]), head.dtype, buffer=whole, offset=address - whole.ctypes.data)
    view.flags.writeable = False
    return [Span(view, tuple(run))]


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
        self._call_s: float | None = None  # one runtime call's recent seconds (smoothed)
        self._copy_s_per_byte: float | None = None  # copying parts into the buffer (smoothed)

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

        A batch that needs no padding and no conversion is read where it lies when the backend
        can (`_reads_in_place`): each `span` of parts lying back to back (one request; a front
        end's consecutive requests) is one runtime call. One span always runs so. Several do
        when one more call costs less than the copy it saves: `_call_s` and `_copy_s_per_byte`
        are measured as batches run. With the near-free model a call cost about 25 us and
        copying a 224x224 FP32 image 50, so a batch from two front ends runs as two calls; with
        a real model one call of the whole batch costs far more than copying it, so it is copied.
        """
        real = sum(len(p) for p in parts)
        if not parts or real > rows:
            raise ValueError(f"a batch of {real} rows cannot run as {rows}")
        if real == rows:
            runs = spans(parts)
            if all(self._reads_in_place(span.rows) for span in runs) and (
                len(runs) == 1 or self._splitting_pays(len(runs), sum(p.nbytes for p in parts))
            ):
                return self._run_in_place(parts, runs, real)
        batch = self._buffer(rows, parts[0].shape[1:])
        started = time.perf_counter()
        np.concatenate(parts, out=batch[:real], casting="unsafe")
        batch[real:] = 0
        copied = time.perf_counter()
        logits = np.array(self.compute(batch)[:real], dtype=np.float32)
        self._copy_s_per_byte = _smoothed(self._copy_s_per_byte, (copied - started) / batch.nbytes)
        self._call_s = _smoothed(self._call_s, time.perf_counter() - copied)
        return logits

    def _splitting_pays(self, spans: int, nbytes: int) -> bool:
        """Whether `spans` - 1 more runtime calls cost less than copying `nbytes`, as measured
        (not yet measured: no)."""
        if self._call_s is None or self._copy_s_per_byte is None:
            return False
        return (spans - 1) * self._call_s < nbytes * self._copy_s_per_byte

    def _run_in_place(self, parts: Sequence[np.ndarray], runs: list[Span], real: int) -> np.ndarray:
        """One `infer` per span; the logits in the parts' batch order."""
        if len(runs) == 1 and runs[0].parts == tuple(range(len(parts))):
            started = time.perf_counter()
            logits = np.asarray(self.infer(runs[0].rows), dtype=np.float32)
            self._call_s = _smoothed(self._call_s, time.perf_counter() - started)
            return logits
        starts = list(itertools.accumulate((len(p) for p in parts), initial=0))
        out: np.ndarray | None = None
        for span in runs:
            started = time.perf_counter()
            logits = self.infer(span.rows)
            self._call_s = _smoothed(self._call_s, time.perf_counter() - started)
            if out is None:
                out = np.empty((real, *logits.shape[1:]), np.float32)
            row = 0
            for i in span.parts:
                n = len(parts[i])
                out[starts[i] : starts[i] + n] = logits[row : row + n]
                row += n
        assert out is not None
        return out

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
