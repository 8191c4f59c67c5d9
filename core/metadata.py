"""The model card that travels with every checkpoint and export.

One record answers everything a consumer needs to use a model correctly: which network, which
classes, and exactly how an image must be prepared (the eval transform it was validated with).
Training writes it into checkpoints, export copies it into ONNX `metadata_props` or a sidecar
JSON next to MINDIR/AIR, and the server and benchmarks read it back, so nobody passes
`--mean`/`--std`/`--labels` flags that could disagree with the weights.

Plain Python only: the client-side install reads this module without MindSpore or onnxruntime.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_FRACTION = 224 / 256  # the seed's eval transform: Resize(256) then CenterCrop(224)

# Key under which the JSON record is stored: in ONNX metadata_props and in checkpoint append_dict.
METADATA_KEY = "hrnet_metadata"
SIDECAR_SUFFIX = ".json"  # model.mindir -> model.mindir.json
SCHEMA_VERSION = 2  # 2 added precision, calibration and validation
# The arithmetic inside an exported graph; its input and output stay fp32 at every precision.
PRECISIONS = ("fp32", "fp16", "int8")


class MetadataError(ValueError):
    """The metadata record is missing, malformed or inconsistent; the message names the field."""


def default_resize(input_size: int) -> int:
    """Short-side resize before the centre crop, following the seed's 256 -> 224 ratio."""
    return round(input_size / DEFAULT_CROP_FRACTION)


@dataclass(frozen=True)
class ModelMetadata:
    """What a model is and how to feed it. Mean and std are on the 0..1 pixel scale."""

    arch: str
    num_classes: int
    input_size: int  # the square crop the network sees
    resize_size: int = 0  # short side before cropping; 0 means default_resize(input_size)
    labels: tuple[str, ...] = ()  # empty means the class indices as strings
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_name: str = "image"
    output_name: str = "logits"
    exporter: str = ""  # "hrnet 0.1.0 / mindspore 2.10.0": who wrote the file
    precision: str = "fp32"  # one of PRECISIONS
    # int8: how the activation ranges were found (method, images, folder)
    calibration: dict[str, Any] = field(default_factory=dict)
    # fp16 / int8: the export's accuracy gate (val folder, images, fp32 and this file's top-1, the limit)
    validation: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise MetadataError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.input_size < 1:
            raise MetadataError(f"input_size must be >= 1, got {self.input_size}")
        if self.resize_size == 0:
            object.__setattr__(self, "resize_size", default_resize(self.input_size))
        if self.resize_size < self.input_size:
            raise MetadataError(
                f"resize_size {self.resize_size} is smaller than input_size {self.input_size}"
            )
        if self.labels and len(self.labels) != self.num_classes:
            raise MetadataError(f"{len(self.labels)} labels given for num_classes={self.num_classes}")
        if self.precision not in PRECISIONS:
            raise MetadataError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise MetadataError(
                f"mean and std need 3 values each, std > 0; got mean={self.mean} std={self.std}"
            )
        object.__setattr__(self, "labels", tuple(str(x) for x in self.labels))
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))

    def label(self, index: int) -> str:
        return self.labels[index] if self.labels else str(index)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MetadataError(f"unknown metadata field(s): {', '.join(unknown)}")
        try:
            record = dict(data)
            for name in ("labels", "mean", "std"):
                if name in record:
                    record[name] = tuple(record[name])
            return cls(**record)
        except TypeError as exc:
            raise MetadataError(f"malformed metadata: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> ModelMetadata:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise MetadataError(f"metadata is not valid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise MetadataError("metadata JSON must be an object")
        return cls.from_dict(data)


def sidecar_path(model_path: str | Path) -> Path:
    path = Path(model_path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def read_sidecar(model_path: str | Path) -> ModelMetadata | None:
    """The sidecar record of a MINDIR/AIR file, or None when the file has none."""
    path = sidecar_path(model_path)
    if not path.exists():
        return None
    return ModelMetadata.from_json(path.read_text(encoding="utf-8"))
