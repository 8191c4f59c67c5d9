"""The data plane: loaded models and the one path every inference takes.

Protocol-free: the KServe and Classifier servicers convert protobuf to arrays and call
`DataPlane.infer`; this module validates against the model, preprocesses images, applies
deadlines, feeds the batcher and accounts for the outcome (statistics and metrics). The
front-end processes (serving/workers/frontend.py) check and convert inputs with the same functions
before handing them over.

Accepted inputs: encoded images; FP32 or FP16 tensors (N, 3, S, S), already normalized; UINT8
pixel tensors, normalized here with the model's mean and std (a quarter of the FP32 bytes), in
NCHW (N, 3, S, S) or NHWC (N, S, S, 3) layout, told apart by their shape (a model with S = 3
would read both as NCHW).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from core.metadata import ModelMetadata
from serving.config import ModelConfig
from serving.engine.backends import Backend, TensorSpec, open_backend
from serving.engine.backends.instance import ModelInstance
from serving.engine.batcher import Batcher
from serving.engine.preprocess import ImageError, ImagePreprocessor, PreprocessSpec, normalize
from serving.engine.repository import ModelSource, resolve_metadata
from serving.engine.stats import ModelStats
from serving.engine.tracing import Tracing
from serving.errors import InvalidArgument, ModelNotFound, ServingError, Unavailable
from serving.metrics import ServerMetrics

log = logging.getLogger(__name__)
# KServe priority levels: 1 is the highest; a request without one (0) queues after every level a
# client can send (a uint64 parameter), so no priority it names ranks below "no priority".
DEFAULT_PRIORITY = 1 << 64


@dataclass(frozen=True)
class InferInput:
    """A request's payload as the protocols deliver it: a preprocessed tensor or encoded images."""

    tensor: np.ndarray | None = None
    images: list[bytes] | None = None

    def __post_init__(self) -> None:
        if (self.tensor is None) == (self.images is None):
            raise ValueError("an InferInput holds a tensor or images, exactly one of them")

    @property
    def rows(self) -> int:
        return len(self.images) if self.images is not None else len(self.tensor)  # type: ignore[arg-type]


@dataclass(frozen=True)
class ModelView:
    """What a front end must know of a served model: names, specs, labels, its transform.

    Small and picklable: the model owner sends it to front-end processes, which check and
    convert requests with it and never touch the model itself.
    """

    name: str
    version: str
    slot: int  # the owner's number for this loaded model: what a front end's records name
    input: TensorSpec
    output: TensorSpec
    labels: list[str]
    spec: PreprocessSpec
    max_image_pixels: int
    default_timeout_us: int
    max_queue_size: int

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class ServedModel(Protocol):
    """What the inference RPCs read of a model: a LoadedModel, or a front end's ModelView."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def input(self) -> TensorSpec: ...
    @property
    def output(self) -> TensorSpec: ...
    @property
    def labels(self) -> list[str]: ...


class InferencePlane(Protocol):
    """Where the inference RPCs send work: the DataPlane, or a front end's link to it."""

    tracing: Tracing

    def get(self, name: str, version: str = "") -> Any: ...

    def deadline(self, model: Any, timeout_s: float | None) -> float | None: ...

    async def infer(
        self, model: Any, payload: InferInput, deadline: float | None = None, priority: int = 0
    ) -> np.ndarray: ...


def _channels_last(batch: np.ndarray, size: int) -> bool:
    return batch.dtype == np.uint8 and batch.shape[1:] == (size, size, 3) and size != 3


def check_input(model: str, input: TensorSpec, size: int, payload: InferInput) -> int:
    """How many images `payload` holds, after checking it fits the model's input."""
    if payload.images is not None:
        if not payload.images:
            raise InvalidArgument("no images in the request")
        return len(payload.images)
    batch = payload.tensor
    assert batch is not None
    nchw = (3, size, size)
    shapes = [[-1, *nchw]] + ([[-1, size, size, 3]] if batch.dtype == np.uint8 else [])
    if batch.ndim != 4 or batch.shape[0] < 1 or (batch.shape[1:] != nchw and not _channels_last(batch, size)):
        expected = " or ".join(str(s) for s in shapes)
        raise InvalidArgument(
            f"model {model!r} input {input.name!r}: expected shape {expected} (N >= 1), "
            f"got {list(batch.shape)}"
        )
    if batch.dtype not in (np.float32, np.float16, np.uint8):
        raise InvalidArgument(f"model {model!r}: expected FP32, FP16 or UINT8 data, got {batch.dtype}")
    return int(batch.shape[0])


async def convert_input(
    payload: InferInput,
    preprocessor: ImagePreprocessor,
    dtype: np.dtype,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """A checked `payload` as the model's input (N, 3, S, S) of `dtype`: images decoded, UINT8
    normalized, floats cast. Written into `out` when given (a front end's shared slot);
    otherwise a float tensor of the right dtype passes through without a copy."""
    if payload.images is not None:
        try:
            return await preprocessor.preprocess_many(payload.images, out)
        except ImageError as exc:
            raise InvalidArgument(str(exc)) from None
    batch = payload.tensor
    assert batch is not None
    if batch.dtype != np.uint8:
        finite = np.isfinite(batch)
        if not finite.all():
            where = [int(i) for i in np.argwhere(~finite)[0]]
            raise InvalidArgument(
                f"the input holds NaN or infinite values (the first at index {where}); the model needs "
                "finite numbers"
            )
    if batch.dtype == np.uint8:
        size = preprocessor.spec.input_size
        target = np.empty((batch.shape[0], 3, size, size), dtype) if out is None else out
        return normalize(batch, preprocessor.spec, _channels_last(batch, size), target)
    if out is None:
        return batch.astype(dtype, copy=False)
    np.copyto(out, batch, casting="same_kind")
    return out


@dataclass
class LoadedModel:
    """One version of one model: its instances (in the batcher), preprocessing and statistics.

    `backend` is the first instance's, for what every instance shares (name, platform, tensor
    specs); only its own thread calls into it. `runtime` is what the runtime reported at load.
    """

    source: ModelSource
    backend: Backend
    metadata: ModelMetadata
    batcher: Batcher
    preprocessor: ImagePreprocessor
    stats: ModelStats
    runtime: dict[str, str] = field(default_factory=dict)
    warmup_s: float = 0.0
    ready: bool = field(default=False)
    # Images admitted and being decoded or converted, not queued yet: they count against the queue.
    preparing: int = field(default=0)
    active: int = field(default=0)  # requests accepted and not answered: what an unload waits for
    slot: int = field(default=-1)  # set by DataPlane.add

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def version(self) -> str:
        return self.source.version

    @property
    def input(self) -> TensorSpec:
        assert self.backend.input is not None
        return self.backend.input

    @property
    def output(self) -> TensorSpec:
        assert self.backend.output is not None
        return self.backend.output

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

    @functools.cached_property
    def labels(self) -> list[str]:
        """One label per class: the model card's, or the class indices where it has none. Built
        once: every answer reads it, and building 1,000 strings was 6% of the event loop's time."""
        return [self.metadata.label(i) for i in range(self.num_classes)]

    def view(self) -> ModelView:
        return ModelView(
            name=self.name,
            version=self.version,
            slot=self.slot,
            input=self.input,
            output=self.output,
            labels=self.labels,
            spec=self.preprocessor.spec,
            max_image_pixels=self.preprocessor.max_pixels,
            default_timeout_us=self.source.config.batching.default_timeout_us,
            max_queue_size=self.source.config.batching.max_queue_size,
        )


def load_model(
    source: ModelSource,
    metrics: ServerMetrics | None,
    preprocess_workers: int,
    max_image_pixels: int,
    max_request_pixels: int,
) -> LoadedModel:
    """Start `instances` copies of the model, each loading and warming up on its own thread, and
    wire them to a batcher (not started yet). Returns once every instance is warm."""
    started = time.monotonic()
    config = source.config
    warmups: dict[int, float] = {}  # instance -> seconds its warm-up took
    instances = [
        ModelInstance(_setup(source, i, warmups), f"{source.name}/{source.version}/instance-{i}")
        for i in range(config.instances)
    ]
    try:
        backends = [instance.ready.result() for instance in instances]  # all loaded and warm
        runtime = instances[0].submit(lambda backend: backend.runtime_options()).result()
    except BaseException:
        for instance in instances:
            instance.close()
        raise
    first = backends[0]
    metadata = resolve_metadata(first, config)
    warmup_s = max(warmups.values())  # the instances warm up side by side
    stats = ModelStats(source.name, source.version, metrics)
    batcher = Batcher(
        instances,
        config.batching,
        listener=stats,
        buckets=config.padded_buckets(),
        execution_timeout_s=config.execution_timeout_s,
    )
    spec = PreprocessSpec.from_metadata(metadata, exif_transpose=config.exif_transpose)
    preprocessor = ImagePreprocessor(spec, preprocess_workers, max_image_pixels, max_request_pixels)
    model = LoadedModel(source, first, metadata, batcher, preprocessor, stats, runtime, warmup_s)
    if metrics:
        metrics.watch_queue(source.name, source.version, lambda: batcher.queued_images, lambda: model.active)
        metrics.model_info.labels(source.name, source.version, first.name, model.precision).set(1)
        metrics.warmup_seconds.labels(source.name, source.version).set(warmup_s)
    log.info(
        "loaded model",
        extra={
            "model": source.name,
            "version": source.version,
            "backend": first.describe(),
            "instances": config.instances,
            "device_ids": [config.device_id(i) for i in range(config.instances)],
            "threads_per_instance": config.intra_op_threads(),
            "input_size": metadata.input_size,
            "classes": metadata.num_classes,
            "precision": model.precision,
            "batch_buckets": list(config.batching.buckets()),
            "padded": bool(config.padded_buckets()),
            "warmup_seconds": round(warmup_s, 2),
            "seconds": round(time.monotonic() - started, 2),
        },
    )
    return model


def _setup(source: ModelSource, index: int, warmups: dict[int, float]) -> Callable[[], Backend]:
    """What instance `index` (and any replacement of it) runs first on its own thread: open the
    model on its device, then run every batch bucket once (the first run of a shape allocates, and
    on a GPU searches for its convolution algorithms) so that no request pays for it."""
    config = source.config

    def setup() -> Backend:
        backend = open_backend(source.path, config, config.device_id(index), config.batching.buckets())
        try:
            started = time.monotonic()
            if config.warmup:
                _warm_up(backend, config)
            warmups[index] = time.monotonic() - started
        except BaseException:
            backend.close()
            raise
        log.debug("instance warm", extra={"model": source.name, "instance": index, "seconds": warmups[index]})
        return backend

    return setup


def _warm_up(backend: Backend, config: ModelConfig) -> None:
    size = resolve_metadata(backend, config).input_size
    sample = np.zeros((1, 3, size, size), np.float32)
    for rows in config.batching.buckets():
        backend.run([sample], rows)


M = TypeVar("M")


def resolve(
    models: Mapping[str, Mapping[str, M]], name: str, version: str, reasons: Mapping[str, str] | None = None
) -> M:
    """`name` empty means the only model, or the first by name; `version` empty the newest.
    `reasons` say why a name is not served (a failed load, an unload), for the NOT_FOUND error."""
    if not name:
        if not models:
            raise ModelNotFound("(default)", reason="no model is loaded")
        name = min(models)
    versions = models.get(name)
    if versions is None:
        raise ModelNotFound(name, known=sorted(models), reason=(reasons or {}).get(name, ""))
    if not version:
        version = max(versions, key=int)
    model = versions.get(version)
    if model is None:
        raise ModelNotFound(name, version, known=[f"{name} {v}" for v in sorted(versions, key=int)])
    return model


def deadline_after(now: float, timeout_s: float | None, default_timeout_us: int) -> float | None:
    """Absolute deadline from a relative timeout, else from the model's default (0: none)."""
    if timeout_s is None and default_timeout_us:
        timeout_s = default_timeout_us / 1e6
    return None if timeout_s is None else now + timeout_s


class DataPlane:
    """Every model version being served, by name and version; routes each request to one.

    The newest version served is a name's default. Which versions are served is decided by
    `serving.engine.control`, through `add` (a version starts taking requests), `remove` (it takes no
    new ones) and `retire` (what it accepted finishes, then it is closed). `infer` counts a
    request on its model before its first await; callers resolve the model with `get` and call
    `infer` without awaiting anything in between, so a model being retired knows every request
    it still has to answer.
    """

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
        self.running = 0  # inference requests in progress
        self.finished = 0  # inference requests answered so far, whatever the outcome
        # Why a model name is not served (a failed load, an unload): quoted by NOT_FOUND errors.
        self.reasons: dict[str, str] = {}
        # Every model ever added, by slot (front ends name models by slot): (name, version), so a
        # record for a version replaced since still reaches the version served under its name.
        self._slots = itertools.count()
        self._slot_keys: dict[int, tuple[str, str]] = {}
        self._routed: dict[int, LoadedModel] = {}  # the slots routed to as they are
        # Told True when every model served holds its intake (Batcher.on_hold), False when one
        # stops: the front ends' links are then left unread, or read again (`watch_intake`).
        self._on_intake: Callable[[bool], None] | None = None
        self._holding: set[Batcher] = set()
        self._intake_held = False

    async def add(self, model: LoadedModel) -> LoadedModel | None:
        """Start `model`'s batcher and route requests to it; the model it replaces, if any."""
        await model.batcher.start()
        model.batcher.on_hold = self._held if self._on_intake is not None else None
        model.ready = True
        model.slot = next(self._slots)
        self._slot_keys[model.slot] = (model.name, model.version)
        versions = self._models.setdefault(model.name, {})
        replaced = versions.get(model.version)
        versions[model.version] = model
        self._routed[model.slot] = model
        if replaced is not None:
            self._routed.pop(replaced.slot, None)
        self._held(model.batcher, False)  # a model with nothing queued: no hold
        return replaced

    def remove(self, model: LoadedModel) -> None:
        """Route no new request to `model`; what it already accepted goes on (see `retire`)."""
        self._routed.pop(model.slot, None)
        versions = self._models.get(model.name, {})
        if versions.get(model.version) is model:
            del versions[model.version]
            if not versions:
                del self._models[model.name]
        self._held(model.batcher, False)

    def watch_intake(self, on_intake: Callable[[bool], None]) -> None:
        """Call `on_intake(True)` while every model served waits for company that reading its
        requests now would not bring sooner, and `on_intake(False)` when one stops (whoever reads
        requests from elsewhere: the front ends' links). Only then do batchers report holds."""
        self._on_intake = on_intake
        for versions in self._models.values():
            for model in versions.values():
                model.batcher.on_hold = self._held

    def _held(self, batcher: Batcher, holding: bool) -> None:
        """Hold the intake while every model served waits for company that reading would not
        bring sooner; one that does not (idle, or a request came for it) ends the hold."""
        (self._holding.add if holding else self._holding.discard)(batcher)
        served = {model.batcher for model in self._routed.values()}
        held = bool(served) and served <= self._holding
        if held != self._intake_held:
            self._intake_held = held
            if self._on_intake is not None:
                self._on_intake(held)

    async def retire(self, model: LoadedModel, grace_s: float) -> bool:
        """Wait (up to `grace_s`) for `model`'s requests to finish, then close it; True when all did.

        Call after `remove`. The model stays ready meanwhile, so nothing it accepted fails.
        """
        drained = await self._finish(model, time.monotonic() + grace_s)
        if self.metrics and model.version not in self._models.get(model.name, {}):
            self.metrics.unwatch_queue(model.name, model.version)  # unless a reload took its place
        await asyncio.to_thread(self._close_model, model)
        return drained

    @staticmethod
    async def _finish(model: LoadedModel, deadline: float, poll_s: float = 0.01) -> bool:
        """Let every request `model` accepted end (by `deadline`), then stop its batcher.

        Requests still decoding their images reach the batcher after its queue looked empty, so
        they are waited for first; then the batcher runs what is queued at once (not after
        `max_queue_delay_us`) and stops. The model stays ready meanwhile.
        """
        while model.preparing and time.monotonic() < deadline:
            await asyncio.sleep(poll_s)
        closed = await model.batcher.close(max(0.0, deadline - time.monotonic()))
        while model.active and time.monotonic() < deadline:  # their answers being handed back
            await asyncio.sleep(poll_s)
        model.ready = False
        return closed and not model.active

    @property
    def models(self) -> list[LoadedModel]:
        return [m for versions in self._models.values() for m in versions.values()]

    def names(self) -> list[str]:
        return sorted(self._models)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=int)

    def get(self, name: str, version: str = "") -> LoadedModel:
        """`name` empty means the only model, or the first by name; `version` empty the newest.

        Before open() and after drain() the answer is UNAVAILABLE, not NOT_FOUND: models may be
        loading (the port is bound first), and a retrying client must be told to come back.
        """
        if not self.accepting:
            raise Unavailable("the server is starting or shutting down; retry")
        return resolve(self._models, name, version, self.reasons)

    def by_slot(self, slot: int) -> LoadedModel:
        """The model a front end's record names (see `get`), or the version that replaced it."""
        model = self._routed.get(slot)
        if model is not None and self.accepting:
            return model
        name, version = self._slot_keys.get(slot, ("", ""))
        if not name:
            raise Unavailable(f"no model was ever loaded in slot {slot}")
        return self.get(name, version)

    def model_ready(self, name: str, version: str = "") -> bool:
        """KServe ModelReady: False for a model that is not served (never loaded, failed, unloaded);
        UNAVAILABLE, as from `get`, while the server starts or drains: come back later."""
        try:
            return self.get(name, version).ready
        except ModelNotFound:
            return False

    @property
    def ready(self) -> bool:
        return self.accepting and all(m.ready for m in self.models)

    def open(self) -> None:
        """Take requests (the models loaded at start are in)."""
        self.accepting = True

    async def drain(self, grace_s: float) -> bool:
        """Refuse new work; let what was accepted finish within `grace_s`. True when all finished."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        results = await asyncio.gather(*(self._finish(m, deadline) for m in self.models))
        return all(results)

    def account(self, name: str, version: str, code: str, seconds: float) -> None:
        """Count a request that failed in a front-end process before it reached this plane."""
        model = self._models.get(name, {}).get(version)
        if model is not None:
            model.stats.request_done(code, seconds)

    def close(self) -> None:
        for model in self.models:
            self._close_model(model)
        self._models.clear()

    @staticmethod
    def _close_model(model: LoadedModel) -> None:
        model.preprocessor.close()
        for instance in model.batcher.runners:
            instance.close()  # on its own thread, after the batch it may still be computing

    def deadline(self, model: LoadedModel, timeout_s: float | None) -> float | None:
        """Absolute `clock()` deadline from a relative timeout, else the model's default timeout."""
        return deadline_after(self.clock(), timeout_s, model.source.config.batching.default_timeout_us)

    async def infer(
        self,
        model: LoadedModel,
        payload: InferInput,
        deadline: float | None = None,
        priority: int = 0,
        arrived: float | None = None,
    ) -> np.ndarray:
        """Logits (N, classes): a tensor is checked against the model's input, encoded images are
        decoded with the model's eval transform. `arrived` (time.monotonic()) is when a front-end
        process received the request, so its duration counts from there.

        The request is admitted to the queue before any decoding or conversion: its image count
        against `max_queue_size` and the images already queued or being prepared. So a flood of
        images costs a refusal, not their decoding, and the memory prepared requests hold stays
        bounded by the queue size.
        """

        async def prepare() -> np.ndarray:
            count = check_input(model.name, model.input, model.metadata.input_size, payload)
            model.batcher.admit(count, model.preparing)
            model.preparing += count
            try:
                with self.tracing.span("decode"):
                    return await convert_input(payload, model.preprocessor, model.input.dtype)
            finally:
                model.preparing -= count

        return await self._run(model, prepare, deadline, priority, arrived)

    def enqueue(
        self,
        model: LoadedModel,
        items: np.ndarray,
        deadline: float | None,
        priority: int,
        arrived: float,
        on_done: Callable[[Any, np.ndarray | None, BaseException | None], None],
        ref: Any,
    ) -> Any:
        """A request a front end already checked and converted (`items`, read in place), queued
        with no coroutine of its own: `on_done(ref, logits, error)` runs when it ends. The owner
        decides only what only it knows: whether the model takes requests and has queue room.
        Returns a handle for `withdraw`."""
        self._accepts(model)
        rows = len(items)
        model.batcher.admit(rows)
        if rows > model.batcher.config.max_batch_size:  # chunked: the awaited path handles that
            return asyncio.ensure_future(
                self._chunked(model, items, deadline, priority, arrived, on_done, ref)
            )
        self._begin(model)
        return model.batcher.put(
            items, deadline, priority or DEFAULT_PRIORITY, self._enqueued_done, (model, arrived, on_done, ref)
        )

    def _enqueued_done(self, task: Any, logits: np.ndarray | None, error: BaseException | None) -> None:
        model, arrived, on_done, ref = task.ref
        self._end(model, _code(error), arrived)
        on_done(ref, logits, error)

    async def _chunked(
        self,
        model: LoadedModel,
        items: np.ndarray,
        deadline: float | None,
        priority: int,
        arrived: float,
        on_done: Callable[[Any, np.ndarray | None, BaseException | None], None],
        ref: Any,
    ) -> None:
        async def prepare() -> np.ndarray:
            return items

        try:
            logits = await self._run(model, prepare, deadline, priority, arrived)
        except (Exception, asyncio.CancelledError) as exc:
            on_done(ref, None, exc)
        else:
            on_done(ref, logits, None)

    @staticmethod
    def withdraw(handle: Any, expired: bool) -> None:
        """The front end gave up on an `enqueue`d request: its deadline passed, or its caller left."""
        if isinstance(handle, asyncio.Future):  # chunked: it applies its deadline itself
            if not expired:
                handle.cancel()
        else:
            model: LoadedModel = handle.ref[0]
            model.batcher.withdraw(handle, expired)

    def _accepts(self, model: LoadedModel) -> None:
        if not self.accepting:
            raise Unavailable(f"model {model.name!r} is not accepting requests (server shutting down)")
        if not model.ready:
            raise Unavailable(f"model {model.name!r} version {model.version} was unloaded; retry")

    def _begin(self, model: LoadedModel) -> None:
        model.active += 1
        self.running += 1

    def _end(self, model: LoadedModel, code: str, start: float) -> None:
        self.running -= 1
        self.finished += 1
        model.active -= 1
        model.stats.request_done(code, time.monotonic() - start)

    async def _run(
        self,
        model: LoadedModel,
        prepare: Callable[[], Awaitable[np.ndarray]],
        deadline: float | None,
        priority: int,
        arrived: float | None = None,
    ) -> np.ndarray:
        self._accepts(model)
        start = time.monotonic() if arrived is None else arrived
        code = "OK"
        self._begin(model)
        try:
            batch = await prepare()
            return await model.batcher.submit(
                batch, deadline, priority or DEFAULT_PRIORITY, self.tracing.on_run()
            )
        except BaseException as exc:
            code = _code(exc)
            raise
        finally:
            self._end(model, code, start)


def _code(error: BaseException | None) -> str:
    """The status a request ended with, for statistics and metrics."""
    if error is None:
        return "OK"
    if isinstance(error, ServingError):
        return error.code
    return "CANCELLED" if isinstance(error, asyncio.CancelledError) else "INTERNAL"
