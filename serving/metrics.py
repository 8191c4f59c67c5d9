"""Prometheus metrics, one registry per server (so tests can run several in one process), and the
metrics port that serves them with the probes.

Names follow what Triton users watch: request counts by status, queue and compute durations,
the batch-size distribution (proof that dynamic batching batches), queue depth and in-flight
requests, all per model and version, an info gauge naming each model's backend and precision,
and what the execution engine adds: padding rows, warm-up time and replaced instances.

The metrics port is a small aiohttp application on the server's event loop rather than
prometheus_client's own HTTP server: that one answers every path with the metrics text and runs
in a thread of its own, so it could neither 404 an unknown path nor tell a wedged event loop
from a healthy one. Here `/healthz` is answered by the loop that serves the requests, and
`/readyz` reads the data plane's own readiness.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
from collections.abc import Callable, Iterator, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from serving.api.http import json_errors

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LABELS = ("model", "version")


class Tally:
    """A counter child: a plain number, updated by one thread with no lock."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Spread:
    """A histogram child: bucket counts and a sum, updated by one thread with no lock."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # `le`: a bound holds its value
        self.sum += value


class LoopMetric:
    """A Prometheus counter or histogram (`buckets` given) whose children are `Tally` or `Spread`:
    plain numbers the event loop updates with no lock, read when scraped.

    prometheus_client's own take a lock and a few calls per update; the model owner made eight
    per request (requests by code, their durations, queue waits, batch figures), a quarter of
    its event loop's Python under load (docs/serving.md). The scrape reads while the loop
    writes: a bucket list is copied at once (under the GIL), so a histogram's count always
    equals its +Inf bucket; its sum may lag an observation.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets)) if buckets is not None else None
        self._children: dict[tuple[str, ...], Tally | Spread] = {}
        registry.register(self)

    def labels(self, *values: str) -> Tally | Spread:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = Tally() if self.bounds is None else Spread(self.bounds)
            self._children[values] = child
        return child

    def describe(self) -> list[Metric]:
        return [self._family()]

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in list(self._children.items()):
            if isinstance(child, Tally):
                family.add_metric(values, child.value)  # type: ignore[call-arg]
                continue
            counts, total, running = list(child.counts), child.sum, 0
            buckets = []
            for bound, count in zip((*child.bounds, float("inf")), counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), running))
            family.add_metric(values, buckets, total)  # type: ignore[call-arg]
        yield family

    def _family(self) -> Metric:
        if self.bounds is None:
            return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Updated per request or per batch, on the event loop: LoopMetric. The rest: prometheus_client.
        self.requests = LoopMetric(
            "hrnet_requests", "Inference requests by final gRPC status", (*LABELS, "code"), r
        )
        self.request_seconds = LoopMetric(
            "hrnet_request_duration_seconds", "Arrival to response", LABELS, r, LATENCY_BUCKETS
        )
        self.queue_seconds = LoopMetric(
            "hrnet_queue_duration_seconds", "Time a request waited for its batch", LABELS, r, LATENCY_BUCKETS
        )
        self.compute_seconds = LoopMetric(
            "hrnet_compute_duration_seconds", "Backend time per batch", LABELS, r, LATENCY_BUCKETS
        )
        self.batch_size = LoopMetric(
            "hrnet_batch_size", "Images per executed batch", LABELS, r, BATCH_BUCKETS
        )
        self.images = LoopMetric("hrnet_inference_images", "Images computed", LABELS, r)
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
        self.frontend_requests = LoopMetric(
            "hrnet_frontend_requests",
            "Inference requests handed to the models by each front-end process (--workers > 1)",
            ("worker",),
            r,
        )
        self.frontend_restarts = Counter(
            "hrnet_frontend_restarts", "Front-end processes that died and were replaced", registry=r
        )
        self.padding = LoopMetric(
            "hrnet_padding_images",
            "Zero rows computed to pad batches up to a bucket (work spent on no request)",
            LABELS,
            r,
        )
        self.warmup_seconds = Gauge(
            "hrnet_model_warmup_seconds",
            "Time the slowest instance took at load to run every batch bucket once",
            LABELS,
            registry=r,
        )
        self.instance_replacements = Counter(
            "hrnet_instance_replacements",
            "Model instances replaced after a batch ran past execution_timeout_s",
            LABELS,
            registry=r,
        )

    def watch_queue(
        self, model: str, version: str, depth: Callable[[], float], in_flight: Callable[[], float]
    ) -> None:
        """Queue depth and requests in flight, read when scraped: nothing to update per request."""
        self.queue_depth.labels(model, version).set_function(depth)
        self.in_flight.labels(model, version).set_function(in_flight)

    def unwatch_queue(self, model: str, version: str) -> None:
        """Forget an unloaded version's gauges (their functions hold its batcher and model)."""
        for gauge in (self.queue_depth, self.in_flight):
            with contextlib.suppress(KeyError):
                gauge.remove(model, version)

    def app(self, ready: Callable[[], bool]) -> web.Application:
        """/metrics (Prometheus or OpenMetrics text, as the scraper asks), /healthz (the process
        answers), /readyz (200 once every model is ready, 503 while loading or draining); every
        other path is 404."""

        async def metrics(request: web.Request) -> web.Response:
            encode, content_type = choose_encoder(request.headers.get("Accept", ""))
            body = await asyncio.to_thread(encode, self.registry)  # off the loop serving requests
            response = web.Response(body=body, headers={"Content-Type": content_type})
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                response.enable_compression()
            return response

        async def healthz(request: web.Request) -> web.Response:
            return web.Response(text="ok\n")

        async def readyz(request: web.Request) -> web.Response:
            return web.Response(text="ready\n") if ready() else web.Response(text="not ready\n", status=503)

        app = web.Application(middlewares=[json_errors])
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        return app
