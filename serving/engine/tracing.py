"""OpenTelemetry spans per inference request, exported over OTLP; nothing at all when off.

Each traced request is one tree, whose root continues the caller's trace when a W3C
`traceparent` arrives (gRPC metadata or an HTTP header):

    infer                 the whole request (model, version, API, request id; error status)
    ├─ receive            protocol message -> arrays (and the HTTP body read and JSON parse)
    ├─ decode             image decoding and preprocessing, or the tensor's checks
    ├─ queue              waiting in the batching queue
    ├─ batch              the batch the request rode in (its size and request count)
    │  └─ compute         the backend call for that batch
    └─ respond            arrays -> protocol message

Off (no `trace_endpoint`), OpenTelemetry is never imported and every method returns a shared
no-op context manager or None: a request pays an attribute lookup per span and nothing else.
The trace settings (Triton's TraceSetting: `trace_level` OFF/TIMESTAMPS and `trace_rate`, 1 in
N, server-wide or per model) decide which requests are sampled; a request whose `traceparent`
says sampled is traced whatever the rate, as OpenTelemetry's parent-based sampling does.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from core import __version__
from serving.engine.batcher import RunTiming
from serving.errors import FailedPrecondition, InvalidArgument

LEVELS = ("OFF", "TIMESTAMPS")
UPDATABLE = ("trace_level", "trace_rate")
# What Triton's TraceSetting also reports; fixed here (every sampled request is exported).
FIXED = {"trace_count": "-1", "log_frequency": "0", "trace_mode": "opentelemetry"}
PROPAGATED = ("traceparent", "tracestate")
_OFF = contextlib.nullcontext()
Metadata = Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True)
class TraceSetting:
    level: str  # OFF or TIMESTAMPS
    ratio: float  # fraction of requests without a sampled traceparent that are traced

    def as_triton(self) -> dict[str, list[str]]:
        rate = round(1 / self.ratio) if self.ratio > 0 else 0
        return {"trace_level": [self.level], "trace_rate": [str(rate)], **{k: [v] for k, v in FIXED.items()}}


class Tracing:
    """Tracing switched off: the settings still answer, and nothing else costs anything."""

    enabled = False

    def __init__(self, sample_ratio: float = 1.0) -> None:
        self.default = TraceSetting("TIMESTAMPS" if self.enabled else "OFF", sample_ratio)
        self._global: dict[str, Any] = {}  # what TraceSetting changed server-wide
        self._models: dict[str, dict[str, Any]] = {}  # ... and per model
        self._lock = threading.Lock()

    # --- per request -------------------------------------------------------------------------

    def request(
        self, metadata: Callable[[], Metadata], model: str, version: str, api: str
    ) -> AbstractContextManager[Any]:
        """The root span of one request, current for everything awaited inside it; `metadata` is
        called (only when on) for the caller's `traceparent`."""
        return _OFF

    def span(self, name: str) -> AbstractContextManager[Any]:
        """A child of the current request's span."""
        return _OFF

    def annotate(self, key: str, value: str) -> None:
        """Add an attribute to the current span (when it is recorded and `value` is not empty)."""

    def on_run(self) -> Callable[[RunTiming], None] | None:
        """The batcher callback that adds queue, batch and compute spans to the current request."""
        return None

    async def close(self) -> None:
        """Export what is pending and stop."""

    # --- Triton's TraceSetting ---------------------------------------------------------------

    def setting(self, model: str = "") -> TraceSetting:
        """The effective setting for `model` (empty: server-wide): its own, else the server's."""
        values = {"level": self.default.level, "ratio": self.default.ratio, **self._global}
        values.update(self._models.get(model, {}))
        return TraceSetting(values["level"], values["ratio"])

    def update(self, changes: Mapping[str, list[str]], model: str = "") -> TraceSetting:
        """Apply Triton-style changes (an empty value list restores the default) to the server-wide
        settings or to one model's; the effective result."""
        parsed: dict[str, Any] = {}
        for key, values in changes.items():
            if key not in UPDATABLE:
                known = ", ".join((*UPDATABLE, *FIXED))
                raise InvalidArgument(
                    f"trace setting {key!r} cannot be changed here; settings: {known} (only "
                    f"{' and '.join(UPDATABLE)} can be changed)"
                )
            parsed[key] = self._parse(key, list(values))
        with self._lock:
            scope = self._models.setdefault(model, {}) if model else self._global
            for key, value in parsed.items():
                name = "level" if key == "trace_level" else "ratio"
                if value is None:
                    scope.pop(name, None)
                else:
                    scope[name] = value
        return self.setting(model)

    def _parse(self, key: str, values: list[str]) -> Any:
        if not values:
            return None
        if len(values) != 1:
            raise InvalidArgument(f"trace setting {key!r} takes one value, got {values}")
        value = values[0]
        if key == "trace_level":
            if value not in LEVELS:
                raise InvalidArgument(
                    f"trace_level {value!r} is not supported; use one of {', '.join(LEVELS)}"
                )
            if value != "OFF" and not self.enabled:
                raise FailedPrecondition("tracing is off: start the server with trace_endpoint set")
            return value
        try:
            rate = int(value)
        except ValueError:
            rate = -1
        if rate < 0:
            raise InvalidArgument(f"trace_rate must be an integer >= 0 (trace 1 request in N), got {value!r}")
        return 1 / rate if rate else 0.0


class OtelTracing(Tracing):
    """Tracing on: spans through the OpenTelemetry SDK, batched to an OTLP exporter."""

    enabled = True

    def __init__(self, sample_ratio: float, exporter: Any) -> None:
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        super().__init__(sample_ratio)
        self._context = context
        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        resource = Resource.create({"service.name": "hrnet", "service.version": __version__})
        self._provider = TracerProvider(resource=resource, sampler=_sampler(self))
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("hrnet.serving", __version__)

    def request(
        self, metadata: Callable[[], Metadata], model: str, version: str, api: str
    ) -> AbstractContextManager[Any]:
        carrier = {}
        for key, value in metadata():
            if key.lower() in PROPAGATED:
                carrier[key.lower()] = value.decode() if isinstance(value, bytes) else value
        parent = self._propagator.extract(carrier)
        attributes = {"hrnet.model": model, "hrnet.version": version, "hrnet.api": api}
        return self._tracer.start_as_current_span("infer", parent, self._trace.SpanKind.SERVER, attributes)

    def span(self, name: str) -> AbstractContextManager[Any]:
        if not self._trace.get_current_span().is_recording():
            return _OFF
        return self._tracer.start_as_current_span(name)

    def annotate(self, key: str, value: str) -> None:
        span = self._trace.get_current_span()
        if value and span.is_recording():
            span.set_attribute(key, value)

    def on_run(self) -> Callable[[RunTiming], None] | None:
        if not self._trace.get_current_span().is_recording():
            return None
        parent = self._context.get_current()

        def record(timing: RunTiming) -> None:
            # The batcher's clock is monotonic; spans want wall-clock nanoseconds.
            offset_ns = time.time_ns() - time.monotonic_ns()

            def ns(t: float) -> int:
                return int(t * 1e9) + offset_ns

            self._tracer.start_span("queue", parent, start_time=ns(timing.enqueued)).end(ns(timing.started))
            attributes = {
                "hrnet.batch_size": timing.batch_size,
                "hrnet.batch_requests": timing.batch_requests,
            }
            batch = self._tracer.start_span(
                "batch", parent, attributes=attributes, start_time=ns(timing.started)
            )
            inside = self._trace.set_span_in_context(batch, parent)
            compute = self._tracer.start_span("compute", inside, start_time=ns(timing.compute_started))
            compute.end(ns(timing.compute_ended))
            batch.end(ns(timing.finished))

        return record

    async def close(self) -> None:
        await asyncio.to_thread(self._provider.shutdown)  # flushes: the export may take a moment


def _sampler(tracing: Tracing) -> Any:
    """Parent-based sampling under the live TraceSetting of the request's model."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
    from opentelemetry.trace import get_current_span

    class SettingSampler(Sampler):
        def should_sample(
            self, parent_context, trace_id, name, kind=None, attributes=None, links=None, trace_state=None
        ) -> SamplingResult:
            parent = get_current_span(parent_context).get_span_context()
            if parent.is_valid and not parent.is_remote:  # a child of our own root: as the root
                sampled = parent.trace_flags.sampled
            elif tracing.setting(str((attributes or {}).get("hrnet.model", ""))).level == "OFF":
                sampled = False
            elif parent.is_valid:  # the caller decided
                sampled = parent.trace_flags.sampled
            else:
                ratio = tracing.setting(str((attributes or {}).get("hrnet.model", ""))).ratio
                sampled = (trace_id & _LOW_64) < ratio * _TWO_64
            decision = Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP
            return SamplingResult(decision, attributes if sampled else None, trace_state)

        def get_description(self) -> str:
            return "hrnet TraceSetting (parent-based, trace_rate per model)"

    return SettingSampler()


_LOW_64 = (1 << 64) - 1
_TWO_64 = float(1 << 64)


def create(endpoint: str, sample_ratio: float, exporter: Any = None) -> Tracing:
    """Tracing as configured: off without an endpoint (or exporter), else OTLP/gRPC to `endpoint`."""
    if exporter is None and not endpoint:
        return Tracing(sample_ratio)
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    return OtelTracing(sample_ratio, exporter)
