"""Model runtimes behind `Backend`, chosen by file type, availability and config.

Each lives in its own module and imports its library only when a model is loaded, so a server
serving ONNX never imports MindSpore.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from serving.backends.base import Backend, TensorSpec
from serving.config import ModelConfig
from serving.errors import ModelLoadError

BACKENDS: dict[str, str] = {
    "onnxruntime": "serving.backends.onnxrt:OnnxRuntimeBackend",
    "mindspore_lite": "serving.backends.mslite:MindSporeLiteBackend",
    "mindspore": "serving.backends.mindspore_graph:MindSporeBackend",
}
LIBRARIES = {"onnxruntime": "onnxruntime", "mindspore_lite": "mindspore_lite", "mindspore": "mindspore"}
# Backends able to run each file type, in order of preference for `backend: auto`.
BY_SUFFIX: dict[str, tuple[str, ...]] = {
    ".onnx": ("onnxruntime",),
    ".mindir": ("mindspore_lite", "mindspore"),
}
MODEL_FILES = tuple(f"model{suffix}" for suffix in BY_SUFFIX)

__all__ = ["BACKENDS", "BY_SUFFIX", "MODEL_FILES", "Backend", "TensorSpec", "backend_class", "open_backend"]


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run here, or None when it can."""
    library = LIBRARIES[name]
    if importlib.util.find_spec(library) is None:
        return f"the {name} backend needs the Python package {library!r}, which is not installed"
    return None


def backend_class(name: str) -> type[Backend]:
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def choose(path: Path, config: ModelConfig) -> str:
    candidates = BY_SUFFIX.get(path.suffix.lower())
    if candidates is None:
        raise ModelLoadError(f"{path}: unsupported model file type; expected one of {', '.join(BY_SUFFIX)}")
    if config.backend != "auto":
        if config.backend not in candidates:
            raise ModelLoadError(f"{path}: the {config.backend} backend cannot run {path.suffix} files")
        reason = unavailable_reason(config.backend)
        if reason:
            raise ModelLoadError(f"{path}: {reason}")
        return config.backend
    for name in candidates:
        if unavailable_reason(name) is None:
            return name
    raise ModelLoadError(
        f"{path}: no backend installed for {path.suffix}: "
        + "; ".join(unavailable_reason(n) or "" for n in candidates)
    )


def open_backend(path: Path, config: ModelConfig) -> Backend:
    """A loaded instance of the right backend for `path`; ModelLoadError with the reason otherwise."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    backend = backend_class(choose(path, config))(path, config)
    try:
        backend.load()
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path} with {backend.name}: {exc}") from exc
    return backend
