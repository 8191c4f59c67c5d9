"""Every client method, blocking and asyncio, against a real server on 127.0.0.1."""

from __future__ import annotations

import io
from typing import Any

import grpc
import numpy as np
import pytest
from PIL import Image

from clients import Classification, ClientError, StreamResult
from core.metadata import ModelMetadata
from serving.engine.preprocess import PreprocessSpec, decode_image, preprocess_image, resize_crop
from training.export import read_onnx_metadata


def _same(a: Classification, b: Classification) -> None:
    assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
    assert [p.score for p in a.predictions] == pytest.approx([p.score for p in b.predictions], abs=1e-5)


def test_classify_one_image_of_each_kind(connect: Any, grpc_server: Any, digit_images: list) -> None:
    client = connect(grpc_server.address)
    image = digit_images[0]
    by_path = client.classify(image.path)
    assert isinstance(by_path, Classification)
    assert by_path.model_name == "hrnet" and by_path.model_version == "1"
    assert len(by_path.predictions) == 5
    scores = [p.score for p in by_path.predictions]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    assert by_path.label == f"digit-{by_path.index}" and by_path.latency_s > 0

    pil = Image.open(io.BytesIO(image.png))
    pixels = np.asarray(pil.convert("RGB"))
    # bytes, a PIL image and a uint8 array of the same pixels classify identically (PNG is lossless)
    for other in (image.png, bytearray(image.png), pil, pixels, str(image.path)):
        _same(client.classify(other), by_path)


def test_classify_many_returns_one_result_per_image_in_order(
    connect: Any, grpc_server: Any, digit_images: list
) -> None:
    client = connect(grpc_server.address)
    images = digit_images[:6]
    many = client.classify([i.path for i in images], top_k=3)
    assert isinstance(many, list) and len(many) == 6
    for image, result in zip(images, many, strict=True):
        assert len(result.predictions) == 3
        _same(result, client.classify(image.png, top_k=3))
    batch = np.stack(
        [np.asarray(Image.open(io.BytesIO(i.png)).convert("RGB").resize((40, 36))) for i in images]
    )
    assert len(client.classify(batch)) == 6  # a 4-D uint8 array is a batch of images


def test_classify_a_bad_image_fails_the_request_with_the_servers_message(
    connect: Any, grpc_server: Any, digit_images: list
) -> None:
    client = connect(grpc_server.address)
    with pytest.raises(ClientError) as info:
        client.classify([digit_images[0].png, b"definitely not an image"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "unrecognised image data" in info.value.message


def test_unknown_model_is_not_found(connect: Any, grpc_server: Any, digit_images: list) -> None:
    client = connect(grpc_server.address)
    with pytest.raises(ClientError) as info:
        client.classify(digit_images[0].png, model="nope")
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert "nope" in info.value.message


def test_a_model_version_can_be_picked(connect: Any, grpc_server: Any, digit_images: list) -> None:
    client = connect(grpc_server.address)
    assert client.classify(digit_images[0].png, version=1).model_version == "1"
    assert [r.model_version for r in client.classify([digit_images[0].png] * 2, version="1")] == ["1", "1"]
    (streamed,) = list(client.classify_stream([digit_images[0].png], version=1))
    assert streamed.ok and streamed.classification.model_version == "1"
    with pytest.raises(ClientError) as info:
        client.classify(digit_images[0].png, version=7)
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "version '7'" in info.value.message
    with pytest.raises(ValueError, match="positive integer"):
        client.classify(digit_images[0].png, version="latest")


def test_local_argument_errors_are_raised_before_sending(
    connect: Any, grpc_server: Any, tmp_path: Any
) -> None:
    client = connect(grpc_server.address)
    with pytest.raises(ClientError) as info:
        client.classify(tmp_path / "missing.png")
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and "missing.png" in info.value.message
    with pytest.raises(TypeError, match="uint8"):
        client.classify(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="top_k"):
        client.classify(b"x", top_k=0)


def test_classify_stream_keeps_input_order_and_reports_bad_items_in_place(
    connect: Any, grpc_server: Any, digit_images: list, tmp_path: Any
) -> None:
    client = connect(grpc_server.address)
    images: list[Any] = [i.png for i in digit_images[:20]]
    images[7] = b"\x89PNG\r\n\x1a\n truncated"  # corrupt, rejected by the server
    images[12] = tmp_path / "missing.png"  # unreadable, rejected by the client
    results = list(client.classify_stream(iter(images), top_k=2, max_in_flight=3))
    assert [r.index for r in results] == list(range(20))
    assert all(isinstance(r, StreamResult) for r in results)
    assert not results[7].ok and results[7].error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert not results[7].error.message.startswith("image 0")  # item 7 of the stream, not "image 0"
    assert not results[12].ok and "missing.png" in results[12].error.message
    for i, result in enumerate(results):
        if i not in (7, 12):
            assert result.ok, result.error
            _same(result.classification, client.classify(images[i], top_k=2))


def test_infer_fp32_and_fp16_match_classify(
    connect: Any, grpc_server: Any, model_repo: Any, digit_images: list
) -> None:
    client = connect(grpc_server.address)
    meta: ModelMetadata = read_onnx_metadata(model_repo.onnx)
    spec = PreprocessSpec.from_metadata(meta)
    images = digit_images[:4]
    tensor = np.stack([preprocess_image(i.png, spec) for i in images])
    result = client.infer(tensor)
    assert (
        result.model_name == "hrnet" and result.output.shape == (4, 10) and result.output.dtype == np.float32
    )
    half = client.infer(tensor.astype(np.float16)).output
    np.testing.assert_allclose(half, result.output, atol=0.05)
    for image, logits in zip(images, result.output, strict=True):
        expected = client.classify(image.png, top_k=1)
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        assert int(np.argmax(logits)) == expected.index
        assert float(probabilities.max()) == pytest.approx(expected.score, abs=1e-4)
    with pytest.raises(ValueError, match="NCHW"):
        client.infer(tensor[0])
    crops = np.stack([resize_crop(decode_image(i.png), spec) for i in images])  # the server normalizes
    np.testing.assert_allclose(client.infer(crops).output, result.output, rtol=1e-5, atol=1e-5)


def test_model_metadata_health_and_readiness(connect: Any, grpc_server: Any) -> None:
    client = connect(grpc_server.address)
    info = client.model_metadata()
    assert info.name == "hrnet" and info.versions == ("1",)
    assert [(t.datatype, t.shape) for t in info.inputs] == [("FP32", (-1, 3, 32, 32))]
    assert [(t.datatype, t.shape) for t in info.outputs] == [("FP32", (-1, 10))]
    plain = client.model_metadata(model="plain")
    assert plain.inputs[0].name == "input" and plain.outputs[0].shape == (-1, 5)
    assert client.server_ready() is True
    health = client.health()
    assert (health.live, health.ready, health.model_ready) == (True, True, True)
    with pytest.raises(ClientError) as info_error:
        client.health(model="nope")
    assert info_error.value.code == grpc.StatusCode.NOT_FOUND


def test_one_client_shared_between_threads(grpc_server: Any, digit_images: list) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from clients import Client

    with Client(grpc_server.address) as client:
        expected = {i: client.classify(digit_images[i].png).index for i in range(8)}
        with ThreadPoolExecutor(8) as pool:
            got = list(
                pool.map(lambda i: (i, client.classify(digit_images[i].png).index), list(range(8)) * 4)
            )
    assert all(expected[i] == index for i, index in got)
    with pytest.raises(ValueError):  # the context manager closed the channel
        client.classify(digit_images[0].png)
