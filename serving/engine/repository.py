"""The model repository on disk and the metadata each model is served with.

Layout: `REPO/<model>/<version>/model.onnx|model.mindir`, versions are positive integers, and
an optional `REPO/<model>/config.yaml` tunes the model, its version policy included. A scan
never raises for one bad model: each folder's problems are recorded with their paths, so one
broken model cannot keep the others from serving (`serving.engine.control` decides what to load).
Folders whose names start with "." are ignored: an upload can land in `REPO/m/.incoming/`
and be renamed to `REPO/m/3/` when complete. Nothing is read from outside the repository:
`model_path` is the one way from a model name (and version) to a path, and a symlink that
leads out is refused like a `../` in a name.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import ConfigError
from core.metadata import MetadataError, ModelMetadata
from serving.config import ModelConfig, load_model_config
from serving.engine.backends import MODEL_FILES, Backend
from serving.errors import ModelLoadError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CONFIG_FILE = "config.yaml"
# What a version's files looked like: (name, size, mtime_ns) of each, its model's config.yaml
# included. Equal fingerprints on two scans mean nothing was being written in between.
Fingerprint = tuple[tuple[str, int, int], ...]


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


@dataclass(frozen=True)
class ModelFolder:
    """One model folder as a scan found it: what can be loaded and what is wrong, by version."""

    name: str
    config: ModelConfig | None  # None when the folder itself is unusable (see `error`)
    sources: dict[str, ModelSource] = field(default_factory=dict)  # loadable versions
    problems: dict[str, str] = field(default_factory=dict)  # version -> why it cannot load
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)  # every version folder
    error: str = ""  # why no version of this model can load (bad name, bad config.yaml, ...)

    @property
    def versions(self) -> list[str]:
        """Every version folder present, loadable or not, oldest first."""
        return sorted(self.fingerprints, key=int)

    def wanted(self) -> list[str]:
        """The versions the model's version policy names, out of those present."""
        if self.config is None:
            return []
        chosen = self.config.version_policy.select([int(v) for v in self.versions])
        return [str(v) for v in chosen]


def model_names(repo: Path) -> list[str]:
    """The model folders of `repo`; ModelLoadError when `repo` is not a directory at all."""
    if not repo.is_dir():
        raise ModelLoadError(f"model repository {repo} is not a directory")
    return sorted(p.name for p in repo.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_repository(repo: Path, defaults: ModelConfig) -> list[ModelFolder]:
    return [scan_model(repo, name, defaults) for name in model_names(repo)]


def scan_model(repo: Path, name: str, defaults: ModelConfig) -> ModelFolder:
    """What `REPO/<name>/` holds now. A missing folder is a ModelFolder with `error` set."""
    try:
        model_dir = model_path(repo, name)
        if not model_dir.is_dir():
            return ModelFolder(name, None, error=f"{model_dir} does not exist")
        config = load_model_config(defaults, inside(repo, model_dir / CONFIG_FILE))
    except (ConfigError, ModelLoadError) as exc:
        return ModelFolder(name, None, error=str(exc))
    try:
        return _scan_versions(repo, model_dir, ModelFolder(name, config))
    except OSError as exc:  # the folder changed under the scan (being removed or replaced)
        return ModelFolder(name, None, error=f"{model_dir}: cannot read: {exc.strerror or exc}")


def _scan_versions(repo: Path, model_dir: Path, folder: ModelFolder) -> ModelFolder:
    config = folder.config
    assert config is not None
    shared = _files(model_dir, (CONFIG_FILE,))
    for version_dir in (p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()):
        version = str(int(version_dir.name))
        if version == "0" or version in folder.fingerprints:
            folder.problems[version] = f"{version_dir}: versions are positive integers, each once"
            continue
        folder.fingerprints[version] = shared + _files(version_dir)
        files = [version_dir / f for f in MODEL_FILES if (version_dir / f).is_file()]
        if len(files) == 1:
            try:
                folder.sources[version] = ModelSource(folder.name, version, inside(repo, files[0]), config)
            except ModelLoadError as exc:
                folder.problems[version] = str(exc)
        else:
            folder.problems[version] = (
                f"{version_dir}: expected exactly one of {', '.join(MODEL_FILES)}, found "
                f"{', '.join(f.name for f in files) or 'none'}"
            )
    if not folder.fingerprints:
        return dataclasses.replace(
            folder, error=f"{model_dir}: no version folders (expected {model_dir}/1/model.onnx)"
        )
    if not folder.wanted():
        policy = config.version_policy.describe()
        return dataclasses.replace(
            folder,
            error=f"{model_dir}: the version policy ({policy}) names none of the versions present "
            f"({', '.join(folder.versions)})",
        )
    return folder


def _files(folder: Path, only: tuple[str, ...] = ()) -> Fingerprint:
    found = []
    for path in sorted(folder.iterdir()):
        if (only and path.name not in only) or not path.is_file():
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed while scanning: the next scan sees the change
            continue
        found.append((f"{folder.name}/{path.name}", stat.st_size, stat.st_mtime_ns))
    return tuple(found)


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
