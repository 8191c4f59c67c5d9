"""`hrnet train` / `hrnet eval` end to end on the real digits set: accuracy, msrun, kill and resume.

Every run is a real subprocess with cwd in tmp_path (MindSpore drops rank_*/kernel_meta folders in
its working directory), with the virtual environment's bin first on PATH because msrun starts
`python` from PATH.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from serving.process import free_port
from training.checkpoint import load_into, read_checkpoint
from training.config import load_config
from training.digits import write_digits
from training.lr import learning_rates
from training.model import create_model

pytestmark = pytest.mark.slow  # trains on the digits set, under msrun too

BIN = Path(sys.executable).parent
HRNET = [sys.executable, "-m", "hrnet"]
EPOCH_LINE = re.compile(
    r"^epoch: \[ *\d+/\d+\], epoch time: [\d.]+, steps: \d+, per step time: [\d.]+, "
    r"avg loss: [\d.]+, lr:\[[\d.e-]+\]$"
)
SMALL_PER_CLASS = 10  # the small set for msrun and resume runs: 100 train images


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["GLOG_v"] = "3"  # MindSpore: errors only
    return env


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _train_args(**overrides) -> list[str]:
    """`hrnet train --config hrnet_digits` with config overrides as flags; no eval, no progress bar."""
    flags = {"eval_data_path": "", "progress": False, **overrides}
    args = [*HRNET, "train", "--config", "hrnet_digits"]
    for key, value in flags.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):
            args.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            args += [f"--{flag}", str(value)]
    return args


def _events(run_dir: Path, kind: str) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r["event"] == kind]


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits") / "digits", size=32, seed=0)


@pytest.fixture(scope="module")
def small_digits(digits, tmp_path_factory) -> Path:
    """SMALL_PER_CLASS training images per class, so short runs have exact, known shard sizes."""
    root = tmp_path_factory.mktemp("small") / "train"
    for class_dir in sorted((digits / "train").iterdir()):
        (root / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.glob("*.png"))[:SMALL_PER_CLASS]:
            shutil.copy(image, root / class_dir.name / image.name)
    return root


@pytest.mark.timeout(1800)  # the timeouts only catch hangs: ~5 min alone on 2 cores, far longer when shared
def test_digits_train_then_eval_reaches_95_percent(digits, tmp_path):
    run_dir = tmp_path / "run"
    _run(_train_args(data_path=digits / "train", output_dir=run_dir), tmp_path, timeout=1500)
    cfg = load_config("hrnet_digits")
    epochs = _events(run_dir, "epoch")
    assert [e["epoch"] for e in epochs] == list(range(1, cfg.epochs + 1))
    lines = (run_dir / "log.txt").read_text().splitlines()
    assert len(lines) == cfg.epochs and all(EPOCH_LINE.match(line) for line in lines), lines
    ckpt = run_dir / "checkpoints" / f"hrnet_w18_small_v1-e{cfg.epochs:04d}.ckpt"
    checkpoint = read_checkpoint(ckpt)
    assert checkpoint.epoch == cfg.epochs and checkpoint.metadata.labels == tuple(str(d) for d in range(10))
    assert (checkpoint.metadata.input_size, checkpoint.metadata.resize_size) == (32, 32)

    args = [
        *HRNET,
        "eval",
        "--ckpt",
        str(ckpt),
        "--data",
        str(digits / "val"),
        "--json",
        str(tmp_path / "eval.json"),
    ]
    out = _run(args, tmp_path, timeout=600).stdout
    printed = [line for line in out.splitlines() if line.startswith("{'Loss'")]
    assert printed, out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["images"] == 359  # every val image scored, the short last batch included
    assert result["Top_1_Acc"] >= 0.95, result
    assert result["Top_5_Acc"] >= result["Top_1_Acc"]


@pytest.mark.timeout(1200)
def test_msrun_two_workers_shard_data_and_end_identical(small_digits, tmp_path):
    run_dir, log_dir = tmp_path / "run", tmp_path / "msrun_logs"
    per_rank_batch = 10  # 100 images / 2 ranks = 50 per rank = 5 full steps, nothing dropped
    msrun = [str(BIN / "msrun"), "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}"]
    msrun += [f"--log_dir={log_dir}", "--join=True", str(BIN / "hrnet")]  # msrun runs a script file
    args = _train_args(
        data_path=small_digits, output_dir=run_dir, epochs=1, batch_size=per_rank_batch, lr_scale_batch=10
    )
    _run(msrun + args[len(HRNET) :], tmp_path, timeout=900)
    reports = {}
    for worker_log in sorted(log_dir.glob("worker_*.log")):
        for match in re.finditer(
            r"rank (\d)/2: (\d+) images in epoch 1, label counts \[([\d, ]+)\], "
            r"trainable weights sha256 ([0-9a-f]{64})",
            worker_log.read_text(),
        ):
            reports[int(match[1])] = (int(match[2]), np.array(match[3].split(", "), int), match[4])
    assert sorted(reports) == [0, 1], list(log_dir.iterdir())
    (n0, counts0, digest0), (n1, counts1, digest1) = reports[0], reports[1]
    assert n0 == n1 == 50  # each rank trained on half of the 100 images
    np.testing.assert_array_equal(counts0 + counts1, np.full(10, SMALL_PER_CLASS))  # together: all, once
    assert digest0 == digest1  # same start, averaged gradients: bit-identical weights
    start = _events(run_dir, "start")
    assert len(start) == 1 and start[0]["rank_size"] == 2 and start[0]["global_batch"] == 2 * per_rank_batch
    assert start[0]["lr_factor"] == 2.0  # LRs set for a global batch of 10 follow the global batch of 20
    cfg = load_config("hrnet_digits")
    lr, lr_init, lr_end = 2 * cfg.lr, 2 * cfg.lr_init, 2 * cfg.lr_end
    scaled = learning_rates(cfg.lr_scheme, lr, lr_init, lr_end, cfg.warmup_epochs, 1, steps_per_epoch=5)
    assert start[0]["first_lr"] == pytest.approx(float(scaled[0]))
    assert [e["steps"] for e in _events(run_dir, "epoch")] == [5]  # written once: rank 0 alone logs
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["hrnet_w18_small_v1-e0001.ckpt"]


def _loads(path: Path) -> int:
    """Read a checkpoint fully into a fresh network; returns its epoch counter."""
    checkpoint = read_checkpoint(path)
    net = create_model(checkpoint.metadata.arch, checkpoint.metadata.num_classes)
    load_into(net, checkpoint.params)
    assert np.isfinite(net.conv1.weight.asnumpy()).all()
    assert any(name.startswith("moment") for name in checkpoint.params)  # optimizer state travels along
    assert checkpoint.step == checkpoint.epoch * 10
    return checkpoint.epoch


@pytest.mark.timeout(1800)
def test_kill_mid_epoch_then_resume(small_digits, tmp_path):
    run_dir = tmp_path / "run"
    # The seed's optimizer and LR shape (RMSProp, loss scale 1024, linear warmup then decay), 10 steps/epoch.
    args = _train_args(
        data_path=small_digits,
        output_dir=run_dir,
        log_every_steps=1,
        epochs=2,
        batch_size=10,
        keep_checkpoint_max=1,
        optimizer="rmsprop",
        eps=0.001,
        lr_scheme="linear",
        lr=0.01,
        lr_init=0.001,
        lr_end=0.0001,
        warmup_epochs=1,
        loss_scale=1024,
    )
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 900
        while not any(s["epoch"] == 2 and s["step"] >= 13 for s in _events(run_dir, "step")):
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no progress into epoch 2"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert [e["epoch"] for e in _events(run_dir, "epoch")] == [1]  # killed inside epoch 2
    on_disk = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert [p.name for p in on_disk] == ["hrnet_w18_small_v1-e0001.ckpt"] and _loads(on_disk[0]) == 1

    _run([*args, "--resume"], tmp_path, timeout=900)
    starts = _events(run_dir, "start")
    assert [s["begin_epoch"] for s in starts] == [0, 1]
    assert starts[1]["steps_per_epoch"] == 10 and starts[1]["global_step"] == 10
    schedule = learning_rates("linear", 0.01, 0.001, 0.0001, 1, 2, steps_per_epoch=10)
    assert starts[1]["first_lr"] == pytest.approx(float(schedule[10]), rel=1e-6)  # read from the optimizer
    resumed = [s for s in _events(run_dir, "step") if s["time"] >= starts[1]["time"]]
    assert [s["step"] for s in resumed] == list(range(11, 21))
    assert [s["lr"] for s in resumed] == pytest.approx([float(v) for v in schedule[10:]])
    assert [e["epoch"] for e in _events(run_dir, "epoch")] == [1, 2]
    on_disk = sorted((run_dir / "checkpoints").iterdir())  # keep 1: epoch 1 was rotated out
    assert [p.name for p in on_disk] == ["hrnet_w18_small_v1-e0002.ckpt"] and _loads(on_disk[0]) == 2
