"""A corpus of bad (and unusual but valid) input, sent as a hostile client would, to `hrnet serve`.

Each kind is one row of CORPUS: how it is sent, the status it must get and a pattern its message
must match (or, for valid input, what the answer holds). One parametrized test sends them all to
one server in a child process; then the server must answer a good request with exactly the
logits it gave before the corpus, and its resident memory must be back within 10% of where it was.
"""

from __future__ import annotations

import io
import re
import struct
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from protos import classifier_pb2 as cpb
from protos import classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.process import ServerProcess

SIZE = 32
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
CANCELLED = grpc.StatusCode.CANCELLED
MESSAGE_MB = 16  # the corpus server's message limit, so "above the limit" stays small


# --- images -------------------------------------------------------------------------------------


def _photo(width: int = 48, height: int = 40) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _encoded(fmt: str, **options: Any) -> bytes:
    return _save(Image.fromarray(_photo()), fmt, **options)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG header for width x height over a few bytes of zeros: tiny on the wire."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(bytes(min(width, 1 << 16) + 1))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", body)
        + _png_chunk(b"IEND", b"")
    )


def _gif_declaring(width: int, height: int) -> bytes:
    """A 29-byte GIF whose header declares width x height."""
    size = struct.pack("<HH", width, height)
    return b"GIF89a" + size + b"\x00\x00\x00," + b"\x00\x00\x00\x00" + size + b"\x00\x02\x02D\x01\x00;"


def _corrupt_png_data() -> bytes:
    data = bytearray(_encoded("PNG"))
    start = data.index(b"IDAT") + 4
    data[start : start + 40] = bytes(range(40))  # the header is intact, the pixel stream is not
    return bytes(data)


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(np.roll(_photo(), shift, axis=1)) for shift in (0, 8, 16)]
    return _save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)


def _multipage_tiff() -> bytes:
    frames = [Image.fromarray(_photo()), Image.fromarray(_photo()[::-1])]
    return _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return _save(Image.fromarray(_photo()), "JPEG", exif=exif)


def _palette_with_transparency() -> bytes:
    image = Image.fromarray(_photo()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(image, "PNG", transparency=0)


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64"/></svg>'
PDF = b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
HEIC = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64)


# --- requests -------------------------------------------------------------------------------------


def classify(*images: bytes, **fields: Any) -> cpb.ClassifyRequest:
    return cpb.ClassifyRequest(model_name="hrnet", images=list(images), **fields)


def tensor(
    batch: np.ndarray, datatype: str = "FP32", model: str = "hrnet", **params: Any
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="t")
    request.inputs.add(name="image", datatype=datatype, shape=list(batch.shape))
    request.raw_input_contents.append(batch.tobytes())
    for key, value in params.items():
        if isinstance(value, str):
            request.parameters[key].string_param = value
        else:
            request.parameters[key].int64_param = value
    return request


def encoded(images: list[bytes], count: int | None = None) -> pb.ModelInferRequest:
    """A KServe BYTES tensor of encoded images (length-prefixed raw contents)."""
    request = pb.ModelInferRequest(model_name="hrnet")
    request.inputs.add(name="image", datatype="BYTES", shape=[len(images) if count is None else count])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(i)) + i for i in images))
    return request


def good_batch(n: int = 1) -> np.ndarray:
    return np.random.default_rng(n).normal(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)


def _with(
    request: pb.ModelInferRequest, change: Callable[[pb.ModelInferRequest], Any]
) -> pb.ModelInferRequest:
    change(request)
    return request


def _typed_and_raw() -> pb.ModelInferRequest:
    request = tensor(good_batch())
    request.inputs[0].contents.fp32_contents.extend([0.0] * (3 * SIZE * SIZE))
    return request


def _typed_fp16() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="hrnet")
    request.inputs.add(name="image", datatype="FP16", shape=[1, 3, SIZE, SIZE])
    request.inputs[0].contents.fp32_contents.extend([0.0] * (3 * SIZE * SIZE))
    return request


def _bytes_raw(raw: bytes, count: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="hrnet")
    request.inputs.add(name="image", datatype="BYTES", shape=[count])
    request.raw_input_contents.append(raw)
    return request


def _nonfinite(value: float) -> np.ndarray:
    batch = good_batch()
    batch[0, 1, 2, 3] = value
    return batch


def _class_count(k: int) -> pb.ModelInferRequest:
    request = tensor(good_batch())
    request.outputs.add(name="logits").parameters["classification"].int64_param = k
    return request


# --- the corpus -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One kind of input: how it travels, the status it must get, a pattern of its message."""

    kind: str
    rpc: str  # Classify, ModelInfer, ModelStreamInfer, ClassifyStream, raw:<method path>, cancel
    request: Callable[[], Any]
    code: grpc.StatusCode
    message: str = ""  # a regular expression searched in the status message (or checked answer)
    answers: int = 0  # for valid input: results expected in the answer


CORPUS = [
    # Encoded images, through Classify (images=[...]).
    Case("empty image", "Classify", lambda: classify(b""), INVALID, r"^image 0: empty image: 0 bytes$"),
    Case(
        "random bytes",
        "Classify",
        lambda: classify(np.random.default_rng(0).integers(0, 256, 4096, np.uint8).tobytes()),
        INVALID,
        r"^image 0: unsupported or unrecognised image data \(4096 bytes starting b'.*'\); accepted formats",
    ),
    Case(
        "truncated JPEG",
        "Classify",
        lambda: classify(_save(Image.fromarray(_photo(320, 240)), "JPEG")[:4000]),
        INVALID,
        r"^image 0: corrupt or truncated JPEG image \(320x240\): ",
    ),
    Case(
        "truncated PNG",
        "Classify",
        lambda: classify(_encoded("PNG")[:120]),
        INVALID,
        r"^image 0: corrupt or truncated PNG image \(48x40\): ",
    ),
    Case(
        "truncated WebP",
        "Classify",
        lambda: classify(_encoded("WEBP", quality=90)[:60]),
        INVALID,
        r"^image 0: corrupt (or truncated )?WEBP (image|header)",
    ),
    Case(
        "valid PNG header, corrupt pixel data",
        "Classify",
        lambda: classify(_corrupt_png_data()),
        INVALID,
        r"^image 0: corrupt or truncated PNG image \(48x40\): ",
    ),
    Case("1x1 image", "Classify", lambda: classify(_save(Image.new("RGB", (1, 1)), "PNG")), OK, answers=1),
    Case(
        "decompression bomb: 20000x20000 PNG",
        "Classify",
        lambda: classify(_png_declaring(20000, 20000)),
        INVALID,
        r"^image 0: PNG image is 20000x20000 = 400000000 pixels, more than the limit of 50000000$",
    ),
    Case(
        "tiny file declaring 100000x100000",
        "Classify",
        lambda: classify(_png_declaring(100000, 100000)),
        INVALID,
        r"^image 0: PNG image is 100000x100000 = 10000000000 pixels, more than the limit of 50000000$",
    ),
    Case(
        "200 GIFs of 29 bytes declaring 6000x6000 (7.2 Gpx)",
        "ModelInfer",
        lambda: encoded([_gif_declaring(6000, 6000)] * 200),
        INVALID,
        r"^the request's 200 images together = 7200000000 pixels, more than the limit of 200000000 per",
    ),
    Case(
        "100,000 1x1 GIFs in one request (3.7 MiB)",
        "ModelInfer",
        lambda: encoded([_save(Image.new("P", (1, 1)), "GIF")] * 100_000),
        INVALID,
        r"^a request of 100000 images exceeds max_queue_size 256; send fewer per request$",
    ),
    Case(
        "extreme aspect ratio 40000x1",
        "Classify",
        lambda: classify(_save(Image.new("L", (40000, 1)), "PNG")),
        INVALID,
        r"^image 0: a 40000x1 image resizes to 1480000x37 \(short side 37\) = 54760000 pixels, more than",
    ),
    Case(
        "PNG of width 0", "Classify", lambda: classify(_png_declaring(0, 16)), INVALID, r"no pixels \(0x16\)$"
    ),
    Case("animated GIF (first frame)", "Classify", lambda: classify(_animated("GIF")), OK, answers=1),
    Case("APNG (first frame)", "Classify", lambda: classify(_animated("PNG")), OK, answers=1),
    Case(
        "multi-page TIFF",
        "Classify",
        lambda: classify(_multipage_tiff()),
        INVALID,
        r"^image 0: TIFF images are not supported; accepted formats: JPEG, PNG, WebP, BMP, GIF$",
    ),
    Case(
        "CMYK JPEG",
        "Classify",
        lambda: classify(_save(Image.fromarray(_photo()).convert("CMYK"), "JPEG")),
        OK,
        answers=1,
    ),
    Case(
        "16-bit PNG",
        "Classify",
        lambda: classify(_save(Image.fromarray(_photo()[..., 0].astype(np.uint16) * 257), "PNG")),
        OK,
        answers=1,
    ),
    Case(
        "palette with transparency", "Classify", lambda: classify(_palette_with_transparency()), OK, answers=1
    ),
    Case(
        "LA (gray + alpha)",
        "Classify",
        lambda: classify(_save(Image.new("LA", (20, 30)), "PNG")),
        OK,
        answers=1,
    ),
    Case("EXIF-rotated JPEG", "Classify", lambda: classify(_exif_rotated()), OK, answers=1),
    Case("BMP and WebP", "Classify", lambda: classify(_encoded("BMP"), _encoded("WEBP")), OK, answers=2),
    Case("SVG", "Classify", lambda: classify(SVG), INVALID, r"^image 0: SVG images are not supported"),
    Case("PDF", "Classify", lambda: classify(PDF), INVALID, r"^image 0: PDF images are not supported"),
    Case("HEIC", "Classify", lambda: classify(HEIC), INVALID, r"^image 0: HEIC images are not supported"),
    Case(
        "one bad image among good ones",
        "Classify",
        lambda: classify(_encoded("PNG"), _encoded("PNG"), b"GIF89a"),
        INVALID,
        r"^image 2: corrupt GIF header \(6 bytes\)",
    ),
    # Tensors, through ModelInfer.
    Case(
        "wrong datatype",
        "ModelInfer",
        lambda: tensor(good_batch().astype(np.int32), datatype="INT32"),
        INVALID,
        r"^input 'image': datatype 'INT32' not supported; use FP32, FP16, UINT8 or BYTES$",
    ),
    Case(
        "wrong rank",
        "ModelInfer",
        lambda: tensor(good_batch()[0]),
        INVALID,
        r"expected shape \[-1, 3, 32, 32\] \(N >= 1\), got \[3, 32, 32\]$",
    ),
    Case(
        "wrong shape",
        "ModelInfer",
        lambda: tensor(np.zeros((1, 3, 16, 16), np.float32)),
        INVALID,
        r"expected shape \[-1, 3, 32, 32\] \(N >= 1\), got \[1, 3, 16, 16\]$",
    ),
    Case(
        "a rank of 1000",
        "ModelInfer",
        lambda: _with(tensor(good_batch()), lambda r: r.inputs[0].shape.extend([1] * 996)),
        INVALID,
        r"\.\.\. \(3002 characters\) must have 1 to 8 dimensions, each >= 0$",
    ),
    Case(
        "an empty shape whose other dimensions overflow (found by the fuzzer: was INTERNAL)",
        "Classify",
        lambda: cpb.ClassifyRequest(
            model_name="hrnet", tensor=cpb.Tensor(datatype="FP32", shape=[32, 32, 0, 1570, 2708, 529640841])
        ),
        INVALID,
        r"^tensor: shape \[32, 32, 0, 1570, 2708, 529640841\] is larger than any tensor this server accepts$",
    ),
    Case(
        "zero-size batch",
        "ModelInfer",
        lambda: tensor(np.zeros((0, 3, SIZE, SIZE), np.float32)),
        INVALID,
        r"got \[0, 3, 32, 32\]$",
    ),
    Case(
        "batch above the queue limit",
        "ModelInfer",
        lambda: tensor(np.zeros((257, 3, SIZE, SIZE), np.float32)),
        INVALID,
        r"^a request of 257 images exceeds max_queue_size 256",
    ),
    Case(
        "2,000 FP16 images (refused before conversion)",
        "ModelInfer",
        lambda: tensor(np.zeros((2000, 3, SIZE, SIZE), np.float16), datatype="FP16"),
        INVALID,
        r"^a request of 2000 images exceeds max_queue_size 256",
    ),
    Case(
        "NaN values",
        "ModelInfer",
        lambda: tensor(_nonfinite(np.nan)),
        INVALID,
        r"^the input holds NaN or infinite values \(the first at index \[0, 1, 2, 3\]\)",
    ),
    Case(
        "infinite values (FP16)",
        "ModelInfer",
        lambda: tensor(_nonfinite(np.inf).astype(np.float16), datatype="FP16"),
        INVALID,
        r"^the input holds NaN or infinite values",
    ),
    Case(
        "raw buffer of the wrong length",
        "ModelInfer",
        lambda: _with(tensor(good_batch()), lambda r: r.raw_input_contents.__setitem__(0, bytes(12284))),
        INVALID,
        r"raw content is 12284 bytes but shape \[1, 3, 32, 32\] of FP32 needs 12288$",
    ),
    Case(
        "raw and typed contents both set",
        "ModelInfer",
        _typed_and_raw,
        INVALID,
        r"both raw_input_contents and typed contents given",
    ),
    Case("FP16 as typed contents", "ModelInfer", _typed_fp16, INVALID, r"FP16 data travels only as raw"),
    Case(
        "BYTES with a length prefix past the end",
        "ModelInfer",
        lambda: _bytes_raw(struct.pack("<I", 1000) + b"\x89PNG", 1),
        INVALID,
        r"BYTES element of 1000 bytes at byte 4 overruns 8 bytes$",
    ),
    Case(
        "BYTES with a truncated length prefix",
        "ModelInfer",
        lambda: _bytes_raw(b"\x05\x00", 1),
        INVALID,
        r"truncated BYTES length prefix at byte 0 of 2$",
    ),
    Case(
        "BYTES count unlike the shape",
        "ModelInfer",
        lambda: encoded([_encoded("PNG")], count=2),
        INVALID,
        r"shape \[2\] holds 2 BYTES elements, got 1$",
    ),
    Case(
        "two inputs",
        "ModelInfer",
        lambda: _with(tensor(good_batch()), lambda r: r.inputs.add(name="extra", datatype="FP32", shape=[1])),
        INVALID,
        r"^expected exactly one input 'image', got 2: \['image', 'extra'\]$",
    ),
    # Protocol.
    Case(
        "unknown model",
        "ModelInfer",
        lambda: tensor(good_batch(), model="resnet"),
        NOT_FOUND,
        r"^model 'resnet' is not served here; available: hrnet$",
    ),
    Case(
        "unknown version",
        "ModelInfer",
        lambda: _with(tensor(good_batch()), lambda r: setattr(r, "model_version", "7")),
        NOT_FOUND,
        r"^model 'hrnet' version '7' is not served here; available: hrnet 1$",
    ),
    Case(
        "a model name of 20,000 characters",
        "ModelInfer",
        lambda: tensor(good_batch(), model="m" * 20000),
        NOT_FOUND,
        r"^model 'm{79}\.\.\. \(20002 characters\) is not served here",
    ),
    Case(
        "unknown input",
        "ModelInfer",
        lambda: _with(tensor(good_batch()), lambda r: setattr(r.inputs[0], "name", "pixels")),
        INVALID,
        r"^unknown input 'pixels'; the model's input is 'image'$",
    ),
    Case(
        "unknown output",
        "ModelInfer",
        lambda: _with(tensor(good_batch()), lambda r: r.outputs.add(name="probs")),
        INVALID,
        r"^unknown output 'probs'; the model's output is 'logits'$",
    ),
    Case("negative class_count", "ModelInfer", lambda: _class_count(-3), INVALID, r"must be >= 1, got -3$"),
    Case("oversized class_count (capped)", "ModelInfer", lambda: _class_count(10**9), OK, answers=1),
    Case(
        "oversized top_k (capped)",
        "Classify",
        lambda: classify(_encoded("PNG"), top_k=4_000_000_000),
        OK,
        answers=1,
    ),
    Case(
        "misspelled parameter",
        "ModelInfer",
        lambda: tensor(good_batch(), timout=5000),
        INVALID,
        r"^unknown request parameter 'timout'; accepted: priority, timeout$",
    ),
    Case(
        "ill-typed parameter",
        "ModelInfer",
        lambda: tensor(good_batch(), timeout="5s"),
        INVALID,
        r"^parameter 'timeout' must be an integer, got string_param$",
    ),
    Case(
        "negative priority",
        "ModelInfer",
        lambda: tensor(good_batch(), priority=-1),
        INVALID,
        r"^parameter 'priority' must be >= 0, got -1$",
    ),
    Case(
        "a message above the size limit",
        "ModelInfer",
        lambda: tensor(np.zeros((MESSAGE_MB * (1 << 20) // 12288 + 1, 3, SIZE, SIZE), np.float32)),
        EXHAUSTED,
        r"(?i)received message larger than max",
    ),
    Case(
        "malformed protobuf",
        "raw:/inference.GRPCInferenceService/ModelInfer",
        lambda: b"\xff\xff\xff\xff\x0f",
        INVALID,
        r"^malformed request: 5 bytes that do not parse as the request message of /inference",
    ),
    Case(
        "Classify with images and a tensor",
        "Classify",
        lambda: classify(b"x", tensor=cpb.Tensor(datatype="FP32", shape=[1])),
        INVALID,
        r"^send either images or a tensor, not both and not neither$",
    ),
    Case(
        "a streaming request without an id",
        "ModelStreamInfer",
        lambda: [_with(tensor(good_batch()), lambda r: r.ClearField("id"))],
        OK,
        answers=1,
    ),
    Case(
        "a stream whose second request is bad",
        "ClassifyStream",
        lambda: [classify(_encoded("PNG"), id="0"), classify(b"", id="1"), classify(_encoded("PNG"), id="2")],
        OK,
        r"^1: image 0: empty image",
        answers=3,
    ),
    Case(
        "a stream that sends garbage after good requests",
        "raw-stream:/hrnet.v1.Classifier/ClassifyStream",
        lambda: [classify(_encoded("PNG")).SerializeToString()] * 2 + [b"\xff\xff\xff\xff\x0f"],
        INVALID,
        r"^malformed request: 5 bytes",
        answers=2,
    ),
    Case(
        "a client that disconnects mid-request",
        "cancel",
        lambda: encoded([_encoded("PNG")] * 200),
        CANCELLED,
    ),
]


# --- running it -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    message: str
    answers: int


@pytest.fixture(scope="module", params=["1", "2"], ids=["one process", "two front ends"])
def corpus_server(model_repo, tmp_path_factory, request):
    """The server the corpus is sent to: one process, and front-end processes in front of the owner
    (the same statuses and messages either way)."""
    repo = tmp_path_factory.mktemp("corpus_repo")
    (repo / "hrnet" / "1").mkdir(parents=True)
    (repo / "hrnet" / "1" / "model.onnx").write_bytes(model_repo.onnx.read_bytes())
    args = ["--repo", str(repo), "--metrics-port", "-1", "--max-message-mb", str(MESSAGE_MB)]
    server = ServerProcess([*args, "--workers", request.param])
    server.start()
    limit = (MESSAGE_MB + 8) << 20
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(server.address, options=options) as channel:
        baseline = _baseline(channel)
        for _ in range(3):  # warm up every path once before memory is measured
            _baseline(channel)
            send(channel, next(case for case in CORPUS if case.kind == "BMP and WebP"))
        yield server, channel, baseline, _settled_rss(server)
    server.stop()


def _baseline(channel: grpc.Channel) -> np.ndarray:
    response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(tensor(good_batch(4)), timeout=30)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(4, -1).copy()


# The defect multiplied the floor by 4 to 10; allocator noise under a loaded CI machine is ~10%.
FLOOR_GROWTH = 1.25


def _settled_rss(server: ServerProcess) -> int:
    time.sleep(2.5)  # the server trims its heap once it has been quiet for a second
    return server.rss_bytes()


def send(channel: grpc.Channel, case: Case) -> Outcome:
    kserve = pb_grpc.GRPCInferenceServiceStub(channel)
    classifier = classifier_pb2_grpc.ClassifierStub(channel)
    identity = {"request_serializer": bytes, "response_deserializer": bytes}
    request = case.request()
    kind, _, path = case.rpc.partition(":")
    answers: list[Any] = []
    try:
        if kind == "Classify":
            answers = list(classifier.Classify(request, timeout=60).results)
        elif kind == "ModelInfer":
            answers = [kserve.ModelInfer(request, timeout=60)]
        elif kind == "raw":
            answers = [channel.unary_unary(path, **identity)(request, timeout=60)]
        elif kind == "cancel":
            call = kserve.ModelInfer.future(request, timeout=60)
            time.sleep(0.05)
            call.cancel()
            return Outcome(call.code(), call.details() or "", 0)
        else:
            stream = {
                "ModelStreamInfer": kserve.ModelStreamInfer,
                "ClassifyStream": classifier.ClassifyStream,
                "raw-stream": channel.stream_stream(path, **identity),
            }[kind]
            for answer in stream(iter(request), timeout=60):
                answers.append(answer)
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", len(answers))
    return Outcome(OK, "; ".join(_item_errors(answers)), len(answers))


def _item_errors(answers: list[Any]) -> list[str]:
    """The errors a stream reports inside its answers, as `id: message`."""
    errors = []
    for answer in answers:
        if isinstance(answer, pb.ModelStreamInferResponse) and answer.error_message:
            errors.append(f"{answer.infer_response.id}: {answer.error_message}")
        if isinstance(answer, cpb.ClassifyResponse) and answer.HasField("error"):
            errors.append(f"{answer.id}: {answer.error.message}")
    return errors


@pytest.mark.parametrize("case", CORPUS, ids=[case.kind for case in CORPUS])
def test_bad_input_gets_its_status_and_message(corpus_server, case: Case) -> None:
    server, channel, _, _ = corpus_server
    started = time.monotonic()
    outcome = send(channel, case)
    assert outcome.code == case.code, outcome.message
    assert re.search(case.message, outcome.message), outcome.message
    assert len(outcome.message) <= 1100  # bounded, whatever the client sent
    if case.answers:
        assert outcome.answers == case.answers
    # Refused from headers and counts, never by decoding it: the slowest case answers in 0.2 s here
    # (sending 3.7 MiB included), so 10 s is 50x that for a loaded machine. Decoding is caught by
    # the message above as much as by the time (each refusal names a limit read from the headers).
    assert time.monotonic() - started < 10
    assert server.proc is not None and server.proc.poll() is None


def test_after_the_corpus_the_server_answers_exactly_as_before(corpus_server) -> None:
    server, channel, baseline, rss_before = corpus_server
    np.testing.assert_array_equal(_baseline(channel), baseline)
    rss_after = _settled_rss(server)
    assert rss_after <= FLOOR_GROWTH * rss_before, (rss_before >> 20, rss_after >> 20)


@pytest.mark.slow  # ~10 s of large images and RSS settling
def test_a_burst_of_large_images_does_not_raise_the_memory_floor(corpus_server) -> None:
    """Was: 272 MB at start, 1.15 GB after the corpus and 2.93 GB after one large request, for good."""
    server, channel, _, _ = corpus_server
    rss_before = _settled_rss(server)
    noise = np.random.default_rng(7).integers(0, 256, (480, 640, 3), np.uint8)
    photos = [_save(Image.fromarray(np.roll(noise, i, axis=0)), "PNG", compress_level=1) for i in range(16)]
    kserve = pb_grpc.GRPCInferenceServiceStub(channel)
    with ThreadPoolExecutor(16) as pool:
        calls = [pool.submit(kserve.ModelInfer, encoded(photos), timeout=120) for _ in range(48)]
        peak = max(server.rss_bytes() for _ in range(20) if not time.sleep(0.1))
        assert all(call.result().outputs[0].shape[0] == 16 for call in calls)
    rss_after = _settled_rss(server)
    assert rss_after <= FLOOR_GROWTH * rss_before, (rss_before >> 20, peak >> 20, rss_after >> 20)
