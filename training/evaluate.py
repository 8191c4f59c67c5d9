"""`hrnet eval`: score a checkpoint on an ImageFolder val set, the seed's way but on every image.

The seed's eval shuffled and dropped the last short batch (16 of ImageNet's 50,000 images were
never scored). Here the val set is read in file order with the remainder kept, and the transform
comes from the checkpoint's own metadata, so it is the one the model was trained for.

`--predictions FILE` also writes every image's top-5 classes by file name, which is what
`hrnet bench accuracy` compares the server's answers with, image by image.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from mindspore import nn
from tqdm import tqdm

from core.atomic import atomic_write_text
from core.errors import CommandError
from core.metadata import MetadataError
from training.checkpoint import load_into, read_checkpoint
from training.context import set_mode_and_device
from training.data import class_names, eval_dataset
from training.loss import LabelSmoothingCrossEntropy
from training.model import create_model

Predictions = list[tuple[int, list[int]]]  # per sample, in dataset order: (label, best classes)


def score(
    net: nn.Cell,
    dataset,
    loss_fn: nn.Cell,
    predictions: Predictions | None = None,
    progress: bool = True,
    desc: str = "eval",
) -> dict[str, float]:
    """{'Loss', 'Top_1_Acc', 'Top_5_Acc'} over every sample of `dataset`; loss averaged per image.

    `predictions`, when given, receives each sample's label and best classes (up to 5, best first).
    A tqdm bar (stderr) counts the batches: graph compilation and a large val set take a while.
    """
    net.set_train(False)
    total, loss_sum, top1, top5 = 0, 0.0, 0, 0
    batches = tqdm(
        dataset.create_tuple_iterator(num_epochs=1),
        total=dataset.get_dataset_size(),
        desc=desc,
        unit="batch",
        disable=not progress,
        leave=False,
    )
    for image, label in batches:
        logits = net(image)
        n = int(label.shape[0])
        loss_sum += float(loss_fn(logits, label).asnumpy()) * n
        scores, truth = logits.asnumpy(), label.asnumpy()
        k = min(5, scores.shape[1])
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        if predictions is not None:
            predictions.extend(zip(truth.tolist(), best.tolist(), strict=True))
        top1 += int((best[:, 0] == truth).sum())
        top5 += int((best == truth[:, None]).any(axis=1).sum())
        total += n
    if total == 0:
        raise ValueError("the evaluation set is empty")
    return {"Loss": loss_sum / total, "Top_1_Acc": top1 / total, "Top_5_Acc": top5 / total, "images": total}


def evaluate(
    ckpt: str | Path,
    data_dir: str | Path,
    batch_size: int = 64,
    num_workers: int = 4,
    label_smoothing: float = 0.1,
    device_target: str = "CPU",
    mode: str = "graph",
    predictions: Predictions | None = None,
) -> dict[str, float]:
    """Load a checkpoint written by `hrnet train` and score it on `data_dir` (an ImageFolder)."""
    set_mode_and_device(mode, device_target)
    checkpoint = read_checkpoint(ckpt)
    metadata = checkpoint.metadata
    if metadata is None:
        raise MetadataError(f"{ckpt} carries no model metadata; it was not written by `hrnet train`")
    net = create_model(metadata.arch, metadata.num_classes)
    load_into(net, checkpoint.params)
    dataset = eval_dataset(data_dir, metadata, batch_size, num_workers)
    return score(net, dataset, LabelSmoothingCrossEntropy(metadata.num_classes, label_smoothing), predictions)


def name_predictions(data_dir: str | Path, predictions: Predictions) -> list[dict]:
    """`predictions` (in the eval dataset's order) paired with the files they belong to.

    MindSpore's ImageFolderDataset, unshuffled, reads the sorted class folders and in each the
    sorted file names; the labels read back must line up with that listing, or the pairing is
    refused rather than guessed.
    """
    root = Path(data_dir)
    files = [
        (path, label)
        for label, name in enumerate(class_names(root))
        for path in sorted((root / name).iterdir())
        if path.is_file()
    ]
    labels = [label for _, label in files]
    if labels != [label for label, _ in predictions]:
        raise ValueError(
            f"the {len(predictions)} images scored do not line up with the {len(files)} files listed in "
            f"{root}: cannot name their predictions"
        )
    return [
        {"image": path.relative_to(root).as_posix(), "label": label, "top5": best}
        for (path, label), (_, best) in zip(files, predictions, strict=True)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `hrnet train`")
    parser.add_argument("--data", required=True, type=Path, help="ImageFolder val directory")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    parser.add_argument("--num-workers", type=int, default=4, help="dataset workers (default 4)")
    parser.add_argument(
        "--label-smoothing",
        type=float,
        default=0.1,
        help="smoothing of the reported loss (default the seed's 0.1; accuracy does not depend on it)",
    )
    parser.add_argument(
        "--device-target", default="CPU", choices=["CPU", "GPU", "Ascend"], help="(default CPU)"
    )
    parser.add_argument("--mode", default="graph", choices=["graph", "pynative"], help="(default graph)")
    parser.add_argument(
        "--json", type=Path, default=None, help="where to write the result (default <ckpt>.eval.json)"
    )
    parser.add_argument(
        "--predictions",
        type=Path,
        default=None,
        help="also write every image's top-5 classes here (JSON, by file name relative to --data)",
    )


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    predictions: Predictions | None = [] if args.predictions else None
    try:
        result = evaluate(
            args.ckpt,
            args.data,
            args.batch_size,
            args.num_workers,
            args.label_smoothing,
            args.device_target,
            args.mode,
            predictions,
        )
        per_image = name_predictions(args.data, predictions) if predictions is not None else None
    except (FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    metrics = {key: result[key] for key in ("Loss", "Top_1_Acc", "Top_5_Acc")}
    print(metrics)
    target = args.json or args.ckpt.with_name(args.ckpt.name + ".eval.json")
    atomic_write_text(
        target,
        json.dumps(
            {**metrics, "images": result["images"], "ckpt": str(args.ckpt), "data": str(args.data)}, indent=2
        )
        + "\n",
    )
    print(f"wrote {target}")
    if per_image is not None:
        document = {"ckpt": str(args.ckpt), "data": str(args.data), "predictions": per_image}
        atomic_write_text(args.predictions, json.dumps(document) + "\n")
        print(f"wrote {args.predictions}")
    return 0
