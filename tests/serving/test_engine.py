"""The execution engine through real servers: one thread per instance, warm-up before readiness,
padding, provider options, FP16 models, and a hung instance replaced while the others serve.

Backends that record or misbehave are real `OnnxRuntimeBackend` subclasses registered in the
backend registry, so everything around them (instances, batcher, servicers) is the production path.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.settings import as_data, build, env_values, merge
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from protos import model_config_pb2 as mc
from serving.config import BatchingConfig, ConfigError, ModelConfig, ServerConfig, load_model_config
from serving.engine.backends import BACKENDS, open_backend
from serving.engine.backends.base import spans
from serving.engine.backends.onnxrt import OnnxRuntimeBackend, provider_options
from serving.errors import ModelLoadError
from serving.server import Server

SIZE = 32


class Recording(OnnxRuntimeBackend):
    """Notes the thread of every call into the runtime."""

    name = "recording"
    made: list[Recording] = []  # noqa: RUF012 - the instances the server made, in order

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, int]] = []
        self.rows: list[int] = []
        type(self).made.append(self)

    def _note(self, what: str) -> None:
        self.calls.append((what, threading.get_ident()))

    def load(self) -> None:
        self._note("load")
        super().load()

    def run(self, parts, rows: int) -> np.ndarray:
        self._note("run")
        self.rows.append(rows)
        return super().run(parts, rows)

    def runtime_options(self) -> dict[str, str]:
        self._note("runtime_options")
        return super().runtime_options()

    def close(self) -> None:
        self._note("close")
        super().close()

    @property
    def threads(self) -> set[int]:
        return {thread for _, thread in self.calls}


@pytest.fixture
def registered(monkeypatch) -> Iterator[type[Recording]]:
    """Registers a fresh subclass of Recording (its own `made` list) under the name `recording`."""

    def register(cls: type[Recording]) -> type[Recording]:
        cls.made = []
        monkeypatch.setitem(BACKENDS, cls.name, cls)
        return cls

    yield register


@pytest.fixture
def one_model(model_repo, tmp_path) -> Path:
    """A repository holding only the exported HRNet (32 px, 10 classes), as `hrnet`."""
    repo = tmp_path / "repo"
    (repo / "hrnet" / "1").mkdir(parents=True)
    shutil.copy(model_repo.onnx, repo / "hrnet" / "1" / "model.onnx")
    return repo


def _stub(address: str) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(address))


def _infer(stub, batch: np.ndarray, timeout: float = 30, model: str = "hrnet", input_name: str = "image"):
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=input_name, datatype="FP32", shape=list(batch.shape))
    request.raw_input_contents.append(batch.astype(np.float32).tobytes())
    response = stub.ModelInfer(request, timeout=timeout)
    return np.frombuffer(response.raw_output_contents[0], "<f4").reshape(len(batch), -1)


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, SIZE, SIZE)).astype(np.float32)


def _reference(path: Path, batch: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: batch})[0]


def _wait(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


async def _thread_id() -> int:
    return threading.get_ident()


def test_every_call_of_an_instance_runs_on_its_own_thread(registered, one_model, start_server) -> None:
    cls = registered(type("Recording3", (Recording,), {}))
    # device gpu on a machine without one: CPU provider, but padding, buckets and devices as on a GPU.
    server = start_server(
        one_model, backend="recording", device="gpu", instances=3, device_ids=(0, 1), max_batch_size=8
    )
    loop_thread = server.call(_thread_id())
    stub = _stub(server.address)
    batch = _images(48)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: _infer(stub, batch[i : i + 1]), range(48)))
    np.testing.assert_allclose(
        np.concatenate(results), _reference(one_model / "hrnet/1/model.onnx", batch), atol=1e-5
    )
    config = stub.ModelConfig(pb.ModelConfigRequest(name="hrnet")).config
    server.stop()
    made = cls.made
    _wait(lambda: all(b.calls[-1][0] == "close" for b in made))  # closed on their threads after stop
    assert len(made) == 3
    for backend in made:
        assert len(backend.threads) == 1, backend.calls  # load, warm-up, every run, close: one thread
        assert backend.calls[0][0] == "load" and backend.calls[-1][0] == "close"
        assert backend.rows[:4] == [1, 2, 4, 8]  # the warm-up ran every bucket, before any request
        assert set(backend.rows) <= {1, 2, 4, 8}  # padded: no other shape ever reached the runtime
    threads = [next(iter(b.threads)) for b in made]
    assert len(set(threads)) == 3 and not {loop_thread, threading.get_ident()} & set(threads)
    assert sum(len(b.rows) for b in made) > 3 * 4  # the requests spread over the instances
    # round robin: instances 0 and 2 on GPU 0, 1 on GPU 1 (they load on their own threads, in any order)
    assert sorted(b.device_id for b in made) == [0, 0, 1]
    groups = [(list(g.gpus), g.count, g.kind) for g in config.instance_group]
    assert groups == [([0], 2, mc.ModelInstanceGroup.KIND_GPU), ([1], 1, mc.ModelInstanceGroup.KIND_GPU)]
    assert config.parameters["batch_buckets"].string_value == "1,2,4,8"
    assert config.parameters["padding"].string_value == "True"


def test_ready_only_after_every_instance_ran_every_bucket(registered, one_model) -> None:
    gate = threading.Event()

    class Gated(Recording):
        name = "recording"

        def run(self, parts, rows: int) -> np.ndarray:
            gate.wait(30)  # the warm-up waits here until the test has looked
            return super().run(parts, rows)

    cls = registered(Gated)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    model = ModelConfig(backend="recording", instances=2, batching=BatchingConfig(max_batch_size=4))
    config = ServerConfig(
        repo=str(one_model), host="127.0.0.1", port=0, metrics_port=-1, model_defaults=model
    )
    server = Server(config)
    starting = asyncio.run_coroutine_threadsafe(server.start(), loop)
    try:
        _wait(lambda: server.port and len(cls.made) == 2 and all(b.input for b in cls.made))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            time.sleep(0.3)  # both instances are inside their warm-up now
            assert (
                health.Check(health_pb2.HealthCheckRequest(service="")).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            assert not stub.ServerReady(pb.ServerReadyRequest()).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelReady(pb.ModelReadyRequest(name="hrnet"))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert not starting.done()
            gate.set()
            starting.result(60)
            assert (
                health.Check(health_pb2.HealthCheckRequest(service="hrnet")).status
                == health_pb2.HealthCheckResponse.SERVING
            )
            assert stub.ModelReady(pb.ModelReadyRequest(name="hrnet")).ready
        assert [b.rows for b in cls.made] == [[1, 2, 4], [1, 2, 4]]  # cpu: buckets warmed, not padded
        metrics = server.metrics.registry.get_sample_value(
            "hrnet_model_warmup_seconds", {"model": "hrnet", "version": "1"}
        )
        assert metrics is not None and metrics >= 0.3  # the warm-up held the start that long
    finally:
        gate.set()
        asyncio.run_coroutine_threadsafe(server.stop(1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_padded_batches_give_the_logits_of_unpadded_ones(model_repo) -> None:
    backend = open_backend(model_repo.onnx, ModelConfig(batching=BatchingConfig(max_batch_size=8)))
    try:
        for sizes in [(1,), (2, 1), (3,), (1, 1, 1, 1, 1), (4, 3), (8,)]:
            parts = [_images(n, seed=i) for i, n in enumerate(sizes)]
            expected = backend.infer(np.concatenate(parts))
            for rows in sorted({sum(sizes), 8}):
                out = backend.run(parts, rows)
                assert out.shape == expected.shape and out.dtype == np.float32
                np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    finally:
        backend.close()


def test_a_one_request_batch_is_read_where_it_lies(model_repo) -> None:
    """No copy into the batch buffer for one unpadded request of the input dtype; anything else
    (padding, another dtype, a strided view) still goes through the buffer, with the same logits."""
    backend = open_backend(model_repo.onnx, ModelConfig(batching=BatchingConfig(max_batch_size=8)))
    try:
        part = _images(3)
        before = part.copy()
        expected = backend.infer(part)
        out = backend.run([part], 3)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        assert out.dtype == np.float32 and not np.shares_memory(out, part)
        assert backend._batch is None  # the buffer was never needed
        np.testing.assert_array_equal(part, before)
        strided = np.repeat(part, 2, axis=3)[..., ::2]  # the same values, not contiguous
        for variant, rows in [(part, 4), (part.astype(np.float64), 3), (strided, 3)]:
            np.testing.assert_allclose(backend.run([variant], rows), expected, rtol=1e-5, atol=1e-5)
            assert backend._batch is not None
    finally:
        backend.close()


def test_requests_back_to_back_in_one_buffer_are_read_in_place(model_repo) -> None:
    """A front end's consecutive requests lie one after the other in its arena: such a batch runs
    where it lies, whatever order the batch lists them in. A batch in several spans (a gap, another
    buffer) runs span by span only while one more call costs less than the copy it saves, as
    measured; otherwise it goes through the batch buffer. The logits are the same every way."""
    backend = open_backend(model_repo.onnx, ModelConfig(batching=BatchingConfig(max_batch_size=8)))
    try:
        arena = _images(6)  # stands in for the arena the requests' blocks are views of
        for parts in ([arena[0:1], arena[1:3], arena[3:4]], [arena[1:3], arena[0:1], arena[3:4]]):
            joined = np.concatenate(parts)
            np.testing.assert_allclose(backend.run(parts, 4), backend.infer(joined), rtol=1e-5, atol=1e-5)
            assert backend._batch is None  # one span, read in place
        assert backend._call_s is not None and backend._call_s < float("inf")
        several = (
            [arena[0:1], arena[2:4]],  # a gap
            [arena[3:4], arena[0:1].copy(), arena[1:3]],  # another buffer
        )
        for call_s, in_place in ((float("inf"), False), (0.0, True)):
            for parts in several:
                if backend._batch is not None:  # dropped: whether `run` needs one shows
                    backend.release(backend._batch)
                    backend._batch = None
                backend._call_s, backend._copy_s_per_byte = call_s, 1e-9
                joined = np.concatenate(parts)
                reference = backend.infer(joined)
                np.testing.assert_allclose(backend.run(parts, len(joined)), reference, rtol=1e-5, atol=1e-5)
                assert (backend._batch is None) == in_place, parts
                assert (backend._copy_s_per_byte == 1e-9) == in_place  # a copy measures its cost
    finally:
        backend.close()


def test_spans_group_parts_by_where_they_lie() -> None:
    buffer = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    parts = [buffer[4:6], buffer[0:1], buffer[6:7], buffer[1:3], buffer[7:8].copy()]
    runs = {run.parts: run.rows for run in spans(parts)}  # in address order: the copy's is its own
    assert sorted(runs) == [(0, 2), (1, 3), (4,)]
    np.testing.assert_array_equal(runs[1, 3], buffer[0:3])
    np.testing.assert_array_equal(runs[0, 2], buffer[4:7])
    assert np.shares_memory(runs[0, 2], buffer) and not runs[0, 2].flags.writeable
    assert sorted(run.parts for run in spans([buffer[0:2], buffer[2:4].astype(np.float64)])) == [(0,), (1,)]
    # Rows back to back in a buffer numpy cannot see as bytes (a Fortran-ordered one) stay apart.
    transposed = np.asfortranarray(np.arange(8 * 3, dtype=np.float32).reshape(3, 8)).T
    assert [run.parts for run in spans([transposed[0:2], transposed[2:4]])] == [(0,), (1,)]


def test_padded_server_answers_like_direct_onnxruntime(one_model, start_server) -> None:
    server = start_server(one_model, padding="on", max_batch_size=8, max_queue_delay_us=20000)
    stub = _stub(server.address)
    batch = _images(30, seed=5)
    sizes = [1, 2, 3, 1, 5, 1, 7, 2, 1, 3, 4]  # 30 images in requests of odd sizes
    starts = np.cumsum([0, *sizes])
    with ThreadPoolExecutor(11) as pool:
        results = list(pool.map(lambda i: _infer(stub, batch[starts[i] : starts[i + 1]]), range(len(sizes))))
    np.testing.assert_allclose(
        np.concatenate(results), _reference(one_model / "hrnet/1/model.onnx", batch), rtol=1e-5, atol=1e-5
    )
    padding = server.metric("hrnet_padding_images_total", model="hrnet")
    computed = server.metric("hrnet_inference_images_total", model="hrnet")
    assert computed == 30 and padding >= 0


def test_provider_options_defaults_config_and_device() -> None:
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    configured = {"CUDAExecutionProvider": {"gpu_mem_limit": "1073741824", "prefer_nhwc": "0"}}
    trt, cuda, cpu = provider_options(providers, configured, 1, "image", (3, 224, 224), (1, 2, 4, 8))
    assert cuda == {
        "cudnn_conv_algo_search": "HEURISTIC",
        "prefer_nhwc": "0",
        "gpu_mem_limit": "1073741824",
        "device_id": "1",
    }
    assert trt["trt_profile_min_shapes"] == "image:1x3x224x224"
    assert trt["trt_profile_opt_shapes"] == trt["trt_profile_max_shapes"] == "image:8x3x224x224"
    assert trt["trt_engine_cache_enable"] == "True" and trt["device_id"] == "1"
    assert trt["trt_engine_cache_path"].endswith("hrnet/tensorrt") and cpu == {}
    # no profile where a shape is not fixed: TensorRT then builds per shape
    assert "trt_profile_min_shapes" not in provider_options(providers[:1], {}, 0, "x", (3, -1, -1), (1, 2))[0]


def test_provider_options_from_config_yaml_and_variables(tmp_path, model_repo) -> None:
    file = tmp_path / "config.yaml"
    file.write_text(
        "provider_options:\n  CUDAExecutionProvider: {gpu_mem_limit: 2147483648, prefer_nhwc: 0}\n"
        "  TensorrtExecutionProvider: {trt_fp16_enable: true}\n"
    )
    config = load_model_config(ModelConfig(), file)
    assert config.provider_options == {
        "CUDAExecutionProvider": {"gpu_mem_limit": "2147483648", "prefer_nhwc": "0"},
        "TensorrtExecutionProvider": {"trt_fp16_enable": "True"},
    }
    env = env_values(
        {"HRNET_PROVIDER_OPTIONS": "{CUDAExecutionProvider: {arena_extend_strategy: kSameAsRequested}}"},
        ModelConfig,
        "HRNET_",
    )
    merged = build(ModelConfig, merge(as_data(config), env), "test")
    assert merged.provider_options["CUDAExecutionProvider"] == {
        "gpu_mem_limit": "2147483648",
        "prefer_nhwc": "0",
        "arena_extend_strategy": "kSameAsRequested",
    }
    file.write_text("provider_options:\n  CUDAExecutionProvider: {device_id: 1}\n")
    with pytest.raises(ConfigError, match="device_id: set device_ids instead"):
        load_model_config(ModelConfig(), file)
    with pytest.raises(ModelLoadError, match=r"unknown onnxruntime providers \['CUDA'\]"):
        open_backend(model_repo.onnx, ModelConfig(provider_options={"CUDA": {"x": "1"}}))


def test_options_reach_the_session_and_model_config_reports_them(registered, one_model, start_server) -> None:
    cls = registered(type("Recording1", (Recording,), {}))
    server = start_server(one_model, backend="recording", provider_options={"CPUExecutionProvider": {}})
    config = _stub(server.address).ModelConfig(pb.ModelConfigRequest(name="hrnet")).config
    backend = cls.made[0]
    session_options = backend._session.get_provider_options()
    assert backend.requested == {"CPUExecutionProvider": {}} and list(session_options) == [
        "CPUExecutionProvider"
    ]
    assert config.parameters["providers"].string_value == "CPUExecutionProvider"
    assert config.parameters["provider_options.CPUExecutionProvider"].string_value == ""
    assert float(config.parameters["warmup_seconds"].string_value) >= 0
    # runtime_options ran on the instance's own thread, like every other call
    assert len(backend.threads) == 1


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a GPU"
)
def test_cuda_options_reach_the_session(model_repo) -> None:
    config = ModelConfig(
        device="gpu", provider_options={"CUDAExecutionProvider": {"gpu_mem_limit": "2147483648"}}
    )
    backend = open_backend(model_repo.onnx, config, device_id=0)
    try:
        cuda = backend._session.get_provider_options()["CUDAExecutionProvider"]
        assert cuda["cudnn_conv_algo_search"] == "HEURISTIC" and cuda["prefer_nhwc"] == "1"
        assert cuda["gpu_mem_limit"] == "2147483648" and cuda["device_id"] == "0"
        out = backend.run([_images(3)], 4)
        np.testing.assert_allclose(out, _reference(model_repo.onnx, _images(3)), rtol=1e-2, atol=1e-3)
        assert backend.pinned
    finally:
        backend.close()


def test_fp16_models_serve_with_no_flags(model_repo, tmp_path, start_server) -> None:
    """`hrnet export --precision fp16` writes fp16 compute with fp32 inputs and outputs; a model
    with fp16 inputs and outputs must serve too (requests stay FP32, and so do responses)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    repo = tmp_path / "repo"
    models = {
        "hrnet": (model_repo.onnx, True, "image", SIZE),
        "plain": (model_repo.plain, False, "input", 16),
    }
    for name, (source, keep_io_types, _, _) in models.items():
        (repo / name / "1").mkdir(parents=True)
        half = convert_float_to_float16(onnx.load(str(source)), keep_io_types=keep_io_types)
        onnx.save(half, str(repo / name / "1" / "model.onnx"))
    server = start_server(repo)
    stub = _stub(server.address)
    for name, (source, _, input_name, size) in models.items():
        batch = np.random.default_rng(2).normal(0, 1, (6, 3, size, size)).astype(np.float32)
        expected = _reference(source, batch)
        logits = _infer(stub, batch, model=name, input_name=input_name)
        np.testing.assert_allclose(logits, expected, atol=0.02 * np.abs(expected).max())
        assert (logits.argmax(1) == expected.argmax(1)).mean() >= 5 / 6
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
        assert meta.outputs[0].datatype == "FP32"


def test_a_hung_instance_is_replaced_while_the_other_serves(registered, one_model, start_server) -> None:
    armed, release, lock = threading.Event(), threading.Event(), threading.Lock()
    hangs: list[Recording] = []  # the instance that takes the first request once armed

    class HangsOnce(Recording):
        name = "recording"

        def run(self, parts, rows: int) -> np.ndarray:
            if armed.is_set():
                with lock:
                    if not hangs:
                        hangs.append(self)
                if self is hangs[0]:
                    release.wait(60)  # a runtime call that never returns (until the test ends)
            return super().run(parts, rows)

    cls = registered(HangsOnce)
    server = start_server(
        one_model, backend="recording", instances=2, execution_timeout_s=1.0, max_batch_size=4
    )
    stub = _stub(server.address)
    armed.set()
    try:
        batch = _images(1)
        start = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            first = pool.submit(_infer, stub, batch)  # the first free instance: the one that hangs
            time.sleep(0.1)
            served = [_infer(stub, batch) for _ in range(3)]  # the other instance serves meanwhile
            with pytest.raises(grpc.RpcError) as info:
                first.result()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # The 1 s execution timeout, not the call's own 30 s deadline (which would be
        # DEADLINE_EXCEEDED): 20 s leaves 19 s for a loaded machine and still tells the two apart.
        assert "execution_timeout_s 1 s" in info.value.details() and time.monotonic() - start < 20
        assert all(np.array_equal(s, served[0]) for s in served)
        _wait(lambda: server.metric("hrnet_instance_replacements_total", model="hrnet") == 1)
        _wait(lambda: len(cls.made) == 3 and cls.made[2].rows)  # loaded and warmed on a new thread
        hung, fresh = hangs[0], cls.made[2]
        other = next(b for b in cls.made[:2] if b is not hung)
        assert fresh.threads.isdisjoint(hung.threads | other.threads)
        results = [_infer(stub, _images(2, seed=i)) for i in range(6)]
        assert all(r.shape == (2, 10) for r in results)
        assert fresh.rows[3:] and "close" not in {c for c, _ in hung.calls}
    finally:
        release.set()
    _wait(lambda: "close" in {c for c, _ in hangs[0].calls})  # closed on its own thread once free
    assert len(hangs[0].threads) == 1
