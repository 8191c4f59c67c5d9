"""`hrnet export`: an eval-mode network as ONNX, MINDIR or AIR, carrying its model card.

Every export describes itself (architecture, classes, labels, preprocessing, precision) so the
server needs no flags: ONNX holds the record in `metadata_props`, MINDIR and AIR get a sidecar
JSON beside them. A dynamic batch is the default, so one file serves any batch the dynamic
batcher forms. ONNX may also be reduced to INT8 or FP16 (`training.precision`); such a file is
written only after it scored within `--max-drop` top-1 points of the fp32 model on a val set.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import mindspore as ms
import numpy as np
import onnx
from mindspore import nn

from core import __version__
from core.atomic import atomic_path
from core.errors import CommandError
from core.metadata import PRECISIONS, ModelMetadata, sidecar_path
from training.checkpoint import load_into, read_checkpoint
from training.model import canonical_arch, create_model
from training.onnx_graph import BakedBatchError, attach_metadata, check_graph, finish_graph, read_metadata
from training.precision import (
    CALIBRATION_METHODS,
    DEFAULT_CALIB_COUNT,
    DEFAULT_MAX_DROP,
    Calibration,
    GateResult,
    Reduction,
    gate,
    reduce_model,
)
from training.runs import EXPORTS_DIR, run_folder

log = logging.getLogger(__name__)

SUFFIXES = {"ONNX": ".onnx", "MINDIR": ".mindir", "AIR": ".air"}
ONNX_EXPORT_BATCH = 2  # traced batch of a dynamic ONNX export; the finished graph is checked to be batch-free
DEFAULT_INPUT_SIZE = 224


class ExportError(ValueError):
    """The export cannot be done as asked (format, device, existing output, inconsistent arguments)."""


class AccuracyGateError(ExportError):
    """The reduced-precision model lost more top-1 than allowed; nothing was written."""


def exporter_version() -> str:
    return f"hrnet {__version__} / mindspore {ms.__version__}"


def check_format(fmt: str) -> str:
    """The canonical format name; AIR is refused off Ascend here, before anything is loaded."""
    name = fmt.upper()
    if name not in SUFFIXES:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(SUFFIXES)}")
    if name == "AIR":
        target = ms.get_context("device_target")
        if target != "Ascend":
            raise ExportError(
                f"AIR export needs an Ascend device (MindSpore's device target here is {target}); "
                "export MINDIR or ONNX instead"
            )
    return name


def _check_request(
    fmt: str, out: Path, batch: int | None, force: bool, reduction: Reduction | None = None
) -> str:
    name = check_format(fmt)
    if batch is not None and batch < 1:
        raise ExportError(f"batch must be >= 1 or dynamic, got {batch}")
    if reduction is not None and name != "ONNX":
        raise ExportError(f"--precision {reduction.precision} is for ONNX exports; {name} is written in fp32")
    if reduction is not None and batch is not None:
        raise ExportError(
            f"--precision {reduction.precision} exports a dynamic batch (the accuracy gate runs "
            "batches of its own size); drop --batch"
        )
    if name == "AIR" and batch is None:
        raise ExportError(
            "AIR export needs a fixed --batch N (ATC adds dynamic batch profiles when it builds the OM)"
        )
    if not force:
        for path in (out, sidecar_path(out)) if name != "ONNX" else (out,):
            if path.exists():
                raise ExportError(f"{path} exists (pass --force to overwrite)")
    return name


@contextlib.contextmanager
def _eval_mode(net: nn.Cell) -> Iterator[nn.Cell]:
    was_training = net.training
    net.set_train(False)
    try:
        yield net
    finally:
        net.set_train(was_training)


def export_network(
    net: nn.Cell, metadata: ModelMetadata, fmt: str, out: Path, batch: int | None = None, force: bool = False
) -> Path:
    """Export `net` (fp32, put in eval mode for the export) with `metadata`; None as batch means dynamic."""
    out = Path(out)
    name = _check_request(fmt, out, batch, force)
    classes = getattr(net, "num_classes", metadata.num_classes)
    if classes != metadata.num_classes:
        raise ExportError(f"the network has {classes} classes but the metadata says {metadata.num_classes}")
    metadata = replace(metadata, exporter=exporter_version())
    log.info("exporting %s as %s (batch %s)", metadata.arch, name, batch or "dynamic")
    with _eval_mode(net):
        if name == "ONNX":
            _export_onnx(net, metadata, out, batch, force)
        else:
            _export_graph(net, metadata, name, out, batch, force)
    log.info(
        "exported %s (%s, batch %s, %.1f MiB)", out, name, batch or "dynamic", out.stat().st_size / 2**20
    )
    return out


def _export_onnx(net: nn.Cell, metadata: ModelMetadata, out: Path, batch: int | None, force: bool) -> None:
    size = metadata.input_size
    traced = ms.Tensor(np.zeros((batch or ONNX_EXPORT_BATCH, 3, size, size), np.float32))
    dynamic = {metadata.input_name: {0: "batch"}} if batch is None else None
    with atomic_path(out, overwrite=force) as tmp:
        raw = tmp.with_name(tmp.name + ".onnx")  # MindSpore appends .onnx to names without it
        try:
            ms.onnx.export(
                net,
                traced,
                file_name=str(raw),
                input_names=[metadata.input_name],
                output_names=[metadata.output_name],
                dynamic_axes=dynamic,
            )
            model = finish_graph(onnx.load(str(raw)), metadata, batch)
        finally:
            raw.unlink(missing_ok=True)
        onnx.save(model, str(tmp))


def _export_graph(
    net: nn.Cell, metadata: ModelMetadata, name: str, out: Path, batch: int | None, force: bool
) -> None:
    size = metadata.input_size
    signature = ms.Tensor(shape=[batch, 3, size, size], dtype=ms.float32)
    suffix = SUFFIXES[name]
    # Both files are complete before either is renamed into place: the sidecar lands first, the model last.
    with (
        atomic_path(out, overwrite=force) as tmp,
        atomic_path(sidecar_path(out), overwrite=force) as tmp_card,
    ):
        raw = tmp.with_name(tmp.name + suffix)  # MindSpore appends the format's suffix to names without it
        try:
            ms.export(net, signature, file_name=str(raw), file_format=name)
            raw.replace(tmp)
        finally:
            raw.unlink(missing_ok=True)
        tmp_card.write_text(metadata.to_json(), encoding="utf-8")


def read_onnx_metadata(path: str | Path) -> ModelMetadata | None:
    """The model card of an exported ONNX file, or None when it carries none."""
    return read_metadata(path)


def checkpoint_metadata(ckpt_metadata: ModelMetadata | None, params: dict, arch: str | None) -> ModelMetadata:
    """The checkpoint's own record; `arch` must agree with it, and is required when there is none."""
    if ckpt_metadata is None:
        if arch is None:
            raise ExportError("the checkpoint carries no metadata; pass --arch")
        weight = params.get("classifier.weight")
        if weight is None:
            raise ExportError("the checkpoint has no classifier.weight; is it an HRNet classifier?")
        return ModelMetadata(
            arch=canonical_arch(arch), num_classes=int(weight.shape[0]), input_size=DEFAULT_INPUT_SIZE
        )
    if arch is not None and canonical_arch(arch) != canonical_arch(ckpt_metadata.arch):
        raise ExportError(f"--arch {arch} contradicts the checkpoint, which holds {ckpt_metadata.arch}")
    return ckpt_metadata


def _load_network(ckpt: Path, arch: str | None) -> tuple[nn.Cell, ModelMetadata]:
    """The network a checkpoint describes, loaded strictly, and the checkpoint's model card."""
    loaded = read_checkpoint(ckpt)
    metadata = checkpoint_metadata(loaded.metadata, loaded.params, arch)
    net = create_model(metadata.arch, metadata.num_classes)
    load_into(net, loaded.params)
    return net, metadata


def export_checkpoint(
    ckpt: Path, fmt: str, out: Path, arch: str | None = None, batch: int | None = None, force: bool = False
) -> Path:
    """Build the network a checkpoint describes, load it strictly and export it."""
    out = Path(out)
    _check_request(fmt, out, batch, force)
    net, metadata = _load_network(ckpt, arch)
    return export_network(net, metadata, fmt, out, batch=batch, force=force)


def export_reduced(
    net: nn.Cell, metadata: ModelMetadata, out: Path, reduction: Reduction, force: bool = False
) -> GateResult:
    """Export `net` as fp32 ONNX into a temporary folder, then `reduce_export` it to `out`."""
    out = Path(out)
    _check_request("ONNX", out, None, force, reduction)
    reduction.check_inputs(metadata)
    with tempfile.TemporaryDirectory(prefix="hrnet-export-") as work:
        fp32 = export_network(net, metadata, "ONNX", Path(work) / "fp32.onnx")
        return reduce_export(fp32, out, reduction, force)


def reduce_export(fp32: Path, out: Path, reduction: Reduction, force: bool = False) -> GateResult:
    """Reduce an fp32 ONNX export of ours and write it to `out` only if it passes the accuracy gate.

    Raises AccuracyGateError, carrying both top-1 figures, when the drop exceeds
    `reduction.max_drop`; `out` is then left as it was.
    """
    out = Path(out)
    metadata = read_onnx_metadata(fp32)
    if metadata is None or metadata.precision != "fp32":
        found = "no model card" if metadata is None else f"a {metadata.precision} model"
        raise ExportError(f"{fp32} is not an fp32 export of hrnet ({found})")
    _check_request("ONNX", out, None, force, reduction)
    reduction.check_inputs(metadata)
    with tempfile.TemporaryDirectory(prefix="hrnet-reduce-") as work:
        reduced = Path(work) / f"{reduction.precision}.onnx"
        calibration = reduce_model(fp32, reduced, reduction, metadata)
        result = gate(fp32, reduced, reduction, metadata)
        log.info("%s", result.summary())
        if not result.passed:
            hint = " (more calibration images or another --calib-method may help)" if calibration else ""
            raise AccuracyGateError(f"refused, {result.summary()}; {out} not written{hint}")
        card = replace(
            metadata,
            precision=reduction.precision,
            calibration=calibration,
            validation=result.record(reduction.val),
        )
        model = check_graph(attach_metadata(onnx.load(str(reduced)), card), batch=None)
        with atomic_path(out, overwrite=force) as tmp:
            onnx.save(model, str(tmp))
    log.info("exported %s (ONNX %s, %.1f MiB)", out, reduction.precision, out.stat().st_size / 2**20)
    return result


def parse_batch(text: str) -> int | None:
    if text.lower() == "dynamic":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'dynamic' or a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"batch must be >= 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", type=Path, required=True, help="MindSpore checkpoint (.ckpt)")
    parser.add_argument("--arch", help="architecture; needed only when the checkpoint carries no metadata")
    parser.add_argument(
        "--format", required=True, type=str.upper, choices=list(SUFFIXES), help="output format"
    )
    parser.add_argument(
        "--batch",
        type=parse_batch,
        default=None,
        metavar="dynamic|N",
        help="batch dimension of the exported graph (default: dynamic)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output file (default: the checkpoint's name with the format's suffix, e.g. model.int8.onnx)",
    )
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    reduced = parser.add_argument_group("reduced precision (ONNX; written only when it passes the gate)")
    reduced.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="arithmetic inside the graph (default fp32)"
    )
    reduced.add_argument(
        "--val", type=Path, metavar="DIR", help="ImageFolder val set the gate scores fp32 and fp16/int8 on"
    )
    reduced.add_argument(
        "--max-drop",
        type=float,
        default=DEFAULT_MAX_DROP,
        metavar="POINTS",
        help=f"largest top-1 loss allowed, in percentage points (default {DEFAULT_MAX_DROP})",
    )
    reduced.add_argument(
        "--calib", type=Path, metavar="DIR", help="int8: calibration images (ImageFolder or flat folder)"
    )
    reduced.add_argument(
        "--calib-count",
        type=int,
        default=DEFAULT_CALIB_COUNT,
        metavar="N",
        help=f"int8: calibration images used, spread over the classes (default {DEFAULT_CALIB_COUNT})",
    )
    reduced.add_argument(
        "--calib-method",
        choices=CALIBRATION_METHODS,
        default="minmax",
        help="int8: how activation ranges are taken from the calibration images (default minmax)",
    )


def _reduction(args: argparse.Namespace) -> Reduction | None:
    if args.precision == "fp32":
        given = [flag for flag, value in (("--val", args.val), ("--calib", args.calib)) if value is not None]
        if given:
            raise ExportError(f"{', '.join(given)} applies to --precision fp16 or int8 only")
        return None
    if args.val is None:
        raise ExportError(f"--precision {args.precision} needs --val DIR: the accuracy gate scores on it")
    calibration = None
    if args.calib is not None:
        calibration = Calibration(args.calib, args.calib_count, args.calib_method)
    return Reduction(args.precision, args.val, args.max_drop, calibration)


def _default_out(args: argparse.Namespace) -> Path:
    """The checkpoint's name with the format's suffix: in the run's exports/ folder for a checkpoint
    of a training run (not among its checkpoints, which rotate), else beside the checkpoint."""
    suffix = SUFFIXES[args.format]
    if args.precision != "fp32":
        suffix = f".{args.precision}{suffix}"
    run = run_folder(args.ckpt)
    folder = run / EXPORTS_DIR if run else args.ckpt.parent
    return folder / (args.ckpt.stem + suffix)


def run(args: argparse.Namespace) -> int:
    out = args.out or _default_out(args)
    try:
        reduction = _reduction(args)
        if reduction is None:
            path = export_checkpoint(
                args.ckpt, args.format, out, arch=args.arch, batch=args.batch, force=args.force
            )
        else:
            _check_request(args.format, out, args.batch, args.force, reduction)
            net, metadata = _load_network(args.ckpt, args.arch)
            print(export_reduced(net, metadata, out, reduction, force=args.force).summary())
            path = out
    except (ValueError, BakedBatchError, FileNotFoundError, FileExistsError) as exc:
        # ValueError covers ExportError, AccuracyGateError, MetadataError, unknown architectures and
        # unreadable checkpoints.
        raise CommandError(str(exc)) from exc
    print(path)
    return 0
