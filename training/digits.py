"""`hrnet data digits`: scikit-learn's bundled handwritten digits as an ImageFolder.

1,797 real 8x8 scans in 10 classes ship inside scikit-learn, so this is a real image dataset
that needs no download: our stand-in for ImageNet on machines without it. The images are
upscaled and written as RGB PNG files in `train/<class>/` and `val/<class>/` with a fixed,
seeded, per-class (stratified) split, so every run and every machine sees the same split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from core.atomic import atomic_write_text
from core.errors import CommandError

DEFAULT_SIZE = 32
DEFAULT_SEED = 0
VAL_FRACTION = 0.2
LABELS_FILE = "labels.txt"


def split_indices(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split: the same fraction of every class goes to val."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = round(len(idx) * val_fraction)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def to_rgb(image: np.ndarray, size: int) -> Image.Image:
    """An 8x8 scan (ink 0..16) as a size x size RGB picture: dark ink on white, bilinear upscale."""
    gray = (255 - np.clip(image, 0, 16) * (255 / 16)).astype(np.uint8)
    return Image.fromarray(gray, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")


def write_digits(
    out_dir: Path, size: int = DEFAULT_SIZE, seed: int = DEFAULT_SEED, val_fraction: float = VAL_FRACTION
) -> Path:
    """Write DIR/train/<digit>/*.png, DIR/val/<digit>/*.png and DIR/labels.txt; returns DIR."""
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    digits = load_digits()
    images, labels = digits.images, digits.target
    class_names = [str(c) for c in sorted(set(labels.tolist()))]
    out_dir = Path(out_dir)
    train_idx, val_idx = split_indices(labels, val_fraction, seed)
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for name in class_names:
            (out_dir / split / name).mkdir(parents=True, exist_ok=True)
        for i in indices:
            target = out_dir / split / str(labels[i]) / f"digit_{i:04d}.png"
            to_rgb(images[i], size).save(target, format="PNG")
    # Written last and atomically: its presence marks a complete dataset.
    atomic_write_text(out_dir / LABELS_FILE, "\n".join(class_names) + "\n")
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=["digits"], help="the dataset to write")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels (default {DEFAULT_SIZE})"
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_SEED, help=f"train/val split seed (default {DEFAULT_SEED})"
    )


def run(args: argparse.Namespace) -> int:
    if args.size < 8:
        raise CommandError(f"--size must be >= 8, got {args.size}")
    if args.out.exists() and not args.out.is_dir():
        raise CommandError(f"--out {args.out} exists and is not a directory")
    out = write_digits(args.out, size=args.size, seed=args.seed)
    n_train = sum(1 for _ in (out / "train").rglob("*.png"))
    n_val = sum(1 for _ in (out / "val").rglob("*.png"))
    print(
        f"wrote {n_train} train and {n_val} val images ({args.size}x{args.size} RGB PNG, 10 classes) to {out}"
    )
    return 0
