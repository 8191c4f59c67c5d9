"""Val accuracy through the server, checked image by image against `hrnet eval` on the checkpoint.

The server decodes and preprocesses every image itself, so this is the accuracy users get, and
it must equal MindSpore's on the checkpoint the export came from: preprocessing that drifts or
an export that changed the network shows up as images whose top-1 differs, listed by name. For
fp16 and int8 exports the same list is the honest price of the precision.

`hrnet eval` runs as a child process (no benchmark imports training but the export of
`hrnet bench gpu prepare`; tests/test_layers.py) and writes its per-image predictions with
`--predictions`.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from tqdm import tqdm

from benchmarks.loadgen import CHANNEL_OPTIONS
from benchmarks.protocol import Api, ModelInfo
from clients.images import find_images
from core.errors import CommandError

TOP_K = 5


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    name: str  # relative to the val folder, with "/": how both sides name it
    label: int


def image_folder(root: Path) -> tuple[list[str], list[LabelledImage]]:
    """Classes (sorted sub-folder names, the label order) and every image in ImageFolder order."""
    if not root.is_dir():
        raise CommandError(f"val folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise CommandError(f"{root} has no class sub-folders (expected ImageFolder: {root}/<class>/<image>)")
    index = {name: i for i, name in enumerate(classes)}
    images = [
        LabelledImage(path, path.relative_to(root).as_posix(), index[path.relative_to(root).parts[0]])
        for path in find_images([root])
        if len(path.relative_to(root).parts) > 1
    ]
    if not images:
        raise CommandError(f"no images in the class folders of {root}")
    return classes, images


async def classify_all(
    address: str,
    api: Api,
    model: ModelInfo,
    images: Sequence[LabelledImage],
    in_flight: int,
    timeout_s: float,
) -> tuple[list[list[int] | None], float]:
    """Top-5 indices per image (None where the request failed) and the images/s, one image per request."""
    results: list[list[int] | None] = [None] * len(images)
    failures: list[str] = []
    gate = asyncio.Semaphore(in_flight)
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = channel.unary_unary(api.unary)

        async def one(i: int, bar: tqdm) -> None:
            async with gate:
                request = api.images_request(model, [images[i].path.read_bytes()])
                try:
                    results[i] = api.top_k(await stub(request, timeout=timeout_s), TOP_K)[0]
                except grpc.aio.AioRpcError as exc:
                    failures.append(f"{images[i].name}: {exc.code().name}: {exc.details()}")
                bar.update()

        started = time.perf_counter()
        with tqdm(total=len(images), desc="accuracy", unit="img", disable=None) as bar:
            await asyncio.gather(*(one(i, bar) for i in range(len(images))))
        seconds = time.perf_counter() - started
    for line in failures[:5]:
        print(f"failed: {line}", file=sys.stderr)
    return results, len(images) / seconds


def scores(predictions: Sequence[Sequence[int] | None], labels: Sequence[int]) -> tuple[float, float]:
    """(top-1, top-5) over every image; a failed image counts as wrong."""
    top1 = sum(1 for p, y in zip(predictions, labels, strict=True) if p and p[0] == y)
    top5 = sum(1 for p, y in zip(predictions, labels, strict=True) if p and y in p[:TOP_K])
    return top1 / len(labels), top5 / len(labels)


def run_eval(ckpt: Path, data: Path, device: str) -> dict[str, Any]:
    """`hrnet eval --predictions` on the checkpoint: its scores and per-image top-5 by image name."""
    if not ckpt.is_file():
        raise CommandError(f"checkpoint {ckpt} does not exist")
    with tempfile.TemporaryDirectory(prefix="hrnet-bench-eval-") as tmp:
        result, predictions = Path(tmp) / "eval.json", Path(tmp) / "predictions.json"
        command = [
            sys.executable, "-m", "hrnet", "eval",
            "--ckpt", str(ckpt), "--data", str(data),
            "--device-target", "GPU" if device == "gpu" else "CPU",
            "--json", str(result), "--predictions", str(predictions),
        ]  # fmt: skip
        print(f"$ hrnet {' '.join(command[3:])}", file=sys.stderr, flush=True)
        code = subprocess.run(command, check=False).returncode
        if code != 0:
            raise CommandError(f"hrnet eval exited with {code} (its output is above)")
        scored = json.loads(result.read_text(encoding="utf-8"))
        per_image = json.loads(predictions.read_text(encoding="utf-8"))["predictions"]
    return {
        "top1": scored["Top_1_Acc"],
        "top5": scored["Top_5_Acc"],
        "images": scored["images"],
        "predictions": {p["image"]: p["top5"] for p in per_image},
    }


def compare(
    images: Sequence[LabelledImage], server: Sequence[list[int] | None], reference: dict[str, list[int]]
) -> tuple[float, list[dict[str, Any]]]:
    """Top-1 agreement over the images both sides scored, and every image where they differ."""
    differ: list[dict[str, Any]] = []
    both = 0
    for image, ours in zip(images, server, strict=True):
        theirs = reference.get(image.name)
        if theirs is None:
            continue
        both += 1
        if not ours or ours[0] != theirs[0]:
            differ.append(
                {
                    "image": image.name,
                    "label": image.label,
                    "server": ours[0] if ours else None,
                    "eval": theirs[0],
                }
            )
    missing = len(images) - both
    if missing:
        raise CommandError(f"hrnet eval scored no prediction for {missing} of the {len(images)} images sent")
    return (both - len(differ)) / both if both else 0.0, differ
