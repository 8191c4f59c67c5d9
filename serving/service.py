"""The data plane: loaded models and the one path every inference takes.

Protocol-free: the KServe and Classifier servicers convert protobuf to arrays and call
`infer_tensor` / `infer_images`; this module validates against the model, preprocesses images,
applies deadlines, feeds the batcher and accounts for the outcome (statistics and metrics).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from core.metadata import ModelMetadata
from serving.backends import Backend, open_backend
from serving.batcher import Batcher
from serving.errors import InvalidArgument, ModelNotFound, ServingError, Unavailable
from serving.metrics import ServerMetrics
from serving.preprocess import ImageError, ImagePreprocessor, PreprocessSpec
from serving.repository import ModelSource, resolve_metadata
from serving.stats import ModelStats
from serving.tracing import Tracing

log = logging.getLogger(__name__)
# KServe priority levels: 1 is the highest; a request without one (0) queues after all levels.
DEFAULT_PRIORITY = 1 << 31


@dataclass(frozen=True)
class InferInput:
    """A request's payload as the protocols deliver it: a preprocessed tensor or encoded images."""

    tensor: np.ndarray | None = None
    images: list[bytes] | None = None

    def __post_init__(self) -> None:
        if (self.tensor is None) == (self.images is None):
            raise ValueError("an InferInput holds a tensor or images, exactly one of them")


@dataclass
class LoadedModel:
    """One version of one model: its instances, batcher, preprocessing and statistics."""

    source: ModelSource
    backends: list[Backend]
    metadata: ModelMetadata
    batcher: Batcher
    preprocessor: ImagePreprocessor
    stats: ModelStats
    ready: bool = field(default=False)

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> str:
        return self.source.version

    @property
    def backend(self) -> Backend:
        return self.backends[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.metadata.input_size
        return (3, size, size)

    @property
    def num_classes(self) -> int:
        return self.metadata.num_classes

    @property
    def precision(self) -> str:
        """fp32, fp16 or int8 as the file's model card says; "unknown" for a file without our card."""
        card = self.backend.metadata
        return card.precision if card is not None else "unknown"

    @property
    def labels(self) -> list[str]:
        """One label per class: the model card's, or the class indices where it has none."""
        return [self.metadata.label(i) for i in range(self.num_classes)]


def load_model(
    source: ModelSource, metrics: ServerMetrics | None, preprocess_workers: int, max_image_pixels: int
) -> LoadedModel:
    """Open `instances` copies of the model and wire them to a batcher (not started yet)."""
    started = time.monotonic()
    config = source.config
    backends = [open_backend(source.path, config) for _ in range(config.instances)]
    metadata = resolve_metadata(backends[0], config)
    stats = ModelStats(source.name, source.version, metrics)
    batcher = Batcher(backends, config.batching, listener=stats)
    spec = PreprocessSpec.from_metadata(metadata, exif_transpose=config.exif_transpose)
    preprocessor = ImagePreprocessor(spec, max_workers=preprocess_workers, max_pixels=max_image_pixels)
    model = LoadedModel(source, backends, metadata, batcher, preprocessor, stats)
    if metrics:
        metrics.watch_queue(source.name, source.version, lambda: batcher.queued_images)
        metrics.model_info.labels(source.name, source.version, backends[0].name, model.precision).set(1)
    log.info(
        "loaded model",
        extra={
            "model": source.name,
            "version": source.version,
            "backend": backends[0].describe(),
            "instances": config.instances,
            "threads_per_instance": config.intra_op_threads(),
            "input_size": metadata.input_size,
            "classes": metadata.num_classes,
            "precision": model.precision,
            "seconds": round(time.monotonic() - started, 2),
        },
    )
    return model


class DataPlane:
    """Every model the server holds, by name and version; the newest version is the default."""

    def __init__(
        self,
        metrics: ServerMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        tracing: Tracing | None = None,
    ) -> None:
        self._models: dict[str, dict[str, LoadedModel]] = {}
        self.metrics = metrics
        self.clock = clock
        self.tracing = tracing or Tracing()
        self.accepting = False

    def add(self, model: LoadedModel) -> None:
        self._models.setdefault(model.name, {})[model.version] = model

    @property
    def models(self) -> list[LoadedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=int)

    def get(self, name: str, version: str = "") -> LoadedModel:
        """`name` empty means the only model, or the first by name; `version` empty the newest.

        Before start() and after drain() the answer is UNAVAILABLE, not NOT_FOUND: models may be
        loading (the port is bound first), and a retrying client must be told to come back.
        """
        if not self.accepting:
            raise Unavailable("the server is starting or shutting down; retry")
        if not name:
            if not self._models:
                raise ModelNotFound("(default)")
            name = self.names()[0]
        versions = self._models.get(name)
        if versions is None:
            raise ModelNotFound(name, known=self.names())
        if not version:
            version = self.versions(name)[-1]
        model = versions.get(version)
        if model is None:
            raise ModelNotFound(name, version, known=[f"{name} {v}" for v in self.versions(name)])
        return model

    @property
    def ready(self) -> bool:
        return self.accepting and all(m.ready for m in self.models)

    async def start(self) -> None:
        for model in self.models:
            await model.batcher.start()
            model.ready = True
        self.accepting = True

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work; let what was accepted finish within `grace_s`. True when all finished."""
        self.accepting = False
        for model in self.models:
            model.ready = False
        results = await asyncio.gather(*(m.batcher.close(grace_s) for m in self.models))
        return all(results)

    def close(self) -> None:
        for model in self.models:
            model.preprocessor.close()
            for backend in model.backends:
                backend.close()

    def deadline(self, model: LoadedModel, timeout_s: float | None) -> float | None:
        """Absolute `clock()` deadline from a relative timeout, else the model's default timeout."""
        if timeout_s is None:
            default_us = model.source.config.batching.default_timeout_us
            timeout_s = default_us / 1e6 if default_us else None
        return None if timeout_s is None else self.clock() + timeout_s

    async def infer(
        self, model: LoadedModel, payload: InferInput, deadline: float | None = None, priority: int = 0
    ) -> np.ndarray:
        """Logits (N, classes): a tensor is checked against the model's input, encoded images are
        decoded with the model's eval transform."""

        async def prepare() -> np.ndarray:
            with self.tracing.span("decode"):
                if payload.tensor is not None:
                    return self._check_tensor(model, payload.tensor)
                if not payload.images:
                    raise InvalidArgument("no images in the request")
                try:
                    return await model.preprocessor.preprocess_many(payload.images)
                except ImageError as exc:
                    raise InvalidArgument(str(exc)) from None

        return await self._run(model, prepare, deadline, priority)

    def _check_tensor(self, model: LoadedModel, batch: np.ndarray) -> np.ndarray:
        expected = [-1, *model.input_shape]
        if batch.ndim != 4 or tuple(batch.shape[1:]) != model.input_shape or batch.shape[0] < 1:
            raise InvalidArgument(
                f"model {model.name!r} input {model.backend.input.name!r}: expected shape {expected} "
                f"(N >= 1), got {list(batch.shape)}"
            )
        if batch.dtype not in (np.float32, np.float16):
            raise InvalidArgument(f"model {model.name!r}: expected FP32 or FP16 data, got {batch.dtype}")
        return batch.astype(model.backend.input.dtype, copy=False)

    async def _run(
        self,
        model: LoadedModel,
        prepare: Callable[[], Awaitable[np.ndarray]],
        deadline: float | None,
        priority: int,
    ) -> np.ndarray:
        if not self.accepting or not model.ready:
            raise Unavailable(f"model {model.name!r} is not accepting requests (server shutting down)")
        start = time.monotonic()
        code = "OK"
        in_flight = self.metrics.in_flight.labels(model.name, model.version) if self.metrics else None
        if in_flight:
            in_flight.inc()
        try:
            batch = await prepare()
            return await model.batcher.submit(
                batch, deadline, priority or DEFAULT_PRIORITY, self.tracing.on_run()
            )
        except ServingError as exc:
            code = exc.code
            raise
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            if in_flight:
                in_flight.dec()
            model.stats.request_done(code, time.monotonic() - start)
