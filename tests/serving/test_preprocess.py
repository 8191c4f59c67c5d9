"""Server-side preprocessing against the real MindSpore eval pipeline, on real photographs and files."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from pathlib import Path

import cv2
import mindspore as ms
import mindspore.dataset as ds
import mindspore.dataset.vision as vision
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images

from core.metadata import ModelMetadata
from serving.engine.preprocess import (
    ImageError,
    ImagePreprocessor,
    PreprocessSpec,
    declared_pixels,
    decode_image,
    preprocess_array,
    preprocess_image,
    resized_shape,
)
from training.data import eval_dataset, eval_transforms
from training.digits import write_digits
from training.model import create_model

# The seed's 224/256, the 32-pixel test models (Resize(37): float32 truncation matters, see resized_shape),
# and an odd crop inside an even resize.
METADATA = {
    "224": ModelMetadata("w18_small_v1", num_classes=10, input_size=224),
    "32": ModelMetadata("w18_small_v1", num_classes=10, input_size=32),
    "odd": ModelMetadata("w18_small_v1", num_classes=10, input_size=57, resize_size=64, mean=(0.5, 0.4, 0.3)),
}
TOLERANCE = 1e-5  # after normalisation; the eval pipeline's values span about -2.2..2.7


def mindspore_pipeline(encoded: list[bytes], meta: ModelMetadata) -> list[np.ndarray]:
    """Runs encoded images through a real MindSpore dataset pipeline, in order."""

    def rows():
        for data in encoded:
            yield (np.frombuffer(data, dtype=np.uint8).copy(),)

    dataset = ds.GeneratorDataset(rows, column_names=["image"], shuffle=False)
    dataset = dataset.map(operations=eval_transforms(meta), input_columns=["image"])
    return [row["image"] for row in dataset.create_dict_iterator(output_numpy=True, num_epochs=1)]


def encode(image: np.ndarray | Image.Image, fmt: str, **options) -> bytes:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buffer = io.BytesIO()
    pil.save(buffer, fmt, **options)
    return buffer.getvalue()


def photo_variants() -> dict[str, bytes]:
    """Real photographs at several sizes and aspect ratios, as JPEG and PNG files would arrive."""
    china, flower = load_sample_images().images  # 427x640 RGB each

    def shrink(image: np.ndarray, width: int, height: int) -> np.ndarray:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)

    return {
        "china_640x427.jpg": encode(china, "JPEG", quality=90),  # long side 383.7 -> 383
        "flower_640x427.png": encode(flower, "PNG"),
        "china_portrait_300x427.jpg": encode(china[:, 170:470], "JPEG", quality=92),
        "flower_portrait_427x640.png": encode(np.ascontiguousarray(np.rot90(flower)), "PNG"),
        "china_odd_333x251.jpg": encode(shrink(china, 333, 251), "JPEG", quality=85),
        "flower_square_301x301.png": encode(flower[60:361, 150:451], "PNG"),
        "china_panorama_640x150.jpg": encode(china[140:290], "JPEG", quality=95),
        "flower_small_100x67.jpg": encode(shrink(flower, 100, 67), "JPEG", quality=90),  # upscaled
        "china_48x37.png": encode(shrink(china, 48, 37), "PNG"),  # Resize(37): 47x37, not 48x37
        "flower_37x301.png": encode(np.ascontiguousarray(flower[50:351, 300:337]), "PNG"),  # 37x300 at 37
        "china_257x256.png": encode(china[100:356, 200:457], "PNG"),
    }


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return photo_variants()


@pytest.mark.parametrize("spec_name", sorted(METADATA))
def test_matches_mindspore_eval_pipeline_on_photographs(photos: dict[str, bytes], spec_name: str) -> None:
    meta = METADATA[spec_name]
    spec = PreprocessSpec.from_metadata(meta)
    expected = mindspore_pipeline(list(photos.values()), meta)
    diffs = {}
    for (name, data), reference in zip(photos.items(), expected, strict=True):
        ours = preprocess_image(data, spec)
        assert ours.dtype == np.float32 and ours.shape == reference.shape == (
            3,
            meta.input_size,
            meta.input_size,
        )
        diffs[name] = float(np.abs(ours - reference).max())
    print(f"\nmax abs diff vs MindSpore, spec {spec_name}: {diffs}")
    assert max(diffs.values()) < TOLERANCE, diffs


def test_resized_shape_follows_mindspore_rounding() -> None:
    """Short side to `size`, long side truncated in float32 (37x48 at 37 -> 47, 640x427 at 256 -> 383)."""
    zeros = {}
    for size in (37, 7):
        resize = vision.Resize(size)
        for height in range(1, 50):
            for width in range(1, 50):
                image = zeros.setdefault((height, width), np.zeros((height, width, 1), dtype=np.uint8))
                assert resized_shape(height, width, size) == resize(image).shape[:2], (height, width, size)
    assert resized_shape(427, 640, 256) == (256, 383)
    assert resized_shape(640, 427, 256) == (383, 256)
    assert resized_shape(37, 48, 37) == (37, 47)


@pytest.mark.slow  # ~5 s: the MindSpore data pipeline over the digits val split
def test_same_top1_as_the_training_evaluation_on_every_digits_val_image(tmp_path: Path) -> None:
    """A seeded network fed both paths' tensors makes the same prediction on every val image."""
    val = write_digits(tmp_path) / "val"
    meta = METADATA["32"]  # the 32x32 digits are resized to 37x37 and centre-cropped back to 32
    spec = PreprocessSpec.from_metadata(meta)
    batches = list(
        eval_dataset(val, meta, batch_size=1000, num_workers=1).create_tuple_iterator(output_numpy=True)
    )
    theirs = np.concatenate([images for images, _ in batches])
    files = ds.ImageFolderDataset(str(val), shuffle=False, decode=False)  # the same files, in the same order
    ours = np.stack(
        [
            preprocess_image(row["image"].tobytes(), spec)
            for row in files.create_dict_iterator(output_numpy=True)
        ]
    )
    assert ours.shape == theirs.shape == (359, 3, 32, 32)
    print(
        f"\ndigits val: max abs diff vs MindSpore {np.abs(ours - theirs).max():.3g} over {len(ours)} images"
    )
    assert np.abs(ours - theirs).max() < TOLERANCE

    # A seeded network's random head predicts one class for every digit, which would make agreement
    # vacuous: fit a ridge-regression head on its pooled features (from MindSpore's tensors) instead.
    ms.set_seed(7)
    net = create_model("w18_small_v1", num_classes=meta.num_classes)
    net.set_train(False)
    features = {
        name: net.forward_features(ms.Tensor(x)).asnumpy().mean(axis=(2, 3))
        for name, x in (("ours", ours), ("theirs", theirs))
    }
    targets = np.eye(meta.num_classes)[np.concatenate([labels for _, labels in batches])]
    gram = features["theirs"] @ features["theirs"].T
    head = features["theirs"].T @ np.linalg.solve(
        gram + 1e-3 * np.trace(gram) / len(gram) * np.eye(len(gram)), targets
    )
    ours_top1 = (features["ours"] @ head).argmax(axis=1)
    theirs_top1 = (features["theirs"] @ head).argmax(axis=1)
    assert len(np.unique(theirs_top1)) == meta.num_classes
    np.testing.assert_array_equal(ours_top1, theirs_top1)


# --- decoding: every accepted format and mode, against MindSpore's Decode where it reads the format


@pytest.fixture(scope="module")
def small_photo() -> np.ndarray:
    return np.ascontiguousarray(load_sample_images().images[0][100:190, 200:320])  # 120x90 RGB


def mindspore_decode(data: bytes) -> np.ndarray:
    return vision.Decode()(np.frombuffer(data, dtype=np.uint8))


def mode_variants(photo: np.ndarray) -> dict[str, bytes]:
    rgb = Image.fromarray(photo)
    rgba = np.dstack(
        [photo, np.arange(photo.shape[1], dtype=np.uint8)[None, :].repeat(photo.shape[0], axis=0)]
    )
    gray16 = (
        np.asarray(rgb.convert("L")).astype(np.uint16) * 257
        + np.arange(photo.shape[1], dtype=np.uint16) % 200
    )
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    return {
        "L.png": encode(rgb.convert("L"), "PNG"),
        "L.jpg": encode(rgb.convert("L"), "JPEG"),
        "LA.png": encode(rgb.convert("LA"), "PNG"),
        "P_transparency.png": encode(palette, "PNG", transparency=0),
        "RGBA.png": encode(rgba, "PNG"),  # varying alpha: dropped, not composited
        "CMYK.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "I16.png": encode(Image.fromarray(gray16), "PNG"),  # high byte kept, as MindSpore/OpenCV do
        "1.png": encode(rgb.convert("1"), "PNG"),
        "RGB.bmp": encode(rgb, "BMP"),
        "P.bmp": encode(palette, "BMP"),
    }


def test_modes_decode_like_mindspore(small_photo: np.ndarray) -> None:
    variants = mode_variants(small_photo)
    assert Image.open(io.BytesIO(variants["I16.png"])).mode == "I;16"
    assert Image.open(io.BytesIO(variants["CMYK.jpg"])).mode == "CMYK"
    spec = PreprocessSpec.from_metadata(METADATA["odd"])
    expected = mindspore_pipeline(list(variants.values()), METADATA["odd"])
    for (name, data), reference in zip(variants.items(), expected, strict=True):
        ours = decode_image(data)
        assert ours.dtype == np.uint8 and ours.shape == (90, 120, 3), name
        np.testing.assert_array_equal(ours, mindspore_decode(data), err_msg=name)
        assert np.abs(preprocess_image(data, spec) - reference).max() < TOLERANCE, name


def test_sixteen_bit_gray_keeps_the_high_byte_instead_of_clipping() -> None:
    gray16 = np.array([[0, 255, 256, 40000, 65535]], dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(gray16), "PNG"))
    np.testing.assert_array_equal(decoded[..., 0], [[0, 0, 1, 156, 255]])
    np.testing.assert_array_equal(decoded[..., 0], decoded[..., 2])


def test_webp_and_gif_which_mindspore_cannot_decode(small_photo: np.ndarray) -> None:
    spec = PreprocessSpec.from_metadata(METADATA["32"])
    lossless = encode(small_photo, "WEBP", lossless=True)
    np.testing.assert_array_equal(decode_image(lossless), small_photo)
    np.testing.assert_array_equal(preprocess_image(lossless, spec), preprocess_array(small_photo, spec))
    lossy = decode_image(encode(small_photo, "WEBP", quality=80))
    assert lossy.shape == small_photo.shape and np.abs(lossy.astype(int) - small_photo).mean() < 8

    first = Image.fromarray(small_photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=128)
    second = Image.fromarray(255 - small_photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=128)
    gif = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    assert getattr(Image.open(io.BytesIO(gif)), "n_frames", 1) == 2
    np.testing.assert_array_equal(decode_image(gif), np.asarray(first.convert("RGB")))


def test_multi_picture_jpeg_uses_the_first_picture(small_photo: np.ndarray) -> None:
    mpo = encode(
        Image.fromarray(small_photo), "MPO", save_all=True, append_images=[Image.fromarray(small_photo[::-1])]
    )
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    np.testing.assert_array_equal(decode_image(mpo), mindspore_decode(mpo))


def test_exif_orientation_is_applied(small_photo: np.ndarray) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    data = encode(small_photo, "JPEG", quality=95, exif=exif)
    stored = decode_image(data, exif_transpose=False)
    np.testing.assert_array_equal(stored, mindspore_decode(data))  # MindSpore ignores the tag
    upright = decode_image(data)
    assert stored.shape == (90, 120, 3) and upright.shape == (120, 90, 3)
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))
    meta = METADATA["32"]
    with_exif = preprocess_image(data, PreprocessSpec.from_metadata(meta))
    without = PreprocessSpec(meta.input_size, meta.resize_size, meta.mean, meta.std, exif_transpose=False)
    np.testing.assert_array_equal(with_exif, preprocess_array(upright, without))
    assert np.abs(preprocess_image(data, without) - mindspore_pipeline([data], meta)[0]).max() < TOLERANCE


# --- bad input: precise ImageError, never a crash, never a huge allocation


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_bomb(width: int, height: int) -> bytes:
    """A valid grayscale PNG of zeros: a few KB on the wire, width*height bytes once decoded."""
    rows = zlib.compressobj(9)
    zero_row = bytes(width + 1)  # filter byte + pixels
    body = b"".join(rows.compress(zero_row) for _ in range(min(height, 64))) + rows.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")
    )


def test_oversized_images_are_refused_before_decoding() -> None:
    spec = PreprocessSpec.from_metadata(METADATA["32"])
    with pytest.raises(ImageError, match=r"8000x8000 = 64000000 pixels, more than the limit of 50000000"):
        preprocess_image(png_bomb(8000, 8000), spec)  # under Pillow's own limit: our header check
    # Above Pillow's own limit (179 Mpx) too: the same message, not Pillow's.
    with pytest.raises(
        ImageError, match=r"^PNG image is 50000x50000 = 2500000000 pixels, more than the limit of"
    ):
        preprocess_image(png_bomb(50000, 50000), spec)
    with pytest.raises(ImageError, match="limit of 100"):
        preprocess_image(encode(np.zeros((20, 20, 3), np.uint8), "PNG"), spec, max_pixels=100)


def test_extreme_aspect_ratio_is_refused_before_resizing() -> None:
    strip = encode(np.zeros((1, 40000), np.uint8), "PNG")
    with pytest.raises(ImageError, match=r"a 40000x1 image resizes to 1480000x37"):
        preprocess_image(strip, PreprocessSpec.from_metadata(METADATA["32"]), max_pixels=1_000_000)


def test_corrupt_data_raises_precise_errors(small_photo: np.ndarray) -> None:
    spec = PreprocessSpec.from_metadata(METADATA["32"])
    jpeg = encode(small_photo, "JPEG")
    with pytest.raises(ImageError, match=r"corrupt or truncated JPEG image \(120x90\)"):
        preprocess_image(jpeg[: len(jpeg) // 2], spec)
    with pytest.raises(ImageError, match="unsupported or unrecognised image data"):
        preprocess_image(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), spec)
    with pytest.raises(ImageError, match="empty image"):
        preprocess_image(b"", spec)
    with pytest.raises(ImageError, match=r"^TIFF images are not supported"):
        preprocess_image(encode(small_photo, "TIFF"), spec)  # Pillow reads TIFF, the server does not
    png = encode(small_photo, "PNG")
    with pytest.raises(ImageError, match="PNG"):
        preprocess_image(png[:200], spec)
    with pytest.raises(ImageError, match=r"^PNG image has no pixels \(0x30\)$"):  # was "unrecognised"
        preprocess_image(png_bomb(0, 30), spec)
    with pytest.raises(ImageError, match=r"^corrupt PNG header \(16 bytes\): Truncated File Read$"):
        preprocess_image(png[:16], spec)
    with pytest.raises(ImageError, match=r"expected an RGB uint8 array of shape \(height, width, 3\)"):
        preprocess_array(small_photo.astype(np.float32), spec)


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "PDF"),
        (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "HEIC"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1", "AVIF"),
        (b"MM\x00*\x00\x00\x00\x08", "TIFF"),
    ],
)
def test_known_but_unsupported_formats_are_named(data: bytes, name: str) -> None:
    with pytest.raises(ImageError, match=rf"^{name} images are not supported; accepted formats: JPEG, PNG"):
        decode_image(data)


def test_pillow_warnings_are_not_raised_for_large_accepted_images(recwarn: pytest.WarningsRecorder) -> None:
    """Pillow warns above 89 Mpx on its own; with our limit raised above that, nothing is printed."""
    assert declared_pixels(png_bomb(10000, 10000), max_pixels=200_000_000) == 100_000_000
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_request_over_its_pixel_budget_is_refused_from_the_headers(photos: dict[str, bytes]) -> None:
    """A 29-byte GIF may declare 6000x6000: the budget is checked before anything is decoded."""
    spec = PreprocessSpec.from_metadata(METADATA["32"])
    gif = (
        b"GIF89a"
        + struct.pack("<HH", 6000, 6000)
        + b"\x00\x00\x00,\x00\x00\x00\x00p\x17p\x17\x00\x02\x02D\x01\x00;"
    )
    preprocessor = ImagePreprocessor(spec, max_workers=1, max_request_pixels=100_000_000)
    try:
        started = time.monotonic()
        with pytest.raises(
            ImageError,
            match=r"^the request's 300 images together = 10800000000 pixels, more than the limit of 10+ per",
        ):
            asyncio.run(preprocessor.preprocess_many([gif] * 300))
        # Was ~40 s of decoding before the refusal; now milliseconds (nothing is decoded). 2 s is
        # 20x short of the failure and hundreds of times the refusal, for a loaded machine.
        assert time.monotonic() - started < 2.0
        with pytest.raises(ImageError, match=r"^image 1: PNG image is 8000x8000 = 64000000 pixels"):
            asyncio.run(preprocessor.preprocess_many([next(iter(photos.values())), png_bomb(8000, 8000)]))
    finally:
        preprocessor.close()


def test_spec_validation_and_metadata() -> None:
    spec = PreprocessSpec.from_metadata(METADATA["224"])
    assert (spec.input_size, spec.resize_size, spec.mean, spec.std) == (
        224,
        256,
        (0.485, 0.456, 0.406),
        (0.229, 0.224, 0.225),
    )
    with pytest.raises(ValueError, match="smaller than input_size"):
        PreprocessSpec(224, 200, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match="std > 0"):
        PreprocessSpec(32, 37, (0.5,) * 3, (0.5, 0.0, 0.5))


# --- the thread-pool batch API the server uses


def test_preprocess_many_matches_single_images(photos: dict[str, bytes]) -> None:
    spec = PreprocessSpec.from_metadata(METADATA["32"])
    images = list(photos.values())
    preprocessor = ImagePreprocessor(spec, max_workers=2)
    try:
        batch = asyncio.run(preprocessor.preprocess_many(images))
        assert batch.shape == (len(images), 3, 32, 32) and batch.dtype == np.float32
        for index, data in enumerate(images):
            np.testing.assert_array_equal(batch[index], preprocess_image(data, spec))
        assert asyncio.run(preprocessor.preprocess_many([])).shape == (0, 3, 32, 32)
        with pytest.raises(ImageError, match=r"^image 2: unsupported or unrecognised"):
            asyncio.run(preprocessor.preprocess_many([images[0], images[1], b"not an image", b""]))
    finally:
        preprocessor.close()
    default = ImagePreprocessor(spec)
    default.close()
    assert 1 <= default.max_workers <= 4
