"""The one small interface every backend implements.

A backend is one instance of one model file: `load()` once, then `infer(batch)` from a worker
thread (the batcher calls it off the event loop; it may block), then `close()`. It knows nothing
of batching, queues or gRPC. Heavy libraries are imported inside `load()`, so importing a backend
module costs nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from core.metadata import ModelMetadata
from serving.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output; -1 marks a dimension of any size (the batch)."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


class Backend(ABC):
    """One backend module declares these three and `serving/backends/__init__.py` lists it once."""

    name: ClassVar[str]  # as in config.yaml `backend:`
    suffixes: ClassVar[tuple[str, ...]]  # model file types it runs (`model<suffix>` in a repository)
    platform: ClassVar[str]  # as KServe ModelMetadata reports it
    library: ClassVar[str]  # the module `load()` imports; absent -> the backend is unavailable

    def __init__(self, path: Path, config: ModelConfig) -> None:
        self.path = Path(path)
        self.config = config
        self.input: TensorSpec | None = None
        self.output: TensorSpec | None = None
        self.metadata: ModelMetadata | None = None  # the model card the file carries, if any

    @abstractmethod
    def load(self) -> None:
        """Open the file; fill `input`, `output` and `metadata`. Raise on a missing or corrupt file."""

    @abstractmethod
    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, C, H, W) in the input dtype -> (N, classes) logits. Blocking; thread-safe per instance."""

    def close(self) -> None:  # noqa: B027 - most backends free everything with their objects
        """Release what `load()` acquired."""

    def describe(self) -> str:
        return f"{self.name} {self.path.name}"
