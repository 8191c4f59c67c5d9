"""Turn whatever the caller holds (a path, encoded bytes, a PIL image, a uint8 array) into encoded bytes.

The server decodes and preprocesses (the same transform the model was evaluated with), so the
client never resizes or normalises: it only has to ship an encoded image. Arrays and PIL images
are encoded as PNG, which is lossless, so the server sees exactly the caller's pixels.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image

from clients.errors import read_local_file

ImageInput: TypeAlias = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

# What `hrnet classify DIR` picks up from a folder: the formats the server decodes (no TIFF).
# Named files are sent whatever their suffix.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"})


def is_single(images: object) -> bool:
    """One image, or a collection of them? A 4-D array is a batch (N, H, W, C)."""
    if isinstance(images, np.ndarray):
        return images.ndim <= 3
    return isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image))


def as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    if is_single(images):
        return [images]  # type: ignore[list-item]
    if isinstance(images, np.ndarray):
        return list(images)
    if not isinstance(images, Iterable):
        raise TypeError(f"expected an image or an iterable of images, got {type(images).__name__}")
    return list(images)


def encode_image(image: ImageInput) -> bytes:
    """Encoded bytes for one image; an unreadable file is a ClientError(INVALID_ARGUMENT) naming it."""
    if isinstance(image, (str, os.PathLike)):
        return read_local_file(image, "image")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        return _png(image)
    if isinstance(image, np.ndarray):
        return _png(_array_to_pil(image))
    raise TypeError(
        f"an image must be a path, encoded bytes, a PIL image or a uint8 array, got {type(image).__name__}"
    )


def encode_images(images: Sequence[ImageInput]) -> list[bytes]:
    return [encode_image(image) for image in images]


def _array_to_pil(array: np.ndarray) -> Image.Image:
    if array.dtype != np.uint8:
        raise TypeError(
            f"image arrays must be uint8 (H, W[, C]) pixels, got {array.dtype}; "
            "send preprocessed float tensors with infer()"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"image arrays must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    return Image.fromarray(np.ascontiguousarray(array))


def _png(image: Image.Image) -> bytes:
    if image.mode not in ("L", "RGB", "RGBA"):
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: the bytes only travel to the server
    return buffer.getvalue()


def find_images(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Named files as given, folders expanded recursively to their image files in sorted order."""
    found: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found.append(path)
    return found
