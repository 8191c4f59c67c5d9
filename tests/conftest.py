"""Shared fixtures. Each group is owned by the helper that wrote it; append, don't rewrite."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Serving: a small exported HRNet model repository, real PNG images and a real server.
#   model_repo   (session) ModelRepo: .path holds hrnet/1/model.onnx (our metadata, 10 labelled
#                classes, 32 px), hrnet_ms/1/model.mindir (+ sidecar) and plain/1/model.onnx
#                (a tiny ONNX classifier without our metadata: input "input" 3x16x16, 5 classes).
#   digit_images (session) list[DigitImage]: 96 distinct PNGs made from sklearn's digits.
#   grpc_server  (session) RunningServer on 127.0.0.1 (free ports) serving model_repo:
#                .address "127.0.0.1:PORT" (gRPC), .http_address (REST), .metrics_port,
#                .metrics_text(), .metric(name, **labels), .call(coro), .server (serving.Server).
#   start_server (function) factory: start_server(repo_path, **ServerConfig/model_defaults overrides).
# ---------------------------------------------------------------------------------------------
import io
import sys
import types
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

SERVING_INPUT_SIZE = 32
SERVING_LABELS = tuple(f"digit-{i}" for i in range(10))


@dataclass(frozen=True)
class ModelRepo:
    path: Path
    onnx: Path  # hrnet/1/model.onnx
    mindir: Path  # hrnet_ms/1/model.mindir
    plain: Path  # plain/1/model.onnx


@dataclass(frozen=True)
class DigitImage:
    png: bytes
    digit: int
    path: Path


def _plain_onnx(path: Path) -> None:
    """A minimal NCHW image classifier built with onnx.helper, carrying no hrnet metadata."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 5)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, (5,)).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["input", "conv_w"], ["c"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "fc_w"], ["m"]),
        helper.make_node("Add", ["m", "fc_b"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes,
        "plain",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 5])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> ModelRepo:
    import mindspore as ms

    from core.metadata import ModelMetadata
    from training.export import export_network
    from training.model import create_model

    root = tmp_path_factory.mktemp("model_repo")
    ms.set_seed(1)
    net = create_model("w18_small_v1", len(SERVING_LABELS))
    classes = len(SERVING_LABELS)
    meta = ModelMetadata(
        arch="w18_small_v1", num_classes=classes, input_size=SERVING_INPUT_SIZE, labels=SERVING_LABELS
    )
    onnx_path = export_network(net, meta, "ONNX", root / "hrnet" / "1" / "model.onnx")
    mindir_path = export_network(net, meta, "MINDIR", root / "hrnet_ms" / "1" / "model.mindir")
    plain = root / "plain" / "1" / "model.onnx"
    _plain_onnx(plain)
    return ModelRepo(root, onnx_path, mindir_path, plain)


@pytest.fixture(scope="session")
def digit_images(tmp_path_factory: pytest.TempPathFactory) -> list[DigitImage]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    folder = tmp_path_factory.mktemp("digits")
    out = []
    for i in range(96):
        gray = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
        rgb = np.stack([gray, 255 - gray, gray // 2 + (i % 7) * 16], axis=-1)
        image = Image.fromarray(rgb, "RGB").resize((40 + i % 9, 36 + i % 5), Image.NEAREST)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        path = folder / f"{i:03d}_{digits.target[i]}.png"
        path.write_bytes(buffer.getvalue())
        out.append(DigitImage(buffer.getvalue(), int(digits.target[i]), path))
    return out


class RunningServer:
    """serving.Server run in the background through its embedding API, plus reading its metrics."""

    def __init__(self, config: Any, **options: Any) -> None:
        from serving import Server

        self.server = Server(config, **options).start_background(timeout_s=120)
        self.address = self.server.address
        self.http_address = self.server.http_address
        self.metrics_port = self.server.metrics_port

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return self.server.call(coro, timeout)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of the Prometheus exposition (0 when absent)."""
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in self.metrics_text().splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                sample, _, value = line.rpartition(" ")
                found = sample[len(name) :].strip("{}").split(",") if "{" in sample else []
                if all(part in found for part in want.split(",") if part):
                    total += float(value)
        return total

    def stop(self, grace_s: float = 5.0) -> bool:
        return self.server.stop_background(grace_s)


def serving_config(repo: Path, **overrides: Any) -> Any:
    """ServerConfig for tests: 127.0.0.1, free ports; model_defaults fields may be passed flat."""
    from serving.config import BatchingConfig, ModelConfig, ServerConfig

    batching_keys = {f for f in BatchingConfig.__dataclass_fields__}
    model_keys = {f for f in ModelConfig.__dataclass_fields__}
    batching = {k: overrides.pop(k) for k in list(overrides) if k in batching_keys}
    model = {k: overrides.pop(k) for k in list(overrides) if k in model_keys}
    defaults = ModelConfig(**model)
    defaults = replace(defaults, batching=replace(defaults.batching, **batching))
    # One process unless a test asks for front-end processes (the default depends on the cores).
    base = {
        "host": "127.0.0.1",
        "port": 0,
        "http_port": 0,
        "metrics_port": 0,
        "log_format": "text",
        "grace_period_s": 5.0,
        "workers": 1,
    }
    return ServerConfig(**{**base, "repo": str(repo), **overrides, "model_defaults": defaults})


@pytest.fixture(scope="session")
def grpc_server(model_repo: ModelRepo) -> Iterator[RunningServer]:
    running = RunningServer(serving_config(model_repo.path, max_queue_delay_us=5000, max_batch_size=16))
    yield running
    running.stop()


@pytest.fixture
def start_server() -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(repo: Path, span_exporter: Any = None, **overrides: Any) -> RunningServer:
        running = RunningServer(serving_config(repo, **overrides), span_exporter=span_exporter)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


# ---------------------------------------------------------------------------------------------
# Benchmarks: a digits model whose predictions depend on the image, without training one.
#   digits_model (session) DigitsModel: .data (ImageFolder with train/ and val/), .val, .ckpt
#                (w18_small_v1, 32 px, our metadata, labels "0".."9", BatchNorm statistics of
#                real digits images so the logits vary with the input) and .onnx (its export).
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DigitsModel:
    data: Path
    val: Path
    ckpt: Path
    onnx: Path


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> DigitsModel:
    import mindspore as ms
    from mindspore import nn, ops

    from core.metadata import ModelMetadata
    from training.checkpoint import save_checkpoint
    from training.data import class_names, eval_dataset
    from training.digits import write_digits
    from training.export import export_checkpoint
    from training.model import create_model

    root = tmp_path_factory.mktemp("digits_model")
    data = write_digits(root / "data", size=32, seed=0)
    labels = tuple(class_names(data / "val"))
    meta = ModelMetadata(
        "w18_small_v1",
        len(labels),
        input_size=32,
        resize_size=32,
        labels=labels,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    )
    ms.set_seed(3)
    net = create_model(meta.arch, meta.num_classes)
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.BatchNorm2d):  # momentum 1: the statistics become this batch's own
            cell.bn_train = ops.BatchNorm(is_training=True, epsilon=cell.eps, momentum=1.0)
    images, _ = next(eval_dataset(data / "train", meta, batch_size=64, num_workers=1).create_tuple_iterator())
    net.set_train(True)
    net(images)
    net.set_train(False)
    ckpt = save_checkpoint(net, root / "digits.ckpt", meta)
    onnx_path = export_checkpoint(ckpt, "ONNX", root / "digits.onnx")
    return DigitsModel(data, data / "val", ckpt, onnx_path)


# ---------------------------------------------------------------------------------------------
# The `slow` marker (`make check` runs everything else). Modules mark their own slow tests; these
# are the slow tests of modules edited elsewhere, marked here by name until their modules do it
# (None: the whole module). Over ~5 s each, measured on 2 cores.
# ---------------------------------------------------------------------------------------------
SLOW_ELSEWHERE: dict[str, set[str] | None] = {
    "serving/test_frontend.py": None,  # several server processes per test: ~90 s in all
    "training/test_precision.py": None,  # trains and exports models
    "test_readme.py": {
        "test_runnable_commands_run",  # ~60 s: the README's commands, end to end
        "test_every_hrnet_command_shown_exists_with_its_flags",  # ~18 s: every command's --help
    },
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests = Path(__file__).parent
    for item in items:
        try:
            module = item.path.relative_to(tests).as_posix()
        except ValueError:
            continue
        if module not in SLOW_ELSEWHERE:
            continue
        names = SLOW_ELSEWHERE[module]
        if names is None or getattr(item, "originalname", item.name) in names:
            item.add_marker(pytest.mark.slow)


# ---------------------------------------------------------------------------------------------
# NVIDIA's NVML cannot run here (no GPU, no driver): a stand-in `pynvml` reporting one device
# tests the plumbing of the server's GPU metrics and the benchmarks' GPU summaries. The real
# library is checked by `hrnet bench gpu` when a GPU machine is lent.
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def stand_in_nvml(monkeypatch: pytest.MonkeyPatch) -> Any:
    nvml: Any = types.ModuleType("pynvml")
    nvml.NVML_TEMPERATURE_GPU = 0
    nvml.nvmlInit = lambda: None
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda index: f"device {index}"
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=37, memory=12)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=3 << 30, total=80 << 30)
    nvml.nvmlDeviceGetPowerUsage = lambda handle: 215_500  # milliwatts
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: 54
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    return nvml
