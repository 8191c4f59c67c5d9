"""The model repository on disk and the metadata each model is served with.

Layout: `REPO/<model>/<version>/model.onnx|model.mindir`, versions are positive integers, the
newest is the default, and an optional `REPO/<model>/config.yaml` tunes the model. Problems are
reported at start, all of them naming the path, so a bad deployment never half-starts. Nothing
is read from outside the repository: `model_path` is the one way from a model name (and version)
to a path, and a symlink that leads out is refused like a `../` in a name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from core.metadata import MetadataError, ModelMetadata
from serving.backends import MODEL_FILES, Backend
from serving.config import ModelConfig, load_model_config
from serving.errors import ModelLoadError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ModelSource:
    name: str
    version: str
    path: Path
    config: ModelConfig


def model_path(repo: Path, name: str, version: str = "") -> Path:
    """REPO/<name>[/<version>], for names and versions that may come from a caller.

    A name is one plain path component (no `/`, `..` or absolute path) and a version digits only;
    the path, symlinks followed, must stay inside the repository.
    """
    if not NAME.match(name):
        raise ModelLoadError(f"model name {name[:80]!r}: use letters, digits, '_', '-' and '.'")
    if version and not version.isdigit():
        raise ModelLoadError(f"model {name!r} version {version[:80]!r}: versions are positive integers")
    path = repo / name / version if version else repo / name
    return inside(repo, path)


def inside(repo: Path, path: Path) -> Path:
    """`path` itself, refused (ModelLoadError) when it resolves to somewhere outside `repo`."""
    resolved, root = path.resolve(), repo.resolve()
    if not resolved.is_relative_to(root):
        raise ModelLoadError(f"{path} leads to {resolved}, outside the model repository {root}")
    return path


def scan_repository(repo: Path, defaults: ModelConfig) -> list[ModelSource]:
    if not repo.is_dir():
        raise ModelLoadError(f"model repository {repo} is not a directory")
    sources: list[ModelSource] = []
    for model_dir in sorted(p for p in repo.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not NAME.match(model_dir.name):
            raise ModelLoadError(f"{model_dir}: model names use letters, digits, '_', '-' and '.'")
        model_path(repo, model_dir.name)
        config = load_model_config(defaults, inside(repo, model_dir / "config.yaml"))
        versions = sorted(
            (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=_version_key
        )
        if not versions:
            raise ModelLoadError(f"{model_dir}: no version folders (expected {model_dir}/1/model.onnx)")
        for version_dir in versions:
            files = [version_dir / f for f in MODEL_FILES if (version_dir / f).is_file()]
            if len(files) != 1:
                raise ModelLoadError(
                    f"{version_dir}: expected exactly one of {', '.join(MODEL_FILES)}, found "
                    f"{', '.join(f.name for f in files) or 'none'}"
                )
            inside(repo, files[0])
            sources.append(ModelSource(model_dir.name, str(int(version_dir.name)), files[0], config))
    if not sources:
        raise ModelLoadError(f"model repository {repo} holds no models (expected REPO/<model>/1/model.onnx)")
    return sources


def _version_key(path: Path) -> int:
    return int(path.name)


def default_model_name(path: Path) -> str:
    """The file's stem, or for `model.onnx` its model folder (REPO/<model>/<version>/ or <model>/)."""
    if path.stem != "model":
        return path.stem
    return (path.parent.parent if path.parent.name.isdigit() else path.parent).name


def single_model(path: Path, name: str, config: ModelConfig) -> ModelSource:
    """`hrnet serve --model file.onnx`: one model, version 1, named after the file (or its model folder)."""
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist")
    name = name or default_model_name(path)
    if not NAME.match(name):
        raise ModelLoadError(f"model name {name!r}: use letters, digits, '_', '-' and '.' (--model-name)")
    return ModelSource(name, "1", path, config)


def resolve_metadata(backend: Backend, config: ModelConfig) -> ModelMetadata:
    """The model card to serve with: the file's own, else derived from its shapes, then overridden.

    A model without our metadata (any ONNX image classifier) gets its input size from its input
    shape, ImageNet normalization and numeric labels; `config.yaml` may override each.
    """
    assert backend.input is not None and backend.output is not None
    _, channels, height, width = backend.input.shape
    if channels not in (3, -1):
        raise ModelLoadError(
            f"{backend.path}: input {backend.input.name} has {channels} channels; RGB needs 3"
        )
    meta = backend.metadata
    try:
        if meta is None:
            size = config.input_size or (height if height == width and height > 0 else 0)
            classes = backend.output.shape[-1]
            if not size:
                raise ModelLoadError(
                    f"{backend.path}: input shape {list(backend.input.shape)} is not a fixed square; "
                    "set input_size in the model's config.yaml"
                )
            if classes < 1:
                classes = len(config.labels)
            if classes < 1:
                raise ModelLoadError(
                    f"{backend.path}: the output has no fixed class count; set labels in config.yaml"
                )
            meta = ModelMetadata(
                arch="unknown",
                num_classes=classes,
                input_size=size,
                input_name=backend.input.name,
                output_name=backend.output.name,
            )
        overrides = {
            key: value
            for key in ("input_size", "resize_size", "mean", "std", "labels")
            if (value := getattr(config, key))
        }
        if "input_size" in overrides and "resize_size" not in overrides:
            overrides["resize_size"] = 0  # recomputed from the new input size
        meta = dataclasses.replace(meta, **overrides)
    except MetadataError as exc:
        raise ModelLoadError(f"{backend.path}: {exc}") from None
    for dim, axis in ((height, "height"), (width, "width")):
        if dim > 0 and dim != meta.input_size:
            raise ModelLoadError(
                f"{backend.path}: input {axis} is {dim} but the preprocessing input_size is {meta.input_size}"
            )
    return meta
