"""Typed results: what the server said, plus what the client measured (latency)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clients.errors import ClientError


@dataclass(frozen=True)
class Prediction:
    """One class of one image."""

    index: int
    label: str
    score: float  # softmax probability


@dataclass(frozen=True)
class Classification:
    """The top-k classes of one image, best first.

    `label`, `index` and `score` are the top class's, so the common case reads
    `client.classify("cat.jpg").label`.
    """

    predictions: tuple[Prediction, ...]
    model_name: str
    model_version: str
    latency_s: float  # round trip of the RPC that returned this result (shared by a request's images)

    @property
    def top(self) -> Prediction:
        return self.predictions[0]

    @property
    def label(self) -> str:
        return self.top.label

    @property
    def index(self) -> int:
        return self.top.index

    @property
    def score(self) -> float:
        return self.top.score


@dataclass(frozen=True)
class StreamResult:
    """One item of `classify_stream`, in input order: a classification or the error for that item.

    A bad item does not end the stream, so the error travels with the item instead of being raised.
    """

    index: int  # position in the input iterable
    classification: Classification | None
    error: ClientError | None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class InferResult:
    """The raw outputs of one ModelInfer call, as arrays keyed by output name."""

    outputs: dict[str, np.ndarray]
    model_name: str
    model_version: str
    latency_s: float

    @property
    def output(self) -> np.ndarray:
        """The only output (a classifier has one: the logits)."""
        if len(self.outputs) != 1:
            raise ValueError(
                f"the model has {len(self.outputs)} outputs ({', '.join(self.outputs)}); pick one"
            )
        return next(iter(self.outputs.values()))


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1 marks a variable dimension


@dataclass(frozen=True)
class ModelInfo:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class Health:
    """Liveness and readiness as the server reports them (KServe ServerLive / ServerReady / ModelReady)."""

    live: bool
    ready: bool
    model_ready: bool
