"""Every RPC of a real server on 127.0.0.1 serving a small exported HRNet, through our stubs."""

from __future__ import annotations

import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from core.metadata import ModelMetadata
from protos import classifier_pb2, classifier_pb2_grpc
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from serving.engine.preprocess import PreprocessSpec, preprocess_image

SIZE = 32
CLASSES = 10


@pytest.fixture(scope="module")
def channel(grpc_server):
    with grpc.insecure_channel(
        grpc_server.address,
        options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)],
    ) as ch:
        yield ch


@pytest.fixture(scope="module")
def kserve(channel):
    return pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture(scope="module")
def classifier(channel):
    return classifier_pb2_grpc.ClassifierStub(channel)


@pytest.fixture(scope="module")
def reference(model_repo):
    """Direct onnxruntime on the same preprocessing: what the server must reproduce."""
    session = ort.InferenceSession(str(model_repo.onnx), providers=["CPUExecutionProvider"])
    meta = ModelMetadata.from_json(session.get_modelmeta().custom_metadata_map["hrnet_metadata"])
    spec = PreprocessSpec.from_metadata(meta)

    def logits_of(pngs: list[bytes]) -> np.ndarray:
        batch = np.stack([preprocess_image(p, spec) for p in pngs])
        return session.run(None, {"image": batch})[0]

    return logits_of


def tensor_request(
    batch: np.ndarray, model: str = "hrnet", datatype: str = "FP32", **params
) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="req-1")
    request.inputs.add(name="image", datatype=datatype, shape=list(batch.shape))
    request.raw_input_contents.append(batch.tobytes())
    for key, value in params.items():
        request.parameters[key].int64_param = value
    return request


def bytes_request(pngs: list[bytes], model: str = "hrnet") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="image", datatype="BYTES", shape=[len(pngs)])
    request.raw_input_contents.append(b"".join(struct.pack("<I", len(p)) + p for p in pngs))
    return request


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    out = response.outputs[0]
    assert out.datatype == "FP32"
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(out.shape))


def code_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value.code(), info.value.details()


def test_server_live_ready_metadata(kserve) -> None:
    assert kserve.ServerLive(pb.ServerLiveRequest()).live
    assert kserve.ServerReady(pb.ServerReadyRequest()).ready
    assert kserve.ModelReady(pb.ModelReadyRequest(name="hrnet")).ready
    assert kserve.ModelReady(pb.ModelReadyRequest(name="hrnet_ms", version="1")).ready
    meta = kserve.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "hrnet" and "classification" in meta.extensions


def test_model_metadata_config_and_defaults_for_foreign_onnx(kserve, grpc_server) -> None:
    meta = kserve.ModelMetadata(pb.ModelMetadataRequest(name="hrnet"))
    assert (meta.platform, list(meta.versions)) == ("onnxruntime_onnx", ["1"])
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "FP32", [-1, 3, SIZE, SIZE])
    ]
    assert list(meta.outputs[0].shape) == [-1, CLASSES]
    config = kserve.ModelConfig(pb.ModelConfigRequest(name="hrnet")).config
    assert config.max_batch_size == 16 and config.dynamic_batching.max_queue_delay_microseconds == 5000
    assert config.parameters["labels"].string_value.split(",")[3] == "digit-3"
    assert config.backend == "onnxruntime" and config.instance_group[0].count == 1
    # An ONNX classifier without our metadata: size from its input shape, ImageNet stats, numeric labels.
    plain = kserve.ModelConfig(pb.ModelConfigRequest(name="plain")).config
    assert list(plain.input[0].dims) == [3, 16, 16] and plain.input[0].name == "input"
    assert plain.parameters["mean"].string_value == "0.485,0.456,0.406"
    assert plain.parameters["labels"].string_value == ""
    # The precision comes from the model card; a file without one does not pretend to know it.
    assert config.parameters["precision"].string_value == "fp32"
    assert plain.parameters["precision"].string_value == "unknown"
    assert grpc_server.metric("hrnet_model_info", model="hrnet", backend="onnxruntime", precision="fp32") == 1
    assert grpc_server.metric("hrnet_model_info", model="plain", precision="unknown") == 1
    ms_meta = kserve.ModelMetadata(pb.ModelMetadataRequest(name="hrnet_ms"))
    assert ms_meta.platform == "mindspore_mindir"


def test_model_infer_fp32_fp16_typed_and_bytes_agree_with_direct_onnxruntime(
    kserve, digit_images, reference
) -> None:
    pngs = [d.png for d in digit_images[:3]]
    expected = reference(pngs)
    from_images = logits_of(kserve.ModelInfer(bytes_request(pngs)))
    np.testing.assert_allclose(from_images, expected, rtol=1e-4, atol=1e-5)

    spec = PreprocessSpec(SIZE, 37, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    batch = np.stack([preprocess_image(p, spec) for p in pngs])
    response = kserve.ModelInfer(tensor_request(batch))
    assert (response.model_name, response.model_version, response.id) == ("hrnet", "1", "req-1")
    np.testing.assert_allclose(logits_of(response), expected, rtol=1e-4, atol=1e-5)

    half = kserve.ModelInfer(tensor_request(batch.astype(np.float16), datatype="FP16"))
    np.testing.assert_allclose(logits_of(half), expected, rtol=0.05, atol=5e-3)

    typed = pb.ModelInferRequest(model_name="hrnet")
    tensor = typed.inputs.add(name="image", datatype="FP32", shape=list(batch.shape))
    tensor.contents.fp32_contents.extend(batch.ravel().tolist())
    np.testing.assert_allclose(logits_of(kserve.ModelInfer(typed)), expected, rtol=1e-4, atol=1e-5)

    on_mindspore = logits_of(kserve.ModelInfer(bytes_request(pngs, model="hrnet_ms")))
    np.testing.assert_allclose(on_mindspore, expected, rtol=1e-4, atol=1e-5)


def test_foreign_onnx_classifier_serves_with_default_preprocessing(kserve, model_repo, digit_images) -> None:
    pngs = [d.png for d in digit_images[50:53]]
    request = bytes_request(pngs, model="plain")
    request.inputs[0].name = "input"
    got = logits_of(kserve.ModelInfer(request))
    spec = PreprocessSpec(16, 18, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # shape + ImageNet
    session = ort.InferenceSession(str(model_repo.plain), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": np.stack([preprocess_image(p, spec) for p in pngs])})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_classification_extension(kserve, digit_images, reference) -> None:
    pngs = [d.png for d in digit_images[:2]]
    request = bytes_request(pngs)
    request.outputs.add(name="logits").parameters["classification"].int64_param = 3
    response = kserve.ModelInfer(request)
    out = response.outputs[0]
    assert out.datatype == "BYTES" and list(out.shape) == [2, 3]
    raw, items = response.raw_output_contents[0], []
    while raw:
        (n,) = struct.unpack_from("<I", raw)
        items.append(raw[4 : 4 + n].decode())
        raw = raw[4 + n :]
    expected = reference(pngs)
    for row in range(2):
        best = np.argsort(-expected[row])[:3]
        got = [item.split(":") for item in items[row * 3 : row * 3 + 3]]
        assert [int(g[1]) for g in got] == best.tolist()
        assert [g[2] for g in got] == [f"digit-{i}" for i in best]
        assert float(got[0][0]) == pytest.approx(float(expected[row, best[0]]), abs=1e-5)


def test_model_stream_infer_answers_every_request_with_its_id(kserve, digit_images, reference) -> None:
    pngs = [d.png for d in digit_images[10:18]]

    def requests():
        for i, png in enumerate(pngs):
            request = bytes_request([png])
            request.id = f"s{i}"
            yield request
        yield bytes_request([b"not an image"])

    responses = list(kserve.ModelStreamInfer(requests(), timeout=60))
    assert len(responses) == len(pngs) + 1
    errors = [r for r in responses if r.error_message]
    assert len(errors) == 1 and errors[0].error_message.startswith("INVALID_ARGUMENT: image 0:")
    expected = reference(pngs)
    for r in responses:
        if not r.error_message:
            i = int(r.infer_response.id[1:])
            np.testing.assert_allclose(logits_of(r.infer_response)[0], expected[i], rtol=1e-4, atol=1e-5)


def test_classify_images_tensor_and_stream(classifier, digit_images, reference) -> None:
    pngs = [d.png for d in digit_images[20:24]]
    response = classifier.Classify(classifier_pb2.ClassifyRequest(images=pngs, top_k=2, id="c1"))
    assert (response.model_name, response.model_version, response.id) == ("hrnet", "1", "c1")
    expected = reference(pngs)
    for row, result in enumerate(response.results):
        assert [c.index for c in result.classes] == np.argsort(-expected[row])[:2].tolist()
        assert result.classes[0].label == f"digit-{result.classes[0].index}"
        probs = np.exp(expected[row] - expected[row].max())
        assert result.classes[0].score == pytest.approx(probs.max() / probs.sum(), rel=1e-4)

    spec = PreprocessSpec(SIZE, 37, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    batch = np.stack([preprocess_image(p, spec) for p in pngs])
    tensor = classifier_pb2.Tensor(datatype="FP32", shape=list(batch.shape), data=batch.tobytes())
    by_tensor = classifier.Classify(classifier_pb2.ClassifyRequest(model_name="hrnet", tensor=tensor))
    assert len(by_tensor.results) == 4 and len(by_tensor.results[0].classes) == 5  # default top_k

    stream = [classifier_pb2.ClassifyRequest(images=[p], id=str(i)) for i, p in enumerate(pngs)]
    stream.append(classifier_pb2.ClassifyRequest(model_name="nope", images=[pngs[0]], id="bad"))
    answers = {r.id: r for r in classifier.ClassifyStream(iter(stream), timeout=60)}
    assert answers["bad"].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    for i in range(4):
        assert answers[str(i)].results[0].classes[0].index == int(np.argmax(expected[i]))


def test_statistics_count_what_was_computed(kserve, digit_images) -> None:
    before = kserve.ModelStatistics(pb.ModelStatisticsRequest(name="hrnet")).model_stats[0]
    kserve.ModelInfer(bytes_request([d.png for d in digit_images[30:35]]))
    after = kserve.ModelStatistics(pb.ModelStatisticsRequest(name="hrnet")).model_stats[0]
    assert after.inference_count - before.inference_count == 5
    assert after.execution_count - before.execution_count == 1
    assert after.inference_stats.success.count - before.inference_stats.success.count == 1
    every = kserve.ModelStatistics(pb.ModelStatisticsRequest())
    assert {s.name for s in every.model_stats} == {"hrnet", "hrnet_ms", "plain"}


def test_health_overall_and_per_model_and_reflection(channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "hrnet", "hrnet_ms", "inference.GRPCInferenceService", "hrnet.v1.Classifier"):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == 1  # SERVING
    code, _ = code_of(health.Check, health_pb2.HealthCheckRequest(service="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"inference.GRPCInferenceService", "hrnet.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_bad_requests_get_precise_statuses(kserve, classifier) -> None:
    good = np.zeros((1, 3, SIZE, SIZE), np.float32)
    cases = [
        (tensor_request(np.zeros((1, 3, 16, 16), np.float32)), "expected shape [-1, 3, 32, 32]"),
        (tensor_request(good[0]), "got [3, 32, 32]"),
        (tensor_request(good.astype(np.int32), datatype="INT32"), "datatype 'INT32' not supported"),
        (tensor_request(good, timeout=-5), "'timeout' must be > 0"),
    ]
    short = tensor_request(good)
    short.raw_input_contents[0] = good.tobytes()[:-4]
    cases.append((short, "raw content is 12284 bytes but shape [1, 3, 32, 32] of FP32 needs 12288"))
    wrong_name = tensor_request(good)
    wrong_name.inputs[0].name = "pixels"
    cases.append((wrong_name, "unknown input 'pixels'; the model's input is 'image'"))
    cases.append((bytes_request([b"\x89PNG\r\n\x1a\n garbage"]), "image 0:"))
    for request, message in cases:
        code, details = code_of(kserve.ModelInfer, request)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert message in details
    code, details = code_of(kserve.ModelInfer, tensor_request(good, model="resnet"))
    assert code == grpc.StatusCode.NOT_FOUND and "'resnet'" in details and "hrnet" in details
    code, _ = code_of(kserve.ModelMetadata, pb.ModelMetadataRequest(name="hrnet", version="7"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, details = code_of(classifier.Classify, classifier_pb2.ClassifyRequest())
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "either images or a tensor" in details


def test_a_message_above_4_mib_passes_the_transport_and_reaches_the_shape_check(kserve) -> None:
    """gRPC's default 4 MiB receive limit would refuse it with RESOURCE_EXHAUSTED before any of our
    code ran; the server's own limit lets it through, so it is our shape check that answers, naming
    the shape it read from the whole message."""
    big = np.zeros((40, 3, 100, 100), np.float32)  # 4.8 MB: over gRPC's 4 MiB default
    assert big.nbytes > 4 << 20
    code, details = code_of(kserve.ModelInfer, tensor_request(big))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "expected shape" in details and "[40, 3, 100, 100]" in details


def test_64_concurrent_callers_get_their_own_results(
    grpc_server, channel, kserve, digit_images, reference
) -> None:
    images = digit_images[:64]
    expected = reference([d.png for d in images])
    assert len({round(float(v), 6) for v in expected[:, 0]}) > 32  # the images really differ
    health = health_pb2_grpc.HealthStub(channel)
    before = kserve.ModelStatistics(pb.ModelStatisticsRequest(name="hrnet")).model_stats[0]
    health_answers: list[int] = []
    health_errors: list[BaseException] = []
    stop = threading.Event()

    def probe_health() -> None:  # errors are kept: an assertion in a thread would not fail the test
        while not stop.is_set():
            try:
                health_answers.append(
                    health.Check(health_pb2.HealthCheckRequest(service="hrnet"), timeout=5).status
                )
            except BaseException as exc:
                health_errors.append(exc)
                return
            time.sleep(0.02)  # the probe's pace, not a wait for anything

    prober = threading.Thread(target=probe_health)
    prober.start()
    with ThreadPoolExecutor(64) as pool:
        results = list(
            pool.map(lambda d: logits_of(kserve.ModelInfer(bytes_request([d.png]), timeout=60)), images)
        )
    stop.set()
    prober.join()
    for i, got in enumerate(results):
        distances = np.abs(expected - got[0]).max(axis=1)
        assert int(np.argmin(distances)) == i
        np.testing.assert_allclose(got[0], expected[i], rtol=1e-4, atol=1e-5)
    after = kserve.ModelStatistics(pb.ModelStatisticsRequest(name="hrnet")).model_stats[0]
    assert after.inference_count - before.inference_count == 64
    # Some were batched together: 64 callers at once against one instance, whose every batch
    # computes while the others arrive; for none to share a batch, each would have to be answered
    # before the next caller's request arrived, on any machine.
    assert after.execution_count - before.execution_count < 64
    # Health answered SERVING throughout the load, each check within its 5 s deadline (the load
    # itself takes well under a second here): no latency threshold of our own.
    assert not health_errors, health_errors
    assert health_answers and set(health_answers) == {health_pb2.HealthCheckResponse.SERVING}
