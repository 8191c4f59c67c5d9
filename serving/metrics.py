"""Prometheus metrics, one registry per server (so tests can run several in one process).

Names follow what Triton users watch: request counts by status, queue and compute durations,
the batch-size distribution (proof that dynamic batching batches), queue depth and in-flight
requests, all per model and version, and an info gauge naming each model's backend and precision.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LABELS = ("model", "version")


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hrnet_requests", "Inference requests by final gRPC status", (*LABELS, "code"), registry=r
        )
        self.request_seconds = Histogram(
            "hrnet_request_duration_seconds",
            "Arrival to response",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "hrnet_queue_duration_seconds",
            "Time a request waited for its batch",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "hrnet_compute_duration_seconds",
            "Backend time per batch",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "hrnet_batch_size", "Images per executed batch", LABELS, buckets=BATCH_BUCKETS, registry=r
        )
        self.images = Counter("hrnet_inference_images", "Images computed", LABELS, registry=r)
        self.dropped = Counter(
            "hrnet_dropped_images",
            "Images dropped before compute (expired, cancelled, shutdown)",
            (*LABELS, "reason"),
            registry=r,
        )
        self.queue_depth = Gauge(
            "hrnet_queue_depth_images", "Images waiting in the batching queue", LABELS, registry=r
        )
        self.in_flight = Gauge("hrnet_in_flight_requests", "Requests being handled", LABELS, registry=r)
        self.model_info = Gauge(
            "hrnet_model_info",
            "1 per loaded model version; labels name its backend and precision (fp32, fp16, int8, unknown)",
            (*LABELS, "backend", "precision"),
            registry=r,
        )
        self._http = None

    def watch_queue(self, model: str, version: str, depth: Callable[[], float]) -> None:
        self.queue_depth.labels(model, version).set_function(depth)

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics; returns the bound port (useful with port 0)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
