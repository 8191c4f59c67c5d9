"""ImageFolder datasets and the seed's train and eval transforms, through `mindspore.dataset`.

`eval_transforms(metadata)` is the one definition of how an image is prepared for a trained
model; evaluation uses it, and serving's own numpy/OpenCV preprocessing is tested against it.
"""

from __future__ import annotations

import os
from pathlib import Path

import mindspore as ms
import mindspore.dataset as ds
import mindspore.dataset.vision as vision
from mindspore.dataset.transforms import TypeCast

from core.metadata import ModelMetadata

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def class_names(folder: str | Path) -> list[str]:
    """ImageFolder classes: the sub-directory names in sorted order, which is also the label order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"dataset directory not found: {folder}")
    names = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not names:
        raise ValueError(f"{folder} has no class sub-directories (expected an ImageFolder layout)")
    return names


def _pixel_scale(values: tuple[float, ...]) -> list[float]:
    return [v * 255.0 for v in values]


def eval_transforms(metadata: ModelMetadata) -> list:
    """Decode, short-side Resize(resize_size), CenterCrop(input_size), Normalize, HWC2CHW."""
    return [
        vision.Decode(),
        vision.Resize(metadata.resize_size),
        vision.CenterCrop(metadata.input_size),
        vision.Normalize(mean=_pixel_scale(metadata.mean), std=_pixel_scale(metadata.std)),
        vision.HWC2CHW(),
    ]


def train_transforms(
    input_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (0.75, 1.333),
    hflip_prob: float = 0.5,
) -> list:
    """The seed's augmentation: random-resized crop (decoding only the crop), horizontal flip, normalize."""
    ops: list = [vision.RandomCropDecodeResize(input_size, scale=crop_scale, ratio=crop_ratio)]
    if hflip_prob > 0:
        ops.append(vision.RandomHorizontalFlip(hflip_prob))
    ops += [vision.Normalize(mean=_pixel_scale(mean), std=_pixel_scale(std)), vision.HWC2CHW()]
    return ops


def _workers(requested: int) -> int:
    """mindspore.dataset refuses more workers than CPU cores: a config written for a big host still runs."""
    return max(1, min(requested, os.cpu_count() or 1))


def _check_folder(folder: str | Path) -> list[str]:
    names = class_names(folder)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(folder).rglob("*")):
        raise ValueError(f"{folder} holds no images")
    return names


def train_dataset(
    folder: str | Path,
    batch_size: int,
    transforms: list,
    num_workers: int = 8,
    num_shards: int = 1,
    shard_id: int = 0,
) -> ds.Dataset:
    """Shuffled, sharded over the data-parallel ranks, full batches only (every rank steps in lockstep)."""
    _check_folder(folder)
    num_workers = _workers(num_workers)
    data = ds.ImageFolderDataset(
        str(folder),
        num_parallel_workers=num_workers,
        shuffle=True,
        decode=False,
        num_shards=num_shards if num_shards > 1 else None,
        shard_id=shard_id if num_shards > 1 else None,
    )
    data = data.map(operations=transforms, input_columns="image", num_parallel_workers=num_workers)
    data = data.map(operations=TypeCast(ms.int32), input_columns="label", num_parallel_workers=num_workers)
    return data.batch(batch_size, drop_remainder=True)


def eval_dataset(
    folder: str | Path, metadata: ModelMetadata, batch_size: int, num_workers: int = 4
) -> ds.Dataset:
    """Every image exactly once, in file order: no shuffle, and the last short batch is kept."""
    names = _check_folder(folder)
    num_workers = _workers(num_workers)
    if metadata.labels and list(metadata.labels) != names:
        raise ValueError(
            f"{folder} classes {names[:5]}... do not match the model's labels {list(metadata.labels)[:5]}..."
        )
    data = ds.ImageFolderDataset(str(folder), num_parallel_workers=num_workers, shuffle=False, decode=False)
    data = data.map(
        operations=eval_transforms(metadata), input_columns="image", num_parallel_workers=num_workers
    )
    data = data.map(operations=TypeCast(ms.int32), input_columns="label", num_parallel_workers=num_workers)
    return data.batch(batch_size, drop_remainder=False)
