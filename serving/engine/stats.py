"""Cumulative per-model statistics in the shape of KServe's ModelStatistics (Triton's tools read them).

Also the batcher's listener: every executed batch and every dropped request is counted here and
forwarded to Prometheus, so the RPC and the metrics never disagree.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from serving.engine.batcher import BatchRecord
from serving.metrics import ServerMetrics


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    name: str
    version: str
    metrics: ServerMetrics | None = None
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    inference_count: int = 0  # images computed
    execution_count: int = 0  # batches executed
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)  # batch size -> executions
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # Prometheus children by label values, looked up once: `labels()` per request showed in profiles.
    _children: dict[tuple[Any, ...], Any] = field(default_factory=dict, repr=False)

    def _child(self, metric: Any, *extra: str) -> Any:
        key = (id(metric), *extra)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(self.name, self.version, *extra)
        return child

    def snapshot(self) -> ModelStats:
        """A consistent copy for reporting (the batcher's callbacks may run meanwhile)."""
        with self._lock:
            return dataclasses.replace(
                self,
                metrics=None,
                success=dataclasses.replace(self.success),
                fail=dataclasses.replace(self.fail),
                queue=dataclasses.replace(self.queue),
                compute_infer=dataclasses.replace(self.compute_infer),
                batches={k: dataclasses.replace(v) for k, v in self.batches.items()},
                _lock=threading.Lock(),
                _children={},
            )

    def batch_done(self, record: BatchRecord) -> None:
        with self._lock:
            for waited in record.queue_s:
                self.queue.add(waited)
            if record.ok:
                self.execution_count += 1
                self.inference_count += record.size
                self.compute_infer.add(record.compute_s * record.requests, record.requests)
                self.batches.setdefault(record.size, Duration()).add(record.compute_s)
                self.last_inference_ms = int(time.time() * 1000)
        if self.metrics:
            m = self.metrics
            queue = self._child(m.queue_seconds)
            for waited in record.queue_s:
                queue.observe(waited)
            if record.ok:
                self._child(m.compute_seconds).observe(record.compute_s)
                self._child(m.batch_size).observe(record.size)
                self._child(m.images).inc(record.size)
                if record.padding:
                    self._child(m.padding).inc(record.padding)

    def dropped(self, images: int, reason: str) -> None:
        # KServe's statistics have no field for them: Prometheus is where drops are counted.
        if self.metrics:
            self._child(self.metrics.dropped, reason).inc(images)

    def instance_replaced(self) -> None:
        if self.metrics:
            self._child(self.metrics.instance_replacements).inc()

    def request_done(self, code: str, seconds: float) -> None:
        with self._lock:
            (self.success if code == "OK" else self.fail).add(seconds)
        if self.metrics:
            self._child(self.metrics.requests, code).inc()
            self._child(self.metrics.request_seconds).observe(seconds)
