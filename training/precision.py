"""INT8 and FP16 versions of an fp32 ONNX export, and the accuracy gate that lets them out.

Both start from onnxruntime's pre-processing of the fp32 graph (constant folding, BatchNorm fused
into the convolutions, shapes inferred), so no BatchNorm is left to run in reduced precision.

INT8 is onnxruntime's static quantization in QDQ form: uint8 activations with ranges calibrated
on real images, int8 weights per output channel. Weights use 7 bits (`reduce_range`): x86 CPUs
without VNNI multiply uint8 by int8 with a saturating 16-bit add, and a file calibrated where
VNNI exists would lose accuracy where it does not (Intel Neural Compressor measured the same
QDQ ResNet50 at 74.76% top-1 on an Intel c6i and 68.95% on an AMD c6a). 7-bit weights cannot
saturate, so the gate's figure holds on every CPU.

FP16 stores weights and computes in half precision with fp32 input and output (Cast nodes at the
edges), so clients and the server's preprocessing are unchanged.

The calibration images and the val set go through training's MindSpore eval pipeline (the one
the server's preprocessing is tested against pixel for pixel), and the ONNX files run in
onnxruntime, exactly as they will be served.
"""

from __future__ import annotations

import importlib.util
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from tqdm import tqdm

from core.metadata import ModelMetadata
from training.data import check_eval_folder, eval_dataset, files_dataset, sample_images

REDUCED = ("fp16", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_CALIB_COUNT = 500
DEFAULT_MAX_DROP = 0.5  # top-1 percentage points
GATE_BATCH = 16
# The calibrator holds every activation of one batch at once: for W18-small-v1 at 224 px that
# measured 1.5 GiB above the export's peak with 16 images and 0.2 GiB with 4; W48 has several
# times its activations.
CALIB_BATCH = 4


@dataclass(frozen=True)
class Calibration:
    """Where INT8 activation ranges come from: `count` images of `folder`, summarised by `method`."""

    folder: Path
    count: int = DEFAULT_CALIB_COUNT
    method: str = "minmax"

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"--calib-count must be >= 1, got {self.count}")
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(
                f"unknown calibration method {self.method!r}; choose one of {', '.join(CALIBRATION_METHODS)}"
            )


@dataclass(frozen=True)
class Reduction:
    """A reduced-precision export: the precision, its calibration (int8) and the accuracy gate."""

    precision: str
    val: Path
    max_drop: float = DEFAULT_MAX_DROP
    calibration: Calibration | None = None

    def __post_init__(self) -> None:
        if self.precision not in REDUCED:
            raise ValueError(f"cannot reduce to {self.precision!r}; choose one of {', '.join(REDUCED)}")
        if self.precision == "int8" and self.calibration is None:
            raise ValueError("--precision int8 needs calibration images: --calib DIR")
        if self.precision != "int8" and self.calibration is not None:
            raise ValueError(f"--calib applies to int8 only, not {self.precision}")
        if self.max_drop < 0:
            raise ValueError(f"--max-drop must be >= 0 (top-1 points), got {self.max_drop}")

    def check_inputs(self, metadata: ModelMetadata) -> None:
        """Refuse what cannot work before the slow part: no onnxruntime, unusable val or calib folders."""
        if importlib.util.find_spec("onnxruntime") is None:
            raise ValueError(
                f"--precision {self.precision} runs onnxruntime, not installed here "
                "(pip install 'hrnet[serve]', or 'hrnet[gpu]')"
            )
        check_eval_folder(self.val, metadata)
        if self.calibration is not None:
            sample_images(self.calibration.folder, self.calibration.count)


@dataclass(frozen=True)
class GateResult:
    """Top-1 of the fp32 and the reduced model on the same val images."""

    precision: str
    images: int
    top1_fp32: float
    top1: float
    max_drop: float  # points

    @property
    def drop(self) -> float:
        """In top-1 percentage points; negative when the reduced model scored higher."""
        return 100.0 * (self.top1_fp32 - self.top1)

    @property
    def passed(self) -> bool:
        return self.drop <= self.max_drop + 1e-9

    def summary(self) -> str:
        return (
            f"val top-1 on {self.images} images: fp32 {100 * self.top1_fp32:.2f}%, "
            f"{self.precision} {100 * self.top1:.2f}% "
            f"(drop {self.drop:.2f} points, limit {self.max_drop:.2f})"
        )

    def record(self, val: Path) -> dict[str, Any]:
        """What the model card keeps of the gate."""
        return {
            "val": str(val),
            "images": self.images,
            "top1_fp32": round(self.top1_fp32, 6),
            "top1": round(self.top1, 6),
            "max_drop_points": self.max_drop,
        }


class _Batches:
    """onnxruntime's CalibrationDataReader over preprocessed batches, one `set_range` at a time.

    quantize_static with `CalibStridedMinMax` = 1 asks for one batch per pass, so the calibrator
    holds the activations of one batch at once (with any method, not only minmax).
    """

    def __init__(self, input_name: str, batches: list[np.ndarray], progress: tqdm) -> None:
        self.input_name = input_name
        self.batches = batches
        self.progress = progress
        self.pending: Iterator[np.ndarray] = iter(batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.pending = iter(self.batches[start_index:end_index])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.pending, None)
        if batch is None:
            return None
        self.progress.update(len(batch))
        return {self.input_name: batch}


def _fold(src: Path, dst: Path) -> None:
    """onnxruntime's pre-processing: constant folding, Conv+BatchNorm fusion, ONNX shape inference.

    Its symbolic shape inference (for transformers; it needs sympy) adds nothing to a CNN's shapes.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def calibration_batches(calibration: Calibration, metadata: ModelMetadata) -> tuple[list[np.ndarray], int]:
    """The calibration images, preprocessed by the eval transform, and how many there are."""
    files = sample_images(calibration.folder, calibration.count)
    dataset = files_dataset(files, metadata, CALIB_BATCH)
    batches = [image for (image,) in dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)]
    return batches, len(files)


def quantize_int8(
    fp32: Path, out: Path, metadata: ModelMetadata, calibration: Calibration, work: Path
) -> dict[str, Any]:
    """Write the INT8 (QDQ) model to `out`; returns the calibration record for the model card."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    batches, images = calibration_batches(calibration, metadata)
    folded = work / "folded.onnx"
    _fold(fp32, folded)
    with tqdm(total=images, desc=f"calibrating ({calibration.method})", unit="img") as progress:
        quantize_static(
            str(folded),
            str(out),
            _Batches(metadata.input_name, batches, progress),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[calibration.method],
            extra_options={"CalibStridedMinMax": 1},
        )
    return {"method": calibration.method, "images": images, "folder": str(calibration.folder)}


def convert_fp16(fp32: Path, out: Path, work: Path) -> None:
    """Write the FP16 model (fp32 input and output) to `out`."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    folded = work / "folded.onnx"
    _fold(fp32, folded)
    model = convert_float_to_float16(onnx.load(str(folded)), keep_io_types=True)
    OnnxModel.graph_topological_sort(model.graph)  # the input Casts were appended after their consumers
    onnx.save(model, str(out))


def score_top1(
    models: dict[str, Path], val: Path, metadata: ModelMetadata, desc: str = "scoring"
) -> tuple[int, dict[str, float]]:
    """Top-1 of each ONNX model on the ImageFolder `val`; every batch is decoded once for all of them."""
    import onnxruntime as ort

    sessions = {
        name: ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for name, path in models.items()
    }
    dataset = eval_dataset(val, metadata, GATE_BATCH)
    correct = dict.fromkeys(models, 0)
    total = 0
    batches = dataset.create_tuple_iterator(num_epochs=1, output_numpy=True)
    for image, label in tqdm(batches, total=dataset.get_dataset_size(), desc=desc, unit="batch"):
        for name, session in sessions.items():
            logits = session.run(None, {metadata.input_name: image})[0]
            correct[name] += int((logits.argmax(axis=1) == label).sum())
        total += len(label)
    if total == 0:
        raise ValueError(f"{val} holds no images to score")
    return total, {name: hits / total for name, hits in correct.items()}


def gate(fp32: Path, reduced: Path, reduction: Reduction, metadata: ModelMetadata) -> GateResult:
    """Score both models on the val set; the caller writes the reduced one only when the result passed."""
    name = reduction.precision
    images, top1 = score_top1(
        {"fp32": fp32, name: reduced}, reduction.val, metadata, desc=f"gate: fp32 vs {name}"
    )
    return GateResult(name, images, top1["fp32"], top1[name], reduction.max_drop)


def reduce_model(fp32: Path, out: Path, reduction: Reduction, metadata: ModelMetadata) -> dict[str, Any]:
    """Write the reduced version of the fp32 ONNX file `fp32` to `out`; returns its calibration record."""
    with tempfile.TemporaryDirectory(prefix="hrnet-fold-") as work:
        if reduction.calibration is not None:
            return quantize_int8(fp32, out, metadata, reduction.calibration, Path(work))
        convert_fp16(fp32, out, Path(work))
        return {}
