"""Export: a real dynamic batch in ONNX and MINDIR, three-way parity, the model card round trip.

One w18_small_v1 checkpoint at 32 px is exported once per format and shared by the tests. Its
BatchNorm statistics are calibrated on random images first: with the fresh initialisation the
logits hardly depend on the input, and top-1 agreement would prove nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import replace
from pathlib import Path

import mindspore as ms
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from mindspore import nn, ops

from core.atomic import current_umask
from core.metadata import METADATA_KEY, ModelMetadata, read_sidecar, sidecar_path
from hrnet.cli import main
from training.checkpoint import load_into, read_checkpoint, save_checkpoint
from training.export import (
    ExportError,
    export_checkpoint,
    export_network,
    exporter_version,
    read_onnx_metadata,
)
from training.model import create_model
from training.onnx_graph import ONNX_OPSET, BakedBatchError, finish_graph, opset

pytestmark = pytest.mark.slow  # exports networks (W48 included) and compares three runtimes

ARCH = "w18_small_v1"
CLASSES = 10
SIZE = 32
META = ModelMetadata(
    arch=ARCH,
    num_classes=CLASSES,
    input_size=SIZE,
    resize_size=40,
    labels=tuple(f"class {i}" for i in range(CLASSES)),
    mean=(0.5, 0.4, 0.3),
    std=(0.2, 0.25, 0.3),
    extra={"dataset": "random"},
)


def parity_bound(reference: np.ndarray) -> float:
    return 1e-4 * max(1.0, float(np.abs(reference).max()))


def calibrated_network(arch: str, classes: int, size: int, seed: int = 0) -> nn.Cell:
    """A network whose BatchNorm running statistics are those of one random batch, so logits vary."""
    ms.set_seed(seed)  # the same weights every run: whether 3 images get distinct top classes is fixed
    net = create_model(arch, classes)
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.BatchNorm2d):
            # momentum 1.0: the running statistics become exactly this batch's statistics
            cell.bn_train = ops.BatchNorm(is_training=True, epsilon=cell.eps, momentum=1.0)
    rng = np.random.default_rng(seed)
    net.classifier.weight.set_data(ms.Tensor(rng.normal(0, 0.1, (classes, 2048)).astype(np.float32)))
    net.set_train(True)
    net(ms.Tensor(rng.standard_normal((8, 3, size, size)).astype(np.float32)))
    net.set_train(False)
    return net


def load_network(ckpt: Path) -> nn.Cell:
    loaded = read_checkpoint(ckpt)
    net = create_model(loaded.metadata.arch, loaded.metadata.num_classes)
    load_into(net, loaded.params)
    net.set_train(False)
    return net


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    return save_checkpoint(calibrated_network(ARCH, CLASSES, SIZE), path, META)


@pytest.fixture(scope="module")
def exported(ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {fmt: export_checkpoint(ckpt, fmt, out / f"model.{fmt.lower()}") for fmt in ("ONNX", "MINDIR")}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((64, 3, SIZE, SIZE)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(ckpt: Path, images: np.ndarray) -> dict[int, np.ndarray]:
    """MindSpore logits of the checkpoint's network for the first 1, 3 and 16 images."""
    net = load_network(ckpt)
    return {b: net(ms.Tensor(images[:b])).asnumpy() for b in (1, 3, 16)}


def assert_modern_opset(path: Path) -> None:
    """MindSpore writes opset 11 / IR 4; every export of ours is converted to opset 17 or later."""
    model = onnx.load(str(path), load_external_data=False)
    assert opset(model) >= ONNX_OPSET >= 17
    assert model.ir_version >= 8  # what opset 17 requires
    onnx.checker.check_model(model)


def test_onnx_batch_is_free_and_runs_at_1_3_64(exported, images, reference):
    assert_modern_opset(exported["ONNX"])
    session = ort.InferenceSession(str(exported["ONNX"]), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("image", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, SIZE, SIZE]
    assert isinstance(out.shape[0], str) and out.shape[1:] == [CLASSES]
    for batch in (1, 3):
        logits = session.run(None, {"image": images[:batch]})[0]
        assert np.abs(logits - reference[batch]).max() <= parity_bound(reference[batch])
    logits = session.run(None, {"image": images})[0]
    assert logits.shape == (64, CLASSES)
    assert np.abs(logits[:16] - reference[16]).max() <= parity_bound(reference[16])
    one_by_one = np.concatenate([session.run(None, {"image": images[i : i + 1]})[0] for i in range(64)])
    assert np.abs(logits - one_by_one).max() <= parity_bound(one_by_one)


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_three_way_parity(exported, images, reference, batch):
    expected = reference[batch]
    session = ort.InferenceSession(str(exported["ONNX"]), providers=["CPUExecutionProvider"])
    from_onnx = session.run(None, {"image": images[:batch]})[0]
    from_mindir = nn.GraphCell(ms.load(str(exported["MINDIR"])))(ms.Tensor(images[:batch])).asnumpy()
    assert expected.shape == (batch, CLASSES)
    for name, logits in (("onnx", from_onnx), ("mindir", from_mindir)):
        diff = float(np.abs(logits - expected).max())
        assert diff <= parity_bound(expected), f"{name} differs by {diff} at batch {batch}"
        np.testing.assert_array_equal(logits.argmax(axis=1), expected.argmax(axis=1), err_msg=name)
    assert len(set(expected.argmax(axis=1).tolist())) > 1 or batch == 1  # the logits depend on the image


def test_metadata_round_trip(exported):
    written = replace(META, exporter=exporter_version())
    assert read_onnx_metadata(exported["ONNX"]) == written
    session = ort.InferenceSession(str(exported["ONNX"]), providers=["CPUExecutionProvider"])
    stored = session.get_modelmeta().custom_metadata_map[METADATA_KEY]
    assert ModelMetadata.from_json(stored) == written
    assert json.loads(stored)["exporter"].startswith("hrnet ")
    assert read_sidecar(exported["MINDIR"]) == written


def test_cli_fixed_batch_then_force_overwrite(ckpt, tmp_path, images, reference, capsys):
    out = tmp_path / "fixed.onnx"
    assert main(["export", "--ckpt", str(ckpt), "--format", "onnx", "--batch", "3", "--out", str(out)]) == 0
    assert_modern_opset(out)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [3, 3, SIZE, SIZE]
    logits = session.run(None, {"image": images[:3]})[0]
    assert np.abs(logits - reference[3]).max() <= parity_bound(reference[3])

    before = out.read_bytes()
    assert main(["export", "--ckpt", str(ckpt), "--format", "ONNX", "--out", str(out)]) == 2
    assert "exists (pass --force to overwrite)" in capsys.readouterr().err
    assert out.read_bytes() == before

    assert main(["export", "--ckpt", str(ckpt), "--format", "ONNX", "--out", str(out), "--force"]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fixed.onnx"]  # no temporary files left behind


@pytest.mark.skipif(ms.get_context("device_target") == "Ascend", reason="AIR export works on Ascend")
def test_air_refused_off_ascend_before_any_work(tmp_path, capsys):
    missing = (
        tmp_path / "never-written.ckpt"
    )  # were the checkpoint read first, this would be FileNotFoundError
    with pytest.raises(ExportError, match="AIR export needs an Ascend device"):
        export_checkpoint(missing, "air", tmp_path / "model.air", batch=1)
    assert main(["export", "--ckpt", str(missing), "--format", "AIR", "--batch", "1"]) == 2
    assert "Ascend" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_arch_must_agree_with_the_checkpoint(ckpt, tmp_path):
    with pytest.raises(ExportError, match="--arch w48 contradicts the checkpoint, which holds w18_small_v1"):
        export_checkpoint(ckpt, "ONNX", tmp_path / "model.onnx", arch="w48")
    assert not (tmp_path / "model.onnx").exists()


def test_checkpoint_without_metadata_needs_arch(ckpt, tmp_path):
    bare = tmp_path / "bare.ckpt"
    ms.save_checkpoint(load_network(ckpt), str(bare))
    with pytest.raises(ExportError, match="carries no metadata; pass --arch"):
        export_checkpoint(bare, "MINDIR", tmp_path / "model.mindir")


def test_network_and_metadata_must_agree(tmp_path):
    with pytest.raises(ExportError, match="the network has 10 classes but the metadata says 5"):
        export_network(
            create_model(ARCH, CLASSES), replace(META, num_classes=5, labels=()), "ONNX", tmp_path / "m.onnx"
        )


def _tiny_graph(reshape_to: list[int]) -> onnx.ModelProto:
    """image [N, 4] -> Reshape(constant shape) -> logits: the smallest graph that can bake a batch."""
    shape = onnx.numpy_helper.from_array(np.array(reshape_to, np.int64), "shape")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Reshape", ["image", "shape"], ["logits"])],
        "tiny",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, 4])],
        initializer=[shape],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)])


def test_a_graph_that_bakes_the_batch_is_refused(tmp_path):
    meta = ModelMetadata(arch=ARCH, num_classes=4, input_size=SIZE)
    with pytest.raises(BakedBatchError, match=r"logits \(batch fixed to 2\).*Reshape"):
        finish_graph(_tiny_graph([2, 4]), meta, batch=None)
    free = finish_graph(_tiny_graph([-1, 4]), meta, batch=None)
    assert opset(free) == ONNX_OPSET  # converted up from 11
    path = tmp_path / "free.onnx"
    onnx.save(free, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.ones((5, 4), np.float32)})[0].shape == (5, 4)
    assert read_onnx_metadata(path) == meta


def test_foreign_onnx_has_no_metadata(tmp_path):
    path = tmp_path / "foreign.onnx"
    onnx.save(_tiny_graph([-1, 4]), str(path))
    assert read_onnx_metadata(path) is None


@pytest.mark.skipif(
    not os.environ.get("HRNET_SLOW_TESTS"), reason="W48 export parity takes minutes; set HRNET_SLOW_TESTS=1"
)
def test_w48_parity_at_batch_1(tmp_path):
    size = 64
    net = calibrated_network("w48", 1000, size)
    meta = ModelMetadata(arch="w48", num_classes=1000, input_size=size)
    image = np.random.default_rng(7).standard_normal((1, 3, size, size)).astype(np.float32)
    expected = net(ms.Tensor(image)).asnumpy()
    started = time.perf_counter()
    onnx_path = export_network(net, meta, "ONNX", tmp_path / "w48.onnx")
    mindir_path = export_network(net, meta, "MINDIR", tmp_path / "w48.mindir")
    print(
        f"w48 exports: {time.perf_counter() - started:.1f} s, onnx {onnx_path.stat().st_size / 2**20:.1f} MiB"
    )
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    from_onnx = session.run(None, {"image": image})[0]
    from_mindir = nn.GraphCell(ms.load(str(mindir_path)))(ms.Tensor(image)).asnumpy()
    for name, logits in (("onnx", from_onnx), ("mindir", from_mindir)):
        diff = float(np.abs(logits - expected).max())
        print(f"w48 {name} max diff {diff:.3g} (max |logit| {np.abs(expected).max():.3g})")
        assert diff <= parity_bound(expected), name
        assert logits.argmax() == expected.argmax(), name


def test_checkpoint_and_exports_are_readable_by_others_under_the_umask(ckpt, exported):
    """MindSpore writes checkpoints and MINDIR 0400; a server running as another user must read them."""
    expected = 0o666 & ~current_umask()
    for path in (ckpt, exported["ONNX"], exported["MINDIR"], sidecar_path(exported["MINDIR"])):
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_default_exports_of_a_run_go_to_its_exports_folder(ckpt, tmp_path, capsys):
    run = tmp_path / "run"
    in_run = run / "checkpoints" / "hrnet_w18_small_v1-e0004.ckpt"
    in_run.parent.mkdir(parents=True)
    shutil.copy(ckpt, in_run)
    (run / "config.yaml").write_text("arch: w18_small_v1\n")
    assert main(["export", "--ckpt", str(in_run), "--format", "ONNX"]) == 0
    assert (run / "exports" / "hrnet_w18_small_v1-e0004.onnx").is_file()
    assert sorted(p.name for p in in_run.parent.iterdir()) == [in_run.name]  # checkpoints/ holds checkpoints
    loose = tmp_path / "loose.ckpt"  # not in a run: beside itself, as before
    shutil.copy(ckpt, loose)
    assert main(["export", "--ckpt", str(loose), "--format", "ONNX"]) == 0
    assert (tmp_path / "loose.onnx").is_file()
