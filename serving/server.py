"""The server: gRPC (KServe v2, Classifier, health, reflection), the same KServe v2 over HTTP/REST,
and Prometheus with HTTP probes, all on one event loop over one data plane.

Start order: bind the ports and report NOT_SERVING, load the models the control mode loads at
start (`serving.engine.control`: a model that fails is reported UNAVAILABLE and the others serve,
unless `exit_on_error`), start the batchers, then SERVING. Stop order (SIGTERM, `drain`):
health NOT_SERVING, model control stops changing anything, new requests are refused with
UNAVAILABLE at once, queued and running work finishes within the grace period and every answer
is handed over. `hrnet serve` then exits (serving/cli.py says why without closing gRPC); `stop`
(in-process use) also closes the listeners and exports pending traces.

With several front-end processes (`workers` > 1, serving/workers/frontend.py) this process owns the
models and answers gRPC on a private Unix socket instead (REST and metrics stay here); the front
ends listen on the gRPC port, serve the inference RPCs and forward the rest here (the repository
RPCs included); every change model control makes is published to them. They start right after
binding, drain (stop taking requests, hand over the accepted ones) before the data plane does,
and stop after it.

`Server` is also the embedding API: `await server.start()` / `await server.stop()` (or
`async with Server(config)`) on the caller's event loop, or `server.start_background()` /
`server.stop_background()` (or `with Server(config)`) on a loop in a thread of its own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
import time
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from serving import event_loop
from serving.api import auth
from serving.api.classifier import ClassifierServicer
from serving.api.http import HttpListener
from serving.api.kserve import KServeServicer
from serving.api.rest import RestApi
from serving.api.rpc import FLUSH_S, CallGuard
from serving.background import BackgroundLoop
from serving.config import ServerConfig
from serving.engine import tracing
from serving.engine.control import ModelControl
from serving.engine.service import DataPlane
from serving.engine.shm import SharedMemoryRegistry
from serving.errors import ListenError
from serving.memory import configure_allocator, trim_when_quiet
from serving.metrics import ServerMetrics
from serving.telemetry import GpuTelemetry, ProcessCpu
from serving.workers.supervisor import FrontEnds

log = logging.getLogger(__name__)

SERVICES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT_S = 600.0  # of start_background: loading a large model on a slow disk
T = TypeVar("T")


class Server:
    """One inference server. `span_exporter` (an OpenTelemetry SpanExporter) receives the traces
    instead of an OTLP collector, e.g. the SDK's InMemorySpanExporter in a test or a notebook."""

    def __init__(self, config: ServerConfig, span_exporter: Any = None) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.plane = DataPlane(self.metrics)
        self.regions = SharedMemoryRegistry(config.max_message_bytes)
        self.health = health.aio.HealthServicer()
        self.control = ModelControl(config, self.plane, self._set_model_health, self._models_changed)
        self.port = 0  # gRPC; the bound ports are known once started (0 in the config picks one)
        self.http_port = -1  # -1: not serving it
        self.metrics_port = -1
        self._span_exporter = span_exporter
        self.frontends: FrontEnds | None = None  # with workers > 1
        self._private: tempfile.TemporaryDirectory[str] | None = None  # the owner's gRPC socket
        # Made in start(): they bind to the running loop.
        self._grpc: grpc.aio.Server | None = None
        self._guard: CallGuard | None = None
        self._trimmer: asyncio.Task[None] | None = None
        self._gpu: GpuTelemetry | None = None
        self._gpu_sampler: asyncio.Task[None] | None = None
        self._listeners: list[HttpListener] = []
        self._background: BackgroundLoop | None = None

    @property
    def host(self) -> str:
        """Where a client on this machine reaches the server."""
        return "127.0.0.1" if self.config.host in ("0.0.0.0", "", "[::]") else self.config.host

    @property
    def address(self) -> str:
        """gRPC `host:port`, for `clients.Client` and `tritonclient.grpc`."""
        return f"{self.host}:{self.port}"

    @property
    def http_address(self) -> str:
        """REST `host:port`, for `tritonclient.http` and curl (empty when http_port is -1)."""
        return f"{self.host}:{self.http_port}" if self.http_port >= 0 else ""

    async def _set_health(self, status: int, names: list[str]) -> None:
        for name in ("", *SERVICES, *names):
            await self.health.set(name, status)

    async def _set_model_health(self, name: str, serving: bool) -> None:
        await self.health.set(name, SERVING if serving else NOT_SERVING)

    async def _models_changed(self) -> None:
        """Front ends route by their copy of the catalog: send it on every change once serving."""
        if self.frontends is not None and self.plane.accepting:
            await self.frontends.publish_models()

    async def start(self) -> None:
        """Bind, load the models, start batching; raises a StartError and leaves nothing running."""
        cfg = self.config
        configure_allocator()
        self._guard = CallGuard()
        self._grpc = self._services()
        try:
            self._bind_grpc()
        except BaseException:
            self._remove_private()
            raise
        await self._set_health(NOT_SERVING, [])
        await self._grpc.start()
        try:
            if self.frontends is not None:
                await self.frontends.start(self.port)
            await self._listen()
            self.plane.tracing = tracing.create(
                cfg.trace_endpoint, cfg.trace_sample_ratio, self._span_exporter
            )
            await self.control.start()
            self.plane.open()
            if self.frontends is not None:
                await self.frontends.publish_models()
        except BaseException:
            await self.control.stop()
            if self.frontends is not None:
                await self.frontends.stop(0.0)
            await self._grpc.stop(None)
            await self.plane.drain(0)
            await self._close()
            raise
        self._trimmer = asyncio.create_task(
            trim_when_quiet(lambda: (self.plane.running, self.plane.finished))
        )
        await self._set_health(SERVING, [])  # each model's own health is model control's
        log.info(
            "serving",
            extra={
                "address": self.address,
                "http_port": self.http_port,
                "metrics_port": self.metrics_port,
                "tracing": cfg.trace_endpoint or ("exporter" if self._span_exporter else "off"),
                "models": self.plane.names(),
                "workers": cfg.front_ends(),
                "model_control": cfg.model_control,
                "event_loop": event_loop.resolve(cfg.event_loop),
            },
        )

    def _services(self) -> grpc.aio.Server:
        """The gRPC server with every service; with several workers, also the front ends' supervisor."""
        cfg = self.config
        limit = cfg.max_message_bytes
        assert self._guard is not None
        server = grpc.aio.server(
            interceptors=[self._guard, *auth.interceptors(cfg.auth_token)],
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
                ("grpc.so_reuseport", 0),
            ],
        )
        workers = cfg.front_ends()
        if workers > 1:
            self._private = tempfile.TemporaryDirectory(prefix="hrnet-serve-")
            owner = f"unix:{self._private.name}/owner.sock"
            self.frontends = FrontEnds(cfg, workers, self.plane, self.regions, self.metrics, owner)
        regions_changed = self.frontends.publish_regions if self.frontends else None
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.plane, self.control, self.regions, regions_changed), server
        )
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(self.plane), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            server,
        )
        return server

    def _bind_grpc(self) -> None:
        """Bind the gRPC port; with front ends, check it is free for them and take a private socket."""
        cfg = self.config
        assert self._grpc is not None
        if self.frontends is not None:
            self.port = check_port_free(cfg.host, cfg.port)
            self._grpc.add_insecure_port(self.frontends.owner_address)
            return
        try:
            self.port = auth.bind(
                self._grpc, f"{cfg.host}:{cfg.port}", cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca
            )
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ListenError(f"cannot listen on {cfg.host}:{cfg.port} (in use or not permitted)")

    async def _listen(self) -> None:
        """The REST port (same TLS and token as gRPC) and the metrics port, when configured."""
        cfg = self.config
        if cfg.http_port >= 0:
            api = RestApi(self.plane, self.control).app(
                cfg.max_message_bytes, auth.http_middlewares(cfg.auth_token)
            )
            rest = HttpListener(api, "HTTP/REST", shutdown_timeout_s=max(1.0, cfg.grace_period_s))
            self._listeners.append(rest)
            tls = auth.ssl_context(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
            self.http_port = await rest.start(cfg.host, cfg.http_port, tls)
        if cfg.metrics_port >= 0:
            self.metrics.registry.register(
                ProcessCpu(lambda: self.frontends.processes() if self.frontends else {})
            )
            self._gpu = GpuTelemetry(self.metrics.registry, cfg.gpu_metrics_interval_s)
            if await asyncio.to_thread(self._gpu.open):
                self._gpu_sampler = asyncio.create_task(self._gpu.run(), name="gpu-metrics")
            probes = HttpListener(
                self.metrics.app(lambda: self.plane.ready), "metrics", shutdown_timeout_s=1.0
            )
            self._listeners.append(probes)
            self.metrics_port = await probes.start(cfg.metrics_host, cfg.metrics_port)

    async def _close(self) -> None:
        """Close what start() opened besides gRPC: listeners, models, tracing (exporting what is left)."""
        await asyncio.gather(*(listener.stop() for listener in self._listeners))
        self._listeners.clear()
        if self._gpu_sampler is not None:
            self._gpu_sampler.cancel()
            self._gpu_sampler = None
        if self._gpu is not None:
            self._gpu.close()
        self.plane.close()
        await self.plane.tracing.close()
        self._remove_private()

    def _remove_private(self) -> None:
        if self._private is not None:
            self._private.cleanup()
            self._private = None

    async def drain(self, grace_s: float | None = None) -> bool:
        """SIGTERM's work: stop taking requests, finish and answer what was accepted within `grace_s`.

        True when nothing accepted was abandoned. The port stays open meanwhile, answering new
        calls UNAVAILABLE, so no caller meets a half-closed server.
        """
        if self._grpc is None or self._guard is None:
            return True
        grace_s = self.config.grace_period_s if grace_s is None else grace_s
        started = time.monotonic()

        def left() -> float:
            return max(0.0, grace_s - (time.monotonic() - started))

        await self._set_health(NOT_SERVING, self.control.names())
        await self.control.stop()
        handed_over = await self.frontends.drain(grace_s) if self.frontends else True
        drained = await self.plane.drain(left()) and handed_over
        if self.frontends is not None:  # they answer what they handed over, then exit
            await self.frontends.stop(max(1.0, left()))
        answered = await self._guard.wait_idle(left())
        await asyncio.sleep(FLUSH_S)
        log.info(
            "drained",
            extra={
                "drained": drained and answered,
                "seconds": round(time.monotonic() - started, 2),
                "open_calls": self._guard.active,
            },
        )
        return drained and answered

    async def close(self) -> None:
        """Release the ports, the models and tracing (after `drain`, for in-process use)."""
        if self._grpc is None:
            return
        await self._grpc.stop(FLUSH_S)
        self._grpc = None
        if self._trimmer is not None:
            self._trimmer.cancel()
        await self._close()

    async def stop(self, grace_s: float | None = None) -> bool:
        """Drain, then close. True when all accepted work finished within the grace period."""
        drained = await self.drain(grace_s)
        await self.close()
        return drained

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- from synchronous code: the server on an event loop in a thread of its own -------------

    def start_background(self, timeout_s: float = START_TIMEOUT_S) -> Server:
        """Start on a loop in a daemon thread and return once serving (raising what start raised)."""
        if self._background is not None:
            raise RuntimeError("this server is already running in the background")
        self._background = BackgroundLoop(
            f"hrnet-server-{id(self):x}", event_loop.loop_factory(self.config.event_loop)
        )
        try:
            self._background.run(self.start(), timeout_s)
        except BaseException:
            self._background.close()
            self._background = None
            raise
        return self

    def stop_background(self, grace_s: float | None = None) -> bool:
        """Drain and stop (see `stop`), then end the thread. True when all work finished in time."""
        if self._background is None:
            return True
        try:
            return self._background.run(self.stop(grace_s))
        finally:
            self._background.close()
            self._background = None

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = 60.0) -> T:
        """Run a coroutine on the background server's loop from another thread (e.g. to change
        health: `server.call(server.health.set("", NOT_SERVING))`) and return its result."""
        if self._background is None:
            coro.close()
            raise RuntimeError("the server is not running in the background (start_background)")
        return self._background.run(coro, timeout_s)

    def __enter__(self) -> Server:
        return self.start_background()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_background()


def check_port_free(host: str, port: int) -> int:
    """`port` (0: any) if nothing listens on it, checked without SO_REUSEPORT, which the front
    ends then bind with: they must not join another server that happens to use the port."""
    address = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as exc:
            raise ListenError(f"cannot listen on {host}:{port} ({exc.strerror})") from None
        return int(probe.getsockname()[1])
