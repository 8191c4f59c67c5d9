"""INT8 and FP16 exports of a trained digits model: the gate, the model card, and a real server.

One model is trained for one epoch (89 steps of the bundled digits config, ~93% val top-1), long
enough that quantization noise could cost accuracy and the gate has something to protect. Its
fp32 ONNX export is reduced twice (int8, fp16) and all three files are served together.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from PIL import Image

from clients import Client
from core.metadata import ModelMetadata
from hrnet.cli import main
from protos import grpc_service_pb2 as pb
from protos import grpc_service_pb2_grpc as pb_grpc
from training.data import sample_images
from training.digits import write_digits
from training.export import export_checkpoint, read_onnx_metadata, reduce_export
from training.onnx_graph import ONNX_OPSET, opset
from training.precision import DEFAULT_MAX_DROP, Calibration, GateResult, Reduction

CALIB_COUNT = 200
# The gate limit this fixture exports with. The fixture's job is to hand the serving tests an int8
# and an fp16 file, on any x86-64 machine; the gate's refusal is tested on its own below, with a
# calibration built to fail it. The one-epoch model's int8 drop met the 0.5 default on the machine
# where this last landed and read 0.56 points (2 images of 359) on two others (AVX2, AVX-512 VNNI:
# MindSpore's and onnxruntime's kernels differ by CPU). 3 points (11 images) is over 5x the worst
# drop seen and still refuses a broken reduction: the blank calibration below loses 44 points.
FIXTURE_MAX_DROP = 3.0


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits") / "digits", size=32, seed=0)


@pytest.fixture(scope="module")
def ckpt(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("train")
    command = [sys.executable, "-m", "hrnet", "train", "--config", "hrnet_digits", "--epochs", "1"]
    command += ["--data-path", str(digits / "train"), "--eval-data-path", "", "--no-progress"]
    command += ["--output-dir", str(run / "out")]
    env = {**os.environ, "GLOG_v": "3"}
    proc = subprocess.run(command, cwd=run, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run / "out" / "checkpoints" / "hrnet_w18_small_v1-e0001.ckpt"


@pytest.fixture(scope="module")
def repo(ckpt: Path, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """REPO/digits_{fp32,int8,fp16}/1/model.onnx: the fp32 export and its two reductions."""
    root = tmp_path_factory.mktemp("repo")
    fp32 = export_checkpoint(ckpt, "ONNX", root / "digits_fp32" / "1" / "model.onnx")
    calibration = Calibration(digits / "train", CALIB_COUNT, "percentile")
    for reduction in (
        Reduction("int8", digits / "val", max_drop=FIXTURE_MAX_DROP, calibration=calibration),
        Reduction("fp16", digits / "val", max_drop=FIXTURE_MAX_DROP),
    ):
        result = reduce_export(fp32, root / f"digits_{reduction.precision}" / "1" / "model.onnx", reduction)
        assert isinstance(result, GateResult) and result.passed, result.summary()
    return root


def _card(repo: Path, precision: str) -> ModelMetadata:
    card = read_onnx_metadata(repo / f"digits_{precision}" / "1" / "model.onnx")
    assert card is not None
    return card


def test_reduced_files_are_opset_17_dynamic_and_carry_precision_calibration_and_gate(repo, digits):
    fp32, int8, fp16 = (_card(repo, p) for p in ("fp32", "int8", "fp16"))
    assert (fp32.precision, int8.precision, fp16.precision) == ("fp32", "int8", "fp16")
    assert fp32.calibration == fp32.validation == {}
    assert int8.calibration == {
        "method": "percentile",
        "images": CALIB_COUNT,
        "folder": str(digits / "train"),
    }
    assert fp16.calibration == {}
    for card in (int8, fp16):
        gate = card.validation
        assert gate["val"] == str(digits / "val") and gate["images"] == 359
        assert gate["max_drop_points"] == FIXTURE_MAX_DROP
        assert 100 * (gate["top1_fp32"] - gate["top1"]) <= FIXTURE_MAX_DROP
        assert gate["top1_fp32"] > 0.8  # a trained model: the gate had something to lose
        assert (card.labels, card.input_size, card.exporter) == (fp32.labels, fp32.input_size, fp32.exporter)

    for precision in ("int8", "fp16"):
        model = onnx.load(str(repo / f"digits_{precision}" / "1" / "model.onnx"))
        onnx.checker.check_model(model)
        assert opset(model) >= ONNX_OPSET >= 17
        ops = {node.op_type for node in model.graph.node}
        assert "BatchNormalization" not in ops  # folded into the convolutions before reducing
        for value in (*model.graph.input, *model.graph.output):  # fp32 at the edges, batch left free
            assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
            assert value.type.tensor_type.shape.dim[0].dim_param
        weights = {i.name: i for i in model.graph.initializer}
        producers = {node.output[0]: node for node in model.graph.node}
        convs = [node for node in model.graph.node if node.op_type == "Conv"]
        if precision == "int8":  # every convolution reads int8 weights with one scale per output channel
            assert "QuantizeLinear" in ops
            for conv in convs:
                weight = producers[conv.input[1]]
                assert weight.op_type == "DequantizeLinear"
                assert weights[weight.input[0]].data_type == onnx.TensorProto.INT8
                assert list(weights[weight.input[1]].dims) == [weights[weight.input[0]].dims[0]]
        else:
            assert {weights[conv.input[1]].data_type for conv in convs} == {onnx.TensorProto.FLOAT16}


def _top1(client: Client, model: str, images: list[tuple[bytes, int]]) -> float:
    hits = 0
    for start in range(0, len(images), 32):
        chunk = images[start : start + 32]
        results = client.classify([png for png, _ in chunk], model=model, top_k=1)
        hits += sum(r.index == truth for r, (_, truth) in zip(results, chunk, strict=True))
    return hits / len(images)


def test_int8_and_fp16_serve_without_flags_and_score_as_the_gate_did(repo, digits, start_server):
    val = sorted((digits / "val").rglob("*.png"))
    images = [(path.read_bytes(), int(path.parent.name)) for path in val]
    server = start_server(repo)
    with Client(server.address, timeout_s=60) as client:
        top1 = {p: _top1(client, f"digits_{p}", images) for p in ("fp32", "int8", "fp16")}
    for precision in ("int8", "fp16"):  # fp32 in and out: the server feeds them as it feeds fp32
        backend = server.server.plane.get(f"digits_{precision}").backend
        assert backend.input.dtype == backend.output.dtype == np.float32
    one_image = 1 / len(images)
    for precision in ("int8", "fp16"):
        gate = _card(repo, precision).validation
        # The server's OpenCV preprocessing equals the MindSpore pipeline the gate scored with.
        assert abs(top1[precision] - gate["top1"]) <= one_image + 1e-9, (precision, top1, gate)
        assert abs(top1["fp32"] - gate["top1_fp32"]) <= one_image + 1e-9
        assert 100 * (top1["fp32"] - top1[precision]) <= FIXTURE_MAX_DROP + 100 * one_image

    with grpc.insecure_channel(server.address) as channel:
        kserve = pb_grpc.GRPCInferenceServiceStub(channel)
        for precision in ("fp32", "int8", "fp16"):
            config = kserve.ModelConfig(pb.ModelConfigRequest(name=f"digits_{precision}")).config
            assert config.parameters["precision"].string_value == precision
            assert server.metric("hrnet_model_info", model=f"digits_{precision}", precision=precision) == 1


def test_gate_refuses_a_blank_calibration_image_and_writes_nothing(ckpt, digits, tmp_path, capsys):
    """One image of one class, and that one blank: the activation ranges fit nothing real."""
    blank = tmp_path / "calib" / "blank"
    blank.mkdir(parents=True)
    Image.new("RGB", (32, 32), (255, 255, 255)).save(blank / "white.png")
    out = tmp_path / "out" / "model.int8.onnx"
    args = ["export", "--ckpt", str(ckpt), "--format", "onnx", "--precision", "int8", "--out", str(out)]
    assert main([*args, "--calib", str(tmp_path / "calib"), "--val", str(digits / "val")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("hrnet export: error: refused, val top-1 on 359 images: fp32 "), err
    assert ", int8 " in err and "limit 0.50" in err and f"{out} not written" in err
    fp32, int8 = (float(err.split(f"{name} ")[1].split("%")[0]) for name in ("fp32", "int8"))
    assert fp32 - int8 > FIXTURE_MAX_DROP > DEFAULT_MAX_DROP  # refused even at the fixture's limit
    assert not out.exists() and (not out.parent.exists() or not list(out.parent.iterdir()))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--precision", "int8", "--val", "VAL"], "--precision int8 needs calibration images: --calib DIR"),
        (["--precision", "fp16", "--calib", "TRAIN"], "--precision fp16 needs --val DIR"),
        (["--precision", "fp16", "--val", "VAL", "--calib", "TRAIN"], "--calib applies to int8 only"),
        (["--calib", "TRAIN"], "--calib applies to --precision fp16 or int8 only"),
        (["--precision", "fp16", "--val", "VAL", "--format", "MINDIR"], "is for ONNX exports"),
        (["--precision", "fp16", "--val", "VAL", "--batch", "4"], "exports a dynamic batch"),
        (["--precision", "fp16", "--val", "TRAIN/3"], "has no class sub-directories"),
        (["--precision", "fp16", "--val", "VAL", "--max-drop", "-1"], "--max-drop must be >= 0"),
        (["--precision", "int8", "--val", "VAL", "--calib", "TRAIN", "--calib-count", "0"], "must be >= 1"),
    ],
)
def test_bad_requests_fail_fast_with_one_line(flags, message, ckpt, digits, tmp_path, capsys):
    flags = [f.replace("VAL", str(digits / "val")).replace("TRAIN", str(digits / "train")) for f in flags]
    out = tmp_path / "model.onnx"
    args = ["export", "--ckpt", str(ckpt), "--out", str(out)]
    args += [] if "--format" in flags else ["--format", "ONNX"]
    assert main(args + flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []


def test_calibration_images_are_fixed_and_spread_over_classes(tmp_path):
    for cls, count in (("a", 3), ("b", 1), ("c", 2), ("d", 3)):
        (tmp_path / cls).mkdir()
        for i in range(count):
            Image.new("RGB", (8, 8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    names = [f"{p.parent.name}/{p.name}" for p in sample_images(tmp_path, 6)]
    assert names == ["a/0.png", "b/0.png", "c/0.png", "d/0.png", "a/1.png", "c/1.png"]
    assert sample_images(tmp_path, 6) == sample_images(tmp_path, 6)
    assert [p.parent.name for p in sample_images(tmp_path, 2)] == ["a", "c"]  # fewer than classes: spaced
    assert len(sample_images(tmp_path, 100)) == 9  # all there are
    flat = tmp_path / "d"
    assert [p.name for p in sample_images(flat, 2)] == ["0.png", "1.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        sample_images(empty, 1)


def test_gate_result_arithmetic():
    passed = GateResult("int8", 359, top1_fp32=0.9331, top1=0.9304, max_drop=0.5)
    assert passed.passed and round(passed.drop, 2) == 0.27
    assert GateResult("int8", 359, 0.9331, 0.9331 - 0.005, 0.5).passed  # exactly at the limit
    failed = GateResult("fp16", 359, 0.9331, 0.9200, 0.5)
    assert not failed.passed
    assert failed.summary() == (
        "val top-1 on 359 images: fp32 93.31%, fp16 92.00% (drop 1.31 points, limit 0.50)"
    )
    assert np.isclose(GateResult("int8", 10, 0.5, 0.6, 0.0).drop, -10.0)  # better than fp32 passes
