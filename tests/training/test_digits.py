"""`hrnet data digits`: a fixed, seeded, stratified ImageFolder of real 8x8 scans upscaled to RGB PNG."""

from pathlib import Path

import numpy as np
from PIL import Image

from hrnet.cli import main
from training.digits import write_digits


def _files(root: Path, split: str) -> list[str]:
    return sorted(str(p.relative_to(root / split)) for p in (root / split).rglob("*.png"))


def test_write_digits_layout_and_split(tmp_path):
    out = write_digits(tmp_path / "a", size=32, seed=0)
    train, val = _files(out, "train"), _files(out, "val")
    assert len(train) + len(val) == 1797
    assert 0.18 < len(val) / 1797 < 0.22
    assert not set(train) & set(val)
    assert sorted(p.name for p in (out / "train").iterdir()) == [str(d) for d in range(10)]
    assert (out / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    per_class = [len(list((out / "val" / str(d)).glob("*.png"))) for d in range(10)]
    assert min(per_class) >= 33  # stratified: every class is in val
    image = Image.open(out / "val" / val[0])
    assert image.mode == "RGB" and image.size == (32, 32)
    pixels = np.asarray(image)
    assert pixels.min() < 100 and pixels.max() > 200  # real ink on a light background


def test_split_is_fixed_by_the_seed(tmp_path):
    a = write_digits(tmp_path / "a", size=16, seed=0)
    b = write_digits(tmp_path / "b", size=16, seed=0)
    c = write_digits(tmp_path / "c", size=16, seed=1)
    assert _files(a, "val") == _files(b, "val")
    assert _files(a, "val") != _files(c, "val")
    same = (a / "val" / _files(a, "val")[0]).read_bytes() == (b / "val" / _files(b, "val")[0]).read_bytes()
    assert same


def test_cli_writes_the_dataset(tmp_path, capsys):
    assert main(["data", "digits", "--out", str(tmp_path / "d"), "--size", "32"]) == 0
    assert "1438 train and 359 val" in capsys.readouterr().out
    assert main(["data", "digits", "--out", str(tmp_path / "e"), "--size", "4"]) == 2
