"""Images per second of server-side preprocessing on a real 640x427 JPEG photograph.

    python -m benchmarks.preprocess_speed [--image photo.jpg] [--images 300] [--workers 2] [--input-size 224]

Measures `preprocess_image` on one thread (and its decode / resize-crop-normalise parts), then
`ImagePreprocessor.preprocess_many` with a bounded pool, which is what the server runs per batch.
Without `--image` it uses scikit-learn's bundled photograph (china.jpg) re-encoded as JPEG quality 90.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from core.metadata import ModelMetadata
from serving.engine.preprocess import (
    ImagePreprocessor,
    PreprocessSpec,
    decode_image,
    preprocess_array,
    preprocess_image,
)


def sample_jpeg() -> bytes:
    from sklearn.datasets import load_sample_images

    buffer = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def rate(count: int, work: Callable[[], object]) -> float:
    """Images per second of `work`, which processes `count` images; one warm-up call first."""
    work()
    start = time.perf_counter()
    work()
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=Path, help="an encoded image (default: a 640x427 JPEG photograph)")
    parser.add_argument("--images", type=int, default=300, help="images per measurement (default 300)")
    parser.add_argument("--workers", type=int, default=2, help="ImagePreprocessor threads (default 2)")
    parser.add_argument("--input-size", type=int, default=224, help="crop size; resize follows 256/224")
    args = parser.parse_args(argv)

    data = args.image.read_bytes() if args.image else sample_jpeg()
    spec = PreprocessSpec.from_metadata(ModelMetadata("any", num_classes=1, input_size=args.input_size))
    rgb = decode_image(data)
    n = args.images
    print(
        f"{rgb.shape[1]}x{rgb.shape[0]} image, {len(data)} bytes -> {spec.resize_size} short side, "
        f"{spec.input_size}x{spec.input_size} crop; {n} images per figure; "
        f"OpenCV threads {cv2.getNumThreads()}"
    )
    single: dict[str, Callable[[], object]] = {
        "decode only": lambda: [decode_image(data) for _ in range(n)],
        "resize+crop+normalise only": lambda: [preprocess_array(rgb, spec) for _ in range(n)],
        "preprocess_image, 1 thread": lambda: [preprocess_image(data, spec) for _ in range(n)],
    }
    for label, work in single.items():
        print(f"{label:<30}: {rate(n, work):8.1f} img/s")

    preprocessor = ImagePreprocessor(spec, max_workers=args.workers)
    try:
        batch = [data] * n
        result = rate(n, lambda: asyncio.run(preprocessor.preprocess_many(batch)))
        print(f"{f'ImagePreprocessor, {args.workers} workers':<30}: {result:8.1f} img/s")
        assert np.array_equal(
            asyncio.run(preprocessor.preprocess_many(batch[:1]))[0], preprocess_image(data, spec)
        )
    finally:
        preprocessor.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
