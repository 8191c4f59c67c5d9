"""A front-end process: gRPC parsing, tensor conversion and image decoding, beside its peers.

With `--workers N` (N > 1) the server is N of these on one port (SO_REUSEPORT: the kernel
spreads connections over them) plus the process that owns the models (serving/workers/supervisor.py).
A front end serves the inference RPCs itself: it decodes the request, checks it against the
model and converts or decodes the input straight into a block of its shared arena
(serving/workers/ipc.py), then hands the owner a fixed-size record naming the block, sent with the
others of the same loop turn in one write. The owner queues it on the model's batcher as it is
(checked once, here), so batching stays global per model, and writes the logits back into the
block. Every other RPC (health, readiness, metadata, config, statistics, shared-memory
registration) is forwarded to the owner over a private Unix socket: one process answers them,
so there is one truth about readiness and statistics. A front end follows the owner: it loads
its catalog of models and shared-memory regions from it, drains and stops when told, and
exits when the owner is gone. SIGINT and SIGTERM are the owner's to handle.

    python -m serving.workers.frontend --link FD --arena FD --index I   (started by the supervisor)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from core.scheduling import yield_on_wakeup
from protos import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2
from serving import event_loop
from serving.api import auth
from serving.api.classifier import ClassifierServicer
from serving.api.kserve import KServeInference
from serving.api.rpc import FLUSH_S, CallGuard, exit_now
from serving.config import EVENT_LOOPS, ServerConfig
from serving.engine.batcher import check_request_size
from serving.engine.preprocess import ImagePreprocessor
from serving.engine.service import InferInput, ModelView, check_input, convert_input, deadline_after, resolve
from serving.engine.shm import RegionInfo, SharedMemoryRegistry
from serving.engine.tracing import Tracing
from serving.errors import (
    InvalidArgument,
    Relayed,
    ResourceExhausted,
    ServingError,
    Unavailable,
)
from serving.logs import configure
from serving.memory import configure_allocator, trim_when_quiet
from serving.workers import ipc
from serving.workers.ipc import Allocator, Arena, Link, aligned, open_link

log = logging.getLogger(__name__)
KSERVE = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
CLASSIFIER = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
# Served here; everything else goes to the owner.
LOCAL = frozenset(
    f"/{service.full_name}/{name}"
    for service, names in (
        (KSERVE, ("ModelInfer", "ModelStreamInfer")),
        (CLASSIFIER, ("Classify", "ClassifyStream")),
    )
    for name in names
)
# Call metadata that belongs to the hop, not to the call: not forwarded.
HOP_HEADERS = frozenset({"user-agent", "content-type", "te", "host"})
NO_DEADLINE = float("nan")
LOGIT = np.dtype(np.float32)


@dataclass(frozen=True)
class Block:
    """A request's part of the arena: its model input, which the owner overwrites with the logits
    once its batch has read it. So consecutive requests' inputs lie back to back (the allocator
    places blocks in order) and a batch of them is read where it lies, with no copy."""

    offset: int
    nbytes: int


class FrontPlane:
    """The inference plane of a front end: requests in the arena, answers from the owner."""

    def __init__(self, link: Link, arena: Arena, decode_threads: int) -> None:
        self.link = link
        self.arena = arena
        self.allocator = Allocator(arena.size)
        self.decode_threads = decode_threads
        self.tracing = Tracing()  # off: spans would need the owner's half of each request
        self.accepting = False  # until the owner sends the models; never again once draining
        self._draining = False
        self._models: dict[str, dict[str, ModelView]] = {}
        self._preprocessors: dict[tuple[str, str], ImagePreprocessor] = {}
        # request id -> (its answer: None or (code, message), its block); freed on the answer
        self._pending: dict[int, tuple[asyncio.Future[tuple[str, str] | None], Block]] = {}
        self._ids = itertools.count()
        self.answered = 0  # requests the owner answered, for trimming the heap when quiet
        self._preparing = 0
        self._prepared = asyncio.Event()

    def set_models(self, views: list[ModelView]) -> None:
        models: dict[str, dict[str, ModelView]] = {}
        for view in views:
            models.setdefault(view.name, {})[view.version] = view
            if (view.name, view.version) not in self._preprocessors:
                self._preprocessors[view.name, view.version] = ImagePreprocessor(
                    view.spec, self.decode_threads, view.max_image_pixels
                )
        for key in set(self._preprocessors) - {(v.name, v.version) for v in views}:
            self._preprocessors.pop(key).close()
        self._models = models
        self.accepting = not self._draining

    def get(self, name: str, version: str = "") -> ModelView:
        if not self.accepting:
            raise Unavailable("the server is starting or shutting down; retry")
        return resolve(self._models, name, version)

    def deadline(self, model: ModelView, timeout_s: float | None) -> float | None:
        return deadline_after(time.monotonic(), timeout_s, model.default_timeout_us)

    async def infer(
        self, model: ModelView, payload: InferInput, deadline: float | None = None, priority: int = 0
    ) -> np.ndarray:
        """Like DataPlane.infer, which the owner runs on what this process prepared."""
        if not self.accepting:
            raise Unavailable(f"model {model.name!r} is not accepting requests (server shutting down)")
        arrived = time.monotonic()
        self._preparing += 1
        try:
            block, rows = await self._prepare(model, payload)
        except BaseException as exc:  # counted where the statistics live, as DataPlane counts it
            code = exc.code if isinstance(exc, ServingError) else "INTERNAL"
            code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else code
            self.link.send(ipc.Refused(model.name, model.version, code, time.monotonic() - arrived))
            raise
        finally:
            self._preparing -= 1
            if not self._preparing:
                self._prepared.set()
        return await self._submit(model, block, rows, deadline, priority, arrived)

    async def _prepare(self, model: ModelView, payload: InferInput) -> tuple[Block, int]:
        size = model.spec.input_size
        rows = check_input(model.name, model.input, size, payload)
        check_request_size(rows, model.max_queue_size)  # before any decoding; room is the owner's
        shape = (rows, 3, size, size)
        nbytes = aligned(
            max(int(np.prod(shape)) * model.input.dtype.itemsize, rows * model.num_classes * LOGIT.itemsize)
        )
        if nbytes > self.arena.size:
            raise InvalidArgument(
                f"the request needs {nbytes / 2**20:.1f} MiB of front-end buffer, more than its "
                f"{self.arena.size / 2**20:.0f} MiB (frontend_buffer_mb); send fewer images per request"
            )
        offset = self.allocator.allocate(nbytes)
        if offset is None:
            raise ResourceExhausted(
                f"front-end buffer full ({self.allocator.free_bytes} of {self.arena.size} bytes free, "
                f"the largest piece {self.allocator.largest_hole}, {nbytes} needed); retry later"
            )
        block = Block(offset, nbytes)
        try:
            tensor = self.arena.array(offset, shape, model.input.dtype)
            await convert_input(
                payload, self._preprocessors[model.name, model.version], model.input.dtype, tensor
            )
        except BaseException:
            self.allocator.free(block.offset, block.nbytes)
            raise
        return block, rows

    async def _submit(
        self,
        model: ModelView,
        block: Block,
        rows: int,
        deadline: float | None,
        priority: int,
        arrived: float,
    ) -> np.ndarray:
        if self.link.closed:
            self.allocator.free(block.offset, block.nbytes)
            raise Unavailable("the server's model process is gone")
        request_id = next(self._ids)
        loop = self.link.loop
        answer: asyncio.Future[tuple[str, str] | None] = loop.create_future()
        self._pending[request_id] = (answer, block)
        record = (request_id, model.slot, rows, block.offset, block.offset)
        self.link.add(
            ipc.Kind.SUBMIT, (*record, NO_DEADLINE if deadline is None else deadline, priority, arrived)
        )
        timer = None if deadline is None else loop.call_at(deadline, self._withdraw, request_id, True)
        try:
            error = await answer
        except asyncio.CancelledError:
            # The owner may still be reading the block: it is freed when the owner answers.
            if request_id in self._pending:
                self._withdraw(request_id, False)
            raise
        finally:
            if timer is not None:
                timer.cancel()
        try:
            if error is not None:
                raise Relayed(*error)
            return self.arena.array(block.offset, (rows, model.num_classes), LOGIT).copy()
        finally:
            self.allocator.free(block.offset, block.nbytes)

    def _withdraw(self, request_id: int, expired: bool) -> None:
        """Tell the owner a request's deadline passed or its caller left; its answer still comes."""
        if request_id in self._pending:
            self.link.add(ipc.Kind.CANCEL, (request_id, expired))

    @property
    def preparing(self) -> int:
        return self._preparing

    @property
    def waiting(self) -> int:
        """Requests handed to the owner and not yet answered."""
        return len(self._pending)

    def on_records(self, kind: ipc.Kind, records: np.ndarray) -> None:
        """The owner's DONE ids: their logits are in their blocks."""
        if kind == ipc.Kind.DONE:
            for request_id in records.tolist():
                self._answer(request_id, None)

    def failed(self, message: ipc.Failed) -> None:
        for request_id, code, text in message.answers:
            self._answer(request_id, (code, text))

    def _answer(self, request_id: int, error: tuple[str, str] | None) -> None:
        entry = self._pending.pop(request_id, None)
        if entry is None:
            return
        answer, block = entry
        self.answered += 1
        if answer.done():  # its caller left: nobody reads the block any more
            self.allocator.free(block.offset, block.nbytes)
        else:
            answer.set_result(error)

    def owner_lost(self) -> None:
        self.accepting = False
        for request_id in list(self._pending):
            self._answer(request_id, ("UNAVAILABLE", "the server's model process is gone"))

    async def drain(self) -> None:
        """Refuse new requests; return once every accepted one has been handed to the owner."""
        self._draining = True
        self.accepting = False
        if self._preparing:
            self._prepared.clear()
            await self._prepared.wait()

    def close(self) -> None:
        for preprocessor in self._preprocessors.values():
            preprocessor.close()


def _all_methods() -> dict[str, tuple[bool, bool]]:
    """Every method the server offers: path -> (client streaming, server streaming)."""
    services = [
        KSERVE,
        CLASSIFIER,
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return {
        f"/{s.full_name}/{m.name}": (m.client_streaming, m.server_streaming)
        for s in services
        for m in s.methods
    }


class Forwarder(grpc.GenericRpcHandler):
    """Relays every RPC not served here to the owner, bytes in and bytes out, status and all."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._channel = channel
        self._methods = {path: kind for path, kind in _all_methods().items() if path not in LOCAL}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path = handler_call_details.method
        kind = self._methods.get(path)
        if kind is None:
            return None
        if kind == (False, False):
            return grpc.unary_unary_rpc_method_handler(self._unary(path))
        if kind == (False, True):
            return grpc.unary_stream_rpc_method_handler(self._streaming(self._channel.unary_stream(path)))
        return grpc.stream_stream_rpc_method_handler(self._streaming(self._channel.stream_stream(path)))

    @staticmethod
    def _call_options(context: grpc.aio.ServicerContext) -> dict[str, Any]:
        metadata = tuple(
            (key, value)
            for key, value in context.invocation_metadata() or ()
            if key not in HOP_HEADERS and not key.startswith((":", "grpc-"))
        )
        return {"timeout": context.time_remaining(), "metadata": metadata}

    def _unary(self, path: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        call = self._channel.unary_unary(path)

        async def relay(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                return await call(request, **self._call_options(context))
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")  # raises

        return relay

    def _streaming(self, call: Any) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[bytes]]:
        """Relay a call whose answers stream (`call` from the channel's unary_stream or
        stream_stream: the request, one message or an iterator of them, passes through as is)."""

        async def relay(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            try:
                async for response in call(request, **self._call_options(context)):
                    yield response
            except grpc.aio.AioRpcError as exc:
                await context.abort(exc.code(), exc.details() or "")

        return relay


def _inference_handlers(kserve: KServeInference) -> grpc.GenericRpcHandler:
    pb = grpc_service_pb2
    return grpc.method_handlers_generic_handler(
        KSERVE.full_name,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                kserve.ModelInfer, pb.ModelInferRequest.FromString, pb.ModelInferResponse.SerializeToString
            ),
            "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                kserve.ModelStreamInfer,
                pb.ModelInferRequest.FromString,
                pb.ModelStreamInferResponse.SerializeToString,
            ),
        },
    )


class FrontEnd:
    """One front-end process: its gRPC server, its plane and its link to the owner."""

    def __init__(self, link_fd: int, arena_fd: int, index: int) -> None:
        self.index = index
        self._link_fd = link_fd
        self._arena_fd = arena_fd
        self._first: asyncio.Future[ipc.Configure] | None = None
        self._stop: asyncio.Future[float] | None = None
        self.plane: FrontPlane | None = None
        self.regions: SharedMemoryRegistry | None = None
        self._guard: CallGuard | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        configure_allocator()
        self._guard = CallGuard()
        self._first, self._stop = loop.create_future(), loop.create_future()
        link = await open_link(
            socket.socket(fileno=self._link_fd), self._on_records, self._on_control, self._on_lost
        )
        try:
            first = await self._first
        except ConnectionError:
            return 1
        config, owner_address, port, arena_size = (
            first.config,
            first.owner_address,
            first.port,
            first.arena_size,
        )
        configure(config.log_format, config.log_level)
        for handler in logging.getLogger().handlers:
            handler.addFilter(self._tag)
        self.regions = SharedMemoryRegistry(config.max_message_bytes)
        self.plane = plane = FrontPlane(link, Arena(self._arena_fd, arena_size), config.decode_threads())
        async with grpc.aio.insecure_channel(owner_address, options=_limits(config)) as owner:
            server = self._server(config, owner)
            try:
                bound = auth.bind(
                    server, f"{config.host}:{port}", config.tls_cert, config.tls_key, config.tls_client_ca
                )
            except (RuntimeError, ServingError) as exc:
                bound, reason = 0, str(exc)
            else:
                reason = "in use or not permitted"
            if not bound:
                link.send(ipc.StartFailed(f"cannot listen on {config.host}:{port} ({reason})"))
                link.flush()
                return 2
            await server.start()
            link.send(ipc.Listening())
            trimmer = loop.create_task(
                trim_when_quiet(lambda: (plane.preparing + plane.waiting, plane.answered))
            )
            self._tasks.add(trimmer)
            trimmer.add_done_callback(self._tasks.discard)
            grace_s = await self._stop
            # As the owner does (serving.api.rpc.exit_now): answer what was accepted, then leave without
            # gRPC's shutdown, whose race cancels the calls that reach it meanwhile.
            assert self._guard is not None
            await self._guard.wait_idle(grace_s)
            await asyncio.sleep(FLUSH_S)
            exit_now(0)

    def _tag(self, record: logging.LogRecord) -> bool:
        """Every log line of this process names it: `worker` I."""
        record.worker = self.index
        return True

    def _server(self, config: ServerConfig, owner: grpc.aio.Channel) -> grpc.aio.Server:
        assert self.plane is not None and self.regions is not None and self._guard is not None
        server = grpc.aio.server(
            interceptors=[self._guard, *auth.interceptors(config.auth_token)],
            options=[
                *_limits(config),
                ("grpc.max_concurrent_streams", config.max_concurrent_streams),
                ("grpc.so_reuseport", 1),
            ],
        )
        server.add_generic_rpc_handlers([_inference_handlers(KServeInference(self.plane, self.regions))])
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(self.plane), server)
        server.add_generic_rpc_handlers([Forwarder(owner)])
        return server

    def _on_records(self, kind: ipc.Kind, records: np.ndarray) -> None:
        assert self.plane is not None
        self.plane.on_records(kind, records)

    def _on_control(self, message: Any) -> None:
        handler = {
            ipc.Configure: self._configure,
            ipc.Failed: self._failed,
            ipc.Catalog: self._catalog,
            ipc.Regions: self._regions,
            ipc.Drain: self._drain,
            ipc.Stop: self._stopped,
        }[type(message)]
        handler(message)

    def _configure(self, message: ipc.Configure) -> None:
        assert self._first is not None
        self._first.set_result(message)

    def _failed(self, message: ipc.Failed) -> None:
        assert self.plane is not None
        self.plane.failed(message)

    def _catalog(self, message: ipc.Catalog) -> None:
        assert self.plane is not None
        self.plane.set_models(message.models)
        self.plane.link.send(ipc.Ack(message.seq))

    def _regions(self, message: ipc.Regions) -> None:
        assert self.regions is not None and self.plane is not None
        self.regions.mirror([RegionInfo(*info) for info in message.regions])
        self.plane.link.send(ipc.Ack(message.seq))

    def _drain(self, message: ipc.Drain) -> None:
        async def drain() -> None:
            assert self.plane is not None
            await self.plane.drain()
            self.plane.link.send(ipc.Ack(message.seq))

        task = asyncio.get_running_loop().create_task(drain())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stopped(self, message: ipc.Stop) -> None:
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(message.grace_s)

    def _on_lost(self) -> None:
        """The owner is gone (it exited or died): nothing can be answered; stop at once."""
        if self.plane is not None:
            self.plane.owner_lost()
        if self._first is not None and not self._first.done():
            self._first.set_exception(ConnectionError("the owner closed the link before configuring us"))
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(0.0)


def _limits(config: ServerConfig) -> list[tuple[str, int]]:
    limit = config.max_message_bytes
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.workers.frontend", description=__doc__)
    parser.add_argument("--link", type=int, required=True, help="socket to the owner (inherited fd)")
    parser.add_argument("--arena", type=int, required=True, help="shared memory (inherited memfd)")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="auto", help="as the owner's event_loop")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    yield_on_wakeup()  # before gRPC and the decoding pool start threads, which inherit it
    return event_loop.run(FrontEnd(args.link, args.arena, args.index).run(), args.event_loop)


if __name__ == "__main__":
    sys.exit(main())
