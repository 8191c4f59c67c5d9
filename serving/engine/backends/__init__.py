"""Model runtimes behind `Backend`, chosen by file type, availability and config.

Each backend is one module whose class declares its `name`, the file `suffixes` it runs and the
`library` it needs; `REGISTRY` lists them in order of preference for `backend: auto`. Adding a
backend is one new module plus one line here. Backend modules import their heavy library only
in `load()`, so a server serving ONNX never imports MindSpore.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

from serving.config import ModelConfig
from serving.engine.backends.base import Backend, TensorSpec
from serving.errors import ModelLoadError

REGISTRY = (
    "serving.engine.backends.onnxrt:OnnxRuntimeBackend",
    "serving.engine.backends.mslite:MindSporeLiteBackend",
    "serving.engine.backends.mindspore_graph:MindSporeBackend",
)


def _import(reference: str) -> type[Backend]:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


BACKENDS: dict[str, type[Backend]] = {cls.name: cls for cls in map(_import, REGISTRY)}
# The file names a model version folder may hold, in the registry's order: model.onnx, model.mindir.
MODEL_FILES = tuple(dict.fromkeys(f"model{s}" for cls in BACKENDS.values() for s in cls.suffixes))

__all__ = ["BACKENDS", "MODEL_FILES", "Backend", "TensorSpec", "backend_names", "open_backend"]


def backend_names() -> list[str]:
    return list(BACKENDS)


def unavailable_reason(cls: type[Backend]) -> str | None:
    """Why backend `cls` cannot run here, or None when it can."""
    if importlib.util.find_spec(cls.library) is None:
        return f"the {cls.name} backend needs the Python package {cls.library!r}, which is not installed"
    return None


def choose(path: Path, config: ModelConfig) -> type[Backend]:
    suffix = path.suffix.lower()
    candidates = [cls for cls in BACKENDS.values() if suffix in cls.suffixes]
    if not candidates:
        known = ", ".join(dict.fromkeys(s for cls in BACKENDS.values() for s in cls.suffixes))
        raise ModelLoadError(f"{path}: unsupported model file type; expected one of {known}")
    if config.backend != "auto":
        chosen = BACKENDS.get(config.backend)
        if chosen is None:
            raise ModelLoadError(
                f"unknown backend {config.backend!r}; use auto or one of {', '.join(BACKENDS)}"
            )
        if chosen not in candidates:
            raise ModelLoadError(f"{path}: the {config.backend} backend cannot run {path.suffix} files")
        reason = unavailable_reason(chosen)
        if reason:
            raise ModelLoadError(f"{path}: {reason}")
        return chosen
    for cls in candidates:
        if unavailable_reason(cls) is None:
            return cls
    reasons = "; ".join(unavailable_reason(cls) or "" for cls in candidates)
    raise ModelLoadError(f"{path}: no backend installed for {path.suffix}: {reasons}")


def open_backend(path: Path, config: ModelConfig, device_id: int = 0, buckets: Sequence[int] = ()) -> Backend:
    """A loaded instance of the right backend for `path` on accelerator `device_id`, told the batch
    buckets it will be warmed up with; ModelLoadError with the reason otherwise."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    backend = choose(path, config)(path, config, device_id, buckets)
    try:
        backend.load()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path} with {backend.name}: {exc}") from exc
    return backend
