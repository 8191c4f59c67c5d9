"""Server-side image preprocessing that reproduces the training eval transform bit for bit.

A model is only as accurate as the agreement between the pixels it was evaluated on and the
pixels it is served. The eval pipeline of training is MindSpore's `Decode`, `Resize(resize_size)`
(short side), `CenterCrop(input_size)`, `Normalize(mean*255, std*255)`, `HWC2CHW`; this module
computes the same tensor without MindSpore, so the server, the client and the benchmarks share
one pure function:

- Decoding uses Pillow and converts to RGB the way MindSpore's `Decode` does: grayscale is
  replicated, alpha is dropped (not composited), palettes are expanded, CMYK JPEGs use Pillow's
  conversion (identical to MindSpore's), 16-bit samples keep their high byte. Pillow also
  reads WebP and GIF (first frame), which MindSpore's `Decode` refuses.
- One deliberate difference, on by default: the EXIF orientation is applied, so a phone photo
  is classified upright; MindSpore's `Decode` ignores it (`PreprocessSpec.exif_transpose`).
- MindSpore's bilinear resize equals OpenCV's `INTER_LINEAR` (not Pillow's, which antialiases
  when shrinking). The long side is `int(float32(size) * (float32(long) / float32(short)))`,
  i.e. truncated in single precision: 640x427 -> 383x256, and 31x7 -> 30x7, not 31x7.
- The centre crop starts at `(side - crop) // 2`.

Every size is checked from the image's header before any pixel is decoded: per image
(`max_pixels`) and, in `ImagePreprocessor`, per request (`max_request_pixels`), because a
35-byte GIF may declare 6000x6000 pixels and cost a second of CPU to decode.
"""

from __future__ import annotations

import asyncio
import io
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.metadata import ModelMetadata
from serving.config import MAX_IMAGE_PIXELS, MAX_REQUEST_PIXELS, usable_cores

DEFAULT_MAX_PIXELS = MAX_IMAGE_PIXELS  # the server's setting, also the default of these functions

# Pillow's names for the accepted containers (multi-picture camera JPEGs open as JPEG, reported as MPO).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
ACCEPTED = "accepted formats: JPEG, PNG, WebP, BMP, GIF"
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Leading bytes of formats people send, so a refusal can name what arrived.
_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF8", "GIF"),
    (0, b"BM", "BMP"),
    (8, b"WEBP", "WEBP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"%PDF", "PDF"),
    (0, b"<svg", "SVG"),
    (0, b"<?xml", "SVG/XML"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)
# This module refuses images above its own, configurable limit from the header, with its own
# message; Pillow's fixed one (a warning at 89 Mpx, an error at 179 Mpx) would only interfere.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """The bytes are not an image this server can read, or are too large to decode safely."""


@dataclass(frozen=True)
class PreprocessSpec:
    """The eval transform of one model; mean and std on the 0..1 pixel scale, as in ModelMetadata."""

    input_size: int
    resize_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    exif_transpose: bool = True  # False reproduces MindSpore's Decode, which ignores EXIF orientation

    def __post_init__(self) -> None:
        if self.input_size < 1:
            raise ValueError(f"input_size must be >= 1, got {self.input_size}")
        if self.resize_size < self.input_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than input_size {self.input_size}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean and std need 3 values each, std > 0; got mean={self.mean} std={self.std}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))

    @classmethod
    def from_metadata(cls, meta: ModelMetadata, exif_transpose: bool = True) -> PreprocessSpec:
        return cls(meta.input_size, meta.resize_size, meta.mean, meta.std, exif_transpose)


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) after MindSpore's `Resize(size)`: short side `size`, long side truncated.

    The ratio and product are taken in float32 as MindSpore does; exact integer arithmetic would
    differ whenever the true long side is an integer that float32 lands just below (31x7 -> 30).
    """
    if height <= width:
        return size, int(np.float32(size) * (np.float32(width) / np.float32(height)))
    return int(np.float32(size) * (np.float32(height) / np.float32(width))), size


def sniff_format(data: bytes) -> str | None:
    """The format the leading bytes announce (JPEG, PNG, TIFF, PDF, HEIC...), None if unknown."""
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def too_many_pixels(what: str, pixels: int, limit: int) -> ImageError:
    """The one wording of every pixel limit, per image and per request."""
    return ImageError(f"{what} = {pixels} pixels, more than the limit of {limit}")


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Parse the header only (nothing decoded yet) and refuse what cannot or must not be decoded."""
    if not data:
        raise ImageError("empty image: 0 bytes")
    sniffed = sniff_format(data)
    if sniffed is not None and sniffed not in ACCEPTED_FORMATS:
        raise ImageError(f"{sniffed} images are not supported; {ACCEPTED}")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        if sniffed is None:
            start = data[:8]
            raise ImageError(
                f"unsupported or unrecognised image data ({len(data)} bytes starting {start!r}); {ACCEPTED}"
            ) from None
        raise ImageError(_unreadable_header(sniffed or "image", data)) from None
    except Exception as exc:  # a recognised header that its plugin then fails to parse
        raise ImageError(f"{_unreadable_header(sniffed or 'image', data)}: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        image.close()
        raise ImageError(f"{image.format} image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        image.close()
        raise too_many_pixels(f"{image.format} image is {width}x{height}", width * height, max_pixels)
    return image


def _unreadable_header(sniffed: str, data: bytes) -> str:
    """Why an image of an accepted format does not open; Pillow itself says only 'cannot identify'."""
    if sniffed == "PNG" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        if width < 1 or height < 1:
            return f"PNG image has no pixels ({width}x{height})"
    return f"corrupt {sniffed} header ({len(data)} bytes)"


def declared_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Pixels the header announces (all open_image checks applied), without decoding any."""
    with open_image(data, max_pixels) as image:
        width, height = image.size
    return width * height


def decode_image(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = True
) -> np.ndarray:
    """Encoded bytes -> RGB uint8 HWC, refusing oversized images before any pixel is decoded."""
    with open_image(data, max_pixels) as image:
        width, height = image.size
        try:
            image.load()
            if exif_transpose:
                ImageOps.exif_transpose(image, in_place=True)
            return _to_rgb(image)
        # Pillow's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error... on bad data.
        except Exception as exc:
            raise ImageError(f"corrupt or truncated {image.format} image ({width}x{height}): {exc}") from None


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in _SIXTEEN_BIT_MODES:
        # MindSpore (via OpenCV) keeps the high byte; Pillow's convert("RGB") would clip at 255.
        gray = (np.clip(np.asarray(image), 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
        return cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image)


def resize_crop(rgb: np.ndarray, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB uint8 HWC -> the uint8 HWC crop the network sees: resize the short side, centre crop."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        desc = (
            f"{rgb.dtype} array of shape {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        )
        raise ImageError(f"expected an RGB uint8 array of shape (height, width, 3), got {desc}")
    height, width = rgb.shape[:2]
    if height < 1 or width < 1:
        raise ImageError(f"image has no pixels ({width}x{height})")
    new_h, new_w = resized_shape(height, width, spec.resize_size)
    if new_h * new_w > max_pixels:
        # A 1x40000 strip is tiny but would resize to 256x10240000: refuse extreme aspect ratios.
        what = f"a {width}x{height} image resizes to {new_w}x{new_h} (short side {spec.resize_size})"
        raise too_many_pixels(what, new_h * new_w, max_pixels)
    resized = cv2.resize(np.ascontiguousarray(rgb), (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    top = (new_h - spec.input_size) // 2
    left = (new_w - spec.input_size) // 2
    return resized[top : top + spec.input_size, left : left + spec.input_size]


def normalize(pixels: np.ndarray, spec: PreprocessSpec, channels_last: bool, out: np.ndarray) -> np.ndarray:
    """uint8 pixels (N, 3, S, S), or (N, S, S, 3) when `channels_last`, -> normalized NCHW in `out`.

    The last step of the eval transform, shared by decoded images and by clients that send
    UINT8 tensors, so both give the model identical input: MindSpore's Normalize receives
    mean*255 and std*255 computed in double, then works in float32.
    """
    nchw = pixels.transpose(0, 3, 1, 2) if channels_last else pixels
    mean = np.array([m * 255 for m in spec.mean], dtype=np.float32)[:, None, None]
    std = np.array([s * 255 for s in spec.std], dtype=np.float32)[:, None, None]
    work = out if out.dtype == np.float32 else np.empty(out.shape, np.float32)
    np.subtract(nchw, mean, out=work, dtype=np.float32)
    np.divide(work, std, out=work)
    if work is not out:
        out[...] = work
    return out


def preprocess_array(
    rgb: np.ndarray, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """RGB uint8 HWC -> normalised float32 CHW: resize short side, centre crop, normalise."""
    crop = resize_crop(rgb, spec, max_pixels)
    out = np.empty((1, 3, spec.input_size, spec.input_size), np.float32)
    return normalize(crop[None], spec, channels_last=True, out=out)[0]


def preprocess_image(data: bytes, spec: PreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes -> the float32 CHW tensor the model was evaluated on."""
    return preprocess_array(decode_image(data, max_pixels, spec.exif_transpose), spec, max_pixels)


def default_workers() -> int:
    """One decoding thread per usable core. Pillow and OpenCV release the GIL, so each thread
    keeps a core busy: with fewer threads than cores, encoded images cannot arrive as fast as a
    GPU consumes them."""
    return usable_cores()


class ImagePreprocessor:
    """Preprocesses a batch of encoded images on a bounded thread pool.

    Pillow's decoders and OpenCV's resize release the GIL, so threads decode in parallel
    without blocking the server's event loop. Every header is read before anything is decoded,
    so a request over its pixel budget costs microseconds, not seconds.
    """

    def __init__(
        self,
        spec: PreprocessSpec,
        max_workers: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_request_pixels: int = MAX_REQUEST_PIXELS,
    ) -> None:
        """`max_workers` 0 means `default_workers()`."""
        if max_workers < 0:
            raise ValueError(f"max_workers must be >= 0, got {max_workers}")
        self.spec = spec
        self.max_pixels = max_pixels
        self.max_request_pixels = max_request_pixels
        self.max_workers = max_workers or default_workers()
        self._pool = ThreadPoolExecutor(self.max_workers, thread_name_prefix="preprocess")

    def check_headers(self, images: list[bytes]) -> int:
        """Declared pixels of all `images`; an ImageError names the first bad one by its index."""
        total = 0
        for index, data in enumerate(images):
            try:
                total += declared_pixels(data, self.max_pixels)
            except ImageError as exc:
                raise ImageError(f"image {index}: {exc}") from None
        if total > self.max_request_pixels:
            error = too_many_pixels(
                f"the request's {len(images)} images together", total, self.max_request_pixels
            )
            raise ImageError(f"{error} per request; send fewer or smaller images")
        return total

    async def preprocess_many(self, images: list[bytes], out: np.ndarray | None = None) -> np.ndarray:
        """Encoded images -> normalized NCHW, each decoded on the pool straight into its row of
        `out` (float32 when not given); an ImageError names the first bad image by its index.

        Returns only when no pool thread writes into `out` any more, also when cancelled, so the
        caller may reuse `out` (a shared-memory slot) at once.
        """
        size = self.spec.input_size
        batch = np.empty((len(images), 3, size, size), np.float32) if out is None else out
        if len(images) == 1:  # most requests: the checks and the decode in one job, one thread hop
            futures = [self._pool.submit(self._checked_into, images[0], batch)]
        else:
            await asyncio.get_running_loop().run_in_executor(self._pool, self.check_headers, images)
            futures = [self._pool.submit(self._into, data, batch, i) for i, data in enumerate(images)]
        try:
            if futures:
                await asyncio.wait([asyncio.wrap_future(f) for f in futures])
        finally:
            running = [f for f in futures if not f.cancel() and not f.done()]
            if running:  # cancelled: images already being decoded still land in `batch`
                await asyncio.wait([asyncio.wrap_future(f) for f in running])
        for index, future in enumerate(futures):
            error = future.result()
            if isinstance(error, ImageError):
                raise ImageError(f"image {index}: {error}") from None
            if error is not None:
                raise error
        return batch

    def _checked_into(self, data: bytes, batch: np.ndarray) -> Exception | None:
        """The only image of a request: its header checks (raised, as `check_headers` words them),
        then its decode into row 0 (`_into`)."""
        self.check_headers([data])
        return self._into(data, batch, 0)

    def _into(self, data: bytes, batch: np.ndarray, index: int) -> Exception | None:
        """Decode one image into its row; its error is returned, so none is left unretrieved."""
        try:
            rgb = decode_image(data, self.max_pixels, self.spec.exif_transpose)
            crop = resize_crop(rgb, self.spec, self.max_pixels)
            normalize(crop[None], self.spec, channels_last=True, out=batch[index : index + 1])
        except Exception as exc:
            return exc
        return None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
