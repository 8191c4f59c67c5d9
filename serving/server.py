"""The server process: gRPC (KServe v2, Classifier, health, reflection) plus Prometheus over HTTP.

Start order: bind the port and report NOT_SERVING, load every model (a missing or corrupt one
aborts the start with its path), start the batchers, then SERVING. Stop order (SIGTERM): health
NOT_SERVING and new requests refused at once, queued and running work finishes within the grace
period, then the gRPC server and metrics endpoint close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos import classifier_pb2, classifier_pb2_grpc, grpc_service_pb2, grpc_service_pb2_grpc
from serving import auth
from serving.classifier import ClassifierServicer
from serving.config import ServerConfig
from serving.errors import ListenError
from serving.kserve import KServeServicer
from serving.metrics import ServerMetrics
from serving.repository import scan_repository, single_model
from serving.service import DataPlane, LoadedModel, load_model

log = logging.getLogger(__name__)

SERVICES = (
    grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name,
)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Server:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics()
        self.plane = DataPlane(self.metrics)
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = -1
        self._grpc: grpc.aio.Server | None = None  # made in start(): it binds to the running loop

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "", "[::]") else self.config.host
        return f"{host}:{self.port}"

    async def _set_health(self, status: int, names: list[str]) -> None:
        for name in ("", *SERVICES, *names):
            await self.health.set(name, status)

    async def start(self) -> None:
        """Bind, load every model, start batching; raises a StartError and leaves nothing running."""
        cfg = self.config
        limit = cfg.max_message_bytes
        self._grpc = grpc.aio.server(
            interceptors=auth.interceptors(cfg.auth_token),
            options=[
                ("grpc.max_send_message_length", limit),
                ("grpc.max_receive_message_length", limit),
                ("grpc.so_reuseport", 0),
            ],
        )
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            KServeServicer(self.plane), self._grpc
        )
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(self.plane), self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection(
            (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._grpc,
        )
        try:
            self.port = auth.bind(
                self._grpc, f"{cfg.host}:{cfg.port}", cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca
            )
        except RuntimeError:
            self.port = 0
        if not self.port:
            raise ListenError(f"cannot listen on {cfg.host}:{cfg.port} (in use or not permitted)")
        await self._set_health(NOT_SERVING, [])
        await self._grpc.start()
        try:
            if cfg.metrics_port >= 0:
                self.metrics_port = self.metrics.serve_http(cfg.host, cfg.metrics_port)
            models = await asyncio.to_thread(self._load_models)
            for model in models:
                self.plane.add(model)
            await self.plane.start()
        except BaseException:
            await self._grpc.stop(None)
            self.metrics.close()
            self.plane.close()
            raise
        await self._set_health(SERVING, self.plane.names())
        log.info(
            "serving",
            extra={"address": self.address, "metrics_port": self.metrics_port, "models": self.plane.names()},
        )

    def _load_models(self) -> list[LoadedModel]:
        cfg = self.config
        if cfg.model:
            sources = [single_model(Path(cfg.model), cfg.model_name, cfg.model_defaults)]
        else:
            sources = scan_repository(Path(cfg.repo), cfg.model_defaults)
        return [load_model(s, self.metrics, cfg.preprocess_workers, cfg.max_image_pixels) for s in sources]

    async def stop(self, grace_s: float | None = None) -> bool:
        """Drain and stop. True when all accepted work finished within the grace period."""
        if self._grpc is None:
            return True
        grace_s = self.config.grace_period_s if grace_s is None else grace_s
        started = time.monotonic()
        await self._set_health(NOT_SERVING, self.plane.names())
        drained = await self.plane.drain(grace_s)
        # Responses of drained work are still being written: give them a moment before closing.
        await self._grpc.stop(max(1.0, grace_s - (time.monotonic() - started)))
        self.plane.close()
        self.metrics.close()
        log.info("stopped", extra={"drained": drained, "seconds": round(time.monotonic() - started, 2)})
        return drained
