"""ImageFolder datasets and the seed's train and eval transforms, through `mindspore.dataset`.

`eval_transforms(metadata)` is the one definition of how an image is prepared for a trained
model; evaluation and INT8 calibration use it, and serving's own numpy/OpenCV preprocessing is
tested against it.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import mindspore as ms
import mindspore.dataset as ds
import mindspore.dataset.vision as vision
import numpy as np
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


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def sample_images(folder: str | Path, count: int) -> list[Path]:
    """`count` images of `folder` (ImageFolder or flat), the same ones on every run, spread over classes.

    Classes take turns, each giving its images in file-name order, so every class contributes
    before any contributes twice; with fewer images than classes, the classes are evenly spaced.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image directory not found: {folder}")
    if count < 1:
        raise ValueError(f"the image count must be >= 1, got {count}")
    groups = [_images_in(d) for d in sorted(p for p in folder.iterdir() if p.is_dir())]
    groups = [g for g in groups if g] or [_images_in(folder)]
    if not groups[0]:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), nor class folders of them")
    if count < len(groups):
        return [groups[i * len(groups) // count][0] for i in range(count)]
    turns = (group[turn] for turn in range(max(map(len, groups))) for group in groups if turn < len(group))
    return list(itertools.islice(turns, count))


class _EncodedImages:
    """Random-access source for `GeneratorDataset`: each file's bytes, as ImageFolderDataset reads them."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[np.ndarray]:
        return (np.fromfile(self.files[index], dtype=np.uint8),)


def files_dataset(
    files: list[Path], metadata: ModelMetadata, batch_size: int, num_workers: int = 4
) -> ds.Dataset:
    """The eval transform over a list of image files, in order, without labels (calibration data)."""
    num_workers = _workers(num_workers)
    data = ds.GeneratorDataset(_EncodedImages(files), column_names=["image"], shuffle=False)
    data = data.map(
        operations=eval_transforms(metadata), input_columns="image", num_parallel_workers=num_workers
    )
    return data.batch(batch_size, drop_remainder=False)


def _check_folder(folder: str | Path) -> list[str]:
    names = class_names(folder)
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in Path(folder).rglob("*")):
        raise ValueError(f"{folder} holds no images")
    return names


def check_eval_folder(folder: str | Path, metadata: ModelMetadata) -> None:
    """An ImageFolder of images whose classes are the model's labels, in the model's order."""
    names = _check_folder(folder)
    if metadata.labels and list(metadata.labels) != names:
        raise ValueError(
            f"{folder} classes {names[:5]}... do not match the model's labels {list(metadata.labels)[:5]}..."
        )


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
    check_eval_folder(folder, metadata)
    num_workers = _workers(num_workers)
    data = ds.ImageFolderDataset(str(folder), num_parallel_workers=num_workers, shuffle=False, decode=False)
    data = data.map(
        operations=eval_transforms(metadata), input_columns="image", num_parallel_workers=num_workers
    )
    data = data.map(operations=TypeCast(ms.int32), input_columns="label", num_parallel_workers=num_workers)
    return data.batch(batch_size, drop_remainder=False)
