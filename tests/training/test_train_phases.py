"""The phases of `hrnet train`, each on its own: run setup, data, LR factor, one epoch, the
checkpoint saver, restore and resume, and the run folder's MindSpore-free helpers.

`test_train.py` runs the whole command end to end; here each phase gets inputs chosen so that its
own rule shows (30 images in 10 classes, w18_small_v1 at 32 px, a one-layer net for the epoch loop).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
from mindspore import nn
from PIL import Image

from core.metadata import ModelMetadata
from training.checkpoint import read_checkpoint, save_checkpoint
from training.config import ConfigError, TrainConfig, load_config
from training.loss import LabelSmoothingCrossEntropy
from training.lr import learning_rates
from training.model import create_model
from training.runs import (
    CKPT_DIR,
    CONFIG_YAML,
    EXPORTS_DIR,
    RunLog,
    checkpoint_path,
    clear_run,
    epoch_line,
    list_checkpoints,
    previous_run,
    read_best_top1,
)
from training.train import (
    CheckpointSaver,
    Learner,
    RunContext,
    Start,
    TrainData,
    build_learner,
    check_start,
    load_data,
    lr_factor,
    lr_schedule,
    make_optimizer,
    restore,
    setup_run,
    train_one_epoch,
    weights_digest,
)

REPO = Path(__file__).resolve().parents[2]
ARCH = "w18_small_v1"
CLASSES, PER_CLASS = 10, 3


def _events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "log.jsonl").read_text().splitlines() if (run_dir / "log.jsonl").is_file() else []
    return [r for r in map(json.loads, lines) if r["event"] == kind]


def _config(data_path: Path, out: Path, **overrides) -> TrainConfig:
    """Pynative, the process default, so these tests leave MindSpore's mode as they found it."""
    values = dict(
        data_path=str(data_path),
        output_dir=str(out),
        arch="w18_small",  # the timm alias: the phases must store the canonical name
        input_size=32,
        batch_size=4,
        epochs=4,
        optimizer="sgd",
        mode="pynative",
        num_workers=1,
        progress=False,
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """An ImageFolder of CLASSES x PER_CLASS random 32 px PNGs."""
    root = tmp_path_factory.mktemp("images") / "train"
    rng = np.random.default_rng(0)
    for label in range(CLASSES):
        (root / str(label)).mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / str(label) / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def data(image_folder, tmp_path_factory) -> TrainData:
    return load_data(_config(image_folder, tmp_path_factory.mktemp("unused")), rank=0, world=1)


@pytest.fixture(scope="module")
def learner(image_folder, data, tmp_path_factory) -> Learner:
    """w18_small_v1 whose optimizer moments are 0.5 (not their initial 0), so a restore that carries
    them shows."""
    cfg = _config(image_folder, tmp_path_factory.mktemp("unused"))
    built = build_learner(cfg, data.metadata, lr_schedule(cfg, 1.0, data.steps_per_epoch))
    for param in built.opt.get_parameters():
        if param.name.startswith("moments."):
            param.set_data(ms.Tensor(np.full(param.shape, 0.5, np.float32)))
    return built


def _moments(learner: Learner) -> list[np.ndarray]:
    return [p.asnumpy() for p in learner.opt.get_parameters() if p.name.startswith("moments.")]


# --- the run folder, without MindSpore ------------------------------------------------------


def test_run_folder_helpers_and_the_demo_import_without_mindspore():
    probe = "import sys, training.runs, hrnet.demo; print('mindspore' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip() == "False"


def test_list_checkpoints_finds_epoch_checkpoints_oldest_first(tmp_path):
    assert list_checkpoints(tmp_path) == []  # no checkpoints folder yet
    for epoch in (10, 2, 1):
        path = checkpoint_path(tmp_path, ARCH, epoch)
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    folder = tmp_path / CKPT_DIR
    for other in (".hrnet_w18_small_v1-e0003.ckpt.abc.tmp", "best.ckpt", "hrnet_w18-e0004.ckpt.eval.json"):
        (folder / other).write_bytes(b"")
    assert checkpoint_path(tmp_path, ARCH, 2).name == "hrnet_w18_small_v1-e0002.ckpt"
    assert list_checkpoints(tmp_path) == [(e, checkpoint_path(tmp_path, ARCH, e)) for e in (1, 2, 10)]


def test_run_log_writes_both_logs_only_when_enabled(tmp_path):
    RunLog(tmp_path, enabled=False).line("not written")
    RunLog(tmp_path, enabled=False).event("start")
    assert list(tmp_path.iterdir()) == []
    runlog = RunLog(tmp_path, enabled=True)
    runlog.line("epoch: [1/2]")
    runlog.event("epoch", epoch=1)
    assert (tmp_path / "log.txt").read_text() == "epoch: [1/2]\n"
    assert [e["epoch"] for e in _events(tmp_path, "epoch")] == [1]


def _earlier_run(out: Path) -> list[Path]:
    """The files an earlier run (and eval/export at their default places) leave, and one of the user's."""
    files = [
        out / "log.jsonl",
        out / "log.txt",
        out / CONFIG_YAML,
        out / "best.ckpt",
        out / "best.json",
        out / "best.ckpt.eval.json",
        checkpoint_path(out, ARCH, 1),
        out / EXPORTS_DIR / "best.onnx",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("earlier")
    (out / "notes.txt").write_text("the user's")
    return files


def test_an_earlier_run_is_found_and_cleared_but_nothing_else(tmp_path):
    assert previous_run(tmp_path / "new") == [] and previous_run(tmp_path) == []
    (tmp_path / CONFIG_YAML).write_text("a run that failed before training")
    assert previous_run(tmp_path) == []  # nothing trained: a rerun may reuse the folder
    files = _earlier_run(tmp_path / "run")
    found = previous_run(tmp_path / "run")
    assert {p.name for p in found} >= {"log.jsonl", CKPT_DIR, EXPORTS_DIR, "best.ckpt.eval.json"}
    clear_run(tmp_path / "run")
    assert not any(p.exists() for p in files)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["notes.txt"]


def test_an_earlier_run_needs_resume_or_overwrite(image_folder, tmp_path):
    out = tmp_path / "run"
    files = _earlier_run(out)
    cfg = _config(image_folder, out)
    with pytest.raises(ConfigError, match=r"holds an earlier run .*--resume to continue it, --overwrite"):
        check_start(cfg, resume=False, overwrite=False)
    with pytest.raises(ConfigError, match="pick one"):
        check_start(cfg, resume=True, overwrite=True)
    assert all(p.read_text() == "earlier" for p in files)
    check_start(cfg, resume=True, overwrite=False)
    check_start(cfg, resume=False, overwrite=True)
    setup_run(cfg, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [CKPT_DIR, CONFIG_YAML, "notes.txt"]
    assert list((out / CKPT_DIR).iterdir()) == [] and load_config(out / CONFIG_YAML) == cfg


def test_a_missing_dataset_is_refused_before_the_output_folder_exists(tmp_path):
    out = tmp_path / "run"
    paths = ["--data-path", str(tmp_path / "nope"), "--output-dir", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "hrnet", "train", "--config", "hrnet_digits", *paths],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip().splitlines()[-1].startswith("hrnet train: error: dataset directory not found")
    )
    assert not out.exists()


# --- setup, data, LR ------------------------------------------------------------------------


def test_setup_run_prepares_rank_zeros_output_folder(image_folder, tmp_path):
    out = tmp_path / "run"
    stale = out / CKPT_DIR / ".hrnet_w18_small_v1-e0002.ckpt.x1y2.tmp"  # a write killed half-way
    kept = checkpoint_path(out, ARCH, 1)
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half")
    kept.write_bytes(b"whole")
    cfg = _config(image_folder, out, epochs=7)
    run = setup_run(cfg)
    assert (run.rank, run.world, run.main, run.out) == (0, 1, True, out)
    assert not stale.exists() and kept.exists()
    assert load_config(out / CONFIG_YAML) == cfg


def test_load_data_counts_full_batches_of_this_ranks_shard(image_folder, tmp_path):
    images = CLASSES * PER_CLASS
    data = load_data(_config(image_folder, tmp_path), rank=0, world=1)
    assert data.steps_per_epoch == images // 4  # the short last batch is dropped
    assert data.metadata.arch == ARCH and data.metadata.labels == tuple(str(i) for i in range(CLASSES))
    assert data.metadata.input_size == 32
    assert load_data(_config(image_folder, tmp_path, steps_per_epoch=5), 0, 1).steps_per_epoch == 5
    assert load_data(_config(image_folder, tmp_path), rank=1, world=2).steps_per_epoch == images // 2 // 4
    with pytest.raises(ConfigError, match=r"num_classes is 5 but .* has 10 class folders"):
        load_data(_config(image_folder, tmp_path, num_classes=5), 0, 1)
    with pytest.raises(ConfigError, match="fewer images than batch_size x devices = 32"):
        load_data(_config(image_folder, tmp_path, batch_size=16), rank=0, world=2)


def test_lr_factor_scales_the_schedule_with_the_global_batch(image_folder, tmp_path):
    cfg = _config(image_folder, tmp_path, batch_size=10, lr_scale_batch=10, epochs=3)
    assert (lr_factor(cfg, world=1), lr_factor(cfg, world=2)) == (1.0, 2.0)
    assert lr_factor(replace(cfg, lr_scale_batch=0), world=4) == 1.0  # scaling off
    lrs = lr_schedule(cfg, 2.0, steps_per_epoch=5)
    expected = learning_rates(
        cfg.lr_scheme, 2 * cfg.lr, 2 * cfg.lr_init, 2 * cfg.lr_end, cfg.warmup_epochs, 3, 5
    )
    np.testing.assert_array_equal(lrs, expected)


# --- one epoch ------------------------------------------------------------------------------


def test_train_one_epoch_steps_logs_and_counts_labels(image_folder, data, tmp_path):
    """A one-layer net stands in for HRNet: the loop, not the model, is under test here."""
    cfg = _config(image_folder, tmp_path, epochs=2, steps_per_epoch=2, log_every_steps=1)
    lrs = lr_schedule(cfg, 1.0, steps_per_epoch=2)
    net = nn.SequentialCell(nn.Flatten(), nn.Dense(3 * 32 * 32, CLASSES))
    loss_fn = LabelSmoothingCrossEntropy(CLASSES, cfg.label_smoothing)
    opt = make_optimizer(net, cfg, lrs)
    tiny = Learner(net, loss_fn, opt, nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn), opt))
    run = RunContext(0, 1, tmp_path, RunLog(tmp_path, enabled=True))
    two_steps = replace(data, steps_per_epoch=2)
    batches = data.dataset.repeat().create_tuple_iterator(num_epochs=1)
    stats = [train_one_epoch(tiny, batches, epoch, lrs, two_steps, cfg, run) for epoch in (0, 1)]
    batches.stop()

    steps = _events(tmp_path, "step")
    assert [(s["epoch"], s["step"]) for s in steps] == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert [s["lr"] for s in steps] == pytest.approx([float(v) for v in lrs])  # indexed by global step
    assert [int(s.label_counts.sum()) for s in stats] == [2 * 4, 2 * 4]
    assert stats[1].avg_loss == pytest.approx((steps[2]["loss"] + steps[3]["loss"]) / 2)
    epochs = _events(tmp_path, "epoch")
    assert [(e["epoch"], e["global_step"], e["lr"]) for e in epochs] == [
        (1, 2, float(lrs[1])),
        (2, 4, float(lrs[3])),
    ]
    lines = (tmp_path / "log.txt").read_text().splitlines()
    assert lines == [
        epoch_line(n + 1, 2, s.epoch_ms, 2, s.avg_loss, float(lrs[2 * n + 1])) for n, s in enumerate(stats)
    ]


# --- checkpoint saver -----------------------------------------------------------------------


def test_saver_writes_due_epochs_and_keeps_the_newest(data, learner, tmp_path):
    saver = CheckpointSaver(
        tmp_path, data.metadata, data.steps_per_epoch, RunLog(tmp_path, True), every=2, keep=2
    )
    written = [saver.epoch_end(learner, epoch, final=epoch == 5) for epoch in range(1, 6)]
    due = {epoch: checkpoint_path(tmp_path, ARCH, epoch) for epoch in (2, 4, 5)}  # every 2nd, and the last
    assert written == [due.get(epoch) for epoch in range(1, 6)]
    assert [epoch for epoch, _ in list_checkpoints(tmp_path)] == [4, 5]  # 2 rotated out
    assert saver.last == checkpoint_path(tmp_path, ARCH, 5)
    assert [e["epoch"] for e in _events(tmp_path, "checkpoint")] == [2, 4, 5]
    checkpoint = read_checkpoint(saver.last)
    assert (checkpoint.epoch, checkpoint.step) == (5, 5 * data.steps_per_epoch)
    assert checkpoint.metadata == data.metadata
    assert any(name.startswith("moments.") for name in checkpoint.params)  # optimizer state too


def test_saver_keeps_the_best_top1_and_a_new_run_reads_it_back(data, learner, tmp_path):
    saver = CheckpointSaver(tmp_path, data.metadata, data.steps_per_epoch, RunLog(tmp_path, True))
    assert (saver.best_top1, saver.best) == (-1.0, None)
    scores = {"Loss": 1.0, "Top_5_Acc": 1.0, "images": 30}
    offers = [(1, 0.5), (2, 0.4), (3, 0.5), (4, 0.6)]
    taken = [saver.offer_best(learner.net, {**scores, "Top_1_Acc": top1}, epoch) for epoch, top1 in offers]
    assert taken == [True, False, False, True]  # a tie does not replace the earlier best
    assert json.loads((tmp_path / "best.json").read_text()) == {"epoch": 4, **scores, "Top_1_Acc": 0.6}
    best = read_checkpoint(saver.best)
    assert best.epoch == 4 and not any(name.startswith("moments.") for name in best.params)  # weights only
    assert read_best_top1(tmp_path) == 0.6
    again = CheckpointSaver(tmp_path, data.metadata, data.steps_per_epoch, RunLog(tmp_path, True))
    assert again.best_top1 == 0.6 and not again.offer_best(learner.net, {**scores, "Top_1_Acc": 0.55}, 5)


def test_disabled_saver_writes_nothing(data, learner, tmp_path):
    saver = CheckpointSaver(
        tmp_path, data.metadata, data.steps_per_epoch, RunLog(tmp_path, False), enabled=False
    )
    assert saver.epoch_end(learner, 1, final=True) is None
    assert not saver.offer_best(learner.net, {"Top_1_Acc": 1.0}, 1)
    assert saver.best_top1 == -1.0 and list(tmp_path.iterdir()) == []


# --- restore --------------------------------------------------------------------------------


def test_resume_continues_from_the_newest_checkpoint(image_folder, data, learner, tmp_path):
    saver = CheckpointSaver(tmp_path, data.metadata, data.steps_per_epoch, RunLog(tmp_path, True))
    for epoch in (1, 2):
        saver.epoch_end(learner, epoch, final=False)
    cfg = _config(image_folder, tmp_path)
    lrs = lr_schedule(cfg, 1.0, data.steps_per_epoch)
    fresh = build_learner(cfg, data.metadata, lrs)
    assert weights_digest(fresh.net) != weights_digest(learner.net)

    start = restore(cfg, fresh, data, tmp_path, resume=True)
    assert start == Start(2, checkpoint_path(tmp_path, ARCH, 2))
    assert weights_digest(fresh.net) == weights_digest(learner.net)
    assert all((m == 0.5).all() for m in _moments(fresh))
    assert int(fresh.opt.global_step.asnumpy()[0]) == 2 * data.steps_per_epoch
    assert float(fresh.opt.get_lr().asnumpy()) == pytest.approx(float(lrs[2 * data.steps_per_epoch]))

    with pytest.raises(ConfigError, match="nothing to do: 2 epochs are done and the run ends at 2"):
        restore(replace(cfg, end_epoch=2), fresh, data, tmp_path, resume=True)


def test_start_from_weights_keeps_the_configured_epoch_and_fresh_optimizer(
    image_folder, data, learner, tmp_path
):
    source = CheckpointSaver(tmp_path, data.metadata, data.steps_per_epoch, RunLog(tmp_path, True))
    source.epoch_end(learner, 3, final=False)
    cfg = _config(image_folder, tmp_path / "new", checkpoint=str(source.last), begin_epoch=1)
    fresh = build_learner(cfg, data.metadata, lr_schedule(cfg, 1.0, data.steps_per_epoch))

    start = restore(cfg, fresh, data, tmp_path / "new", resume=False)
    assert start == Start(1, source.last)
    assert weights_digest(fresh.net) == weights_digest(learner.net)
    assert all((m == 0).all() for m in _moments(fresh))  # weights only: the optimizer starts afresh
    assert int(fresh.opt.global_step.asnumpy()[0]) == data.steps_per_epoch

    other_arch = replace(data, metadata=replace(data.metadata, arch="w18"))
    with pytest.raises(ConfigError, match="holds w18_small_v1 with 10 classes, the config asks for w18"):
        restore(cfg, fresh, other_arch, tmp_path / "new", resume=False)


# --- what the commands print ------------------------------------------------------------------


def _quiet_env() -> dict[str, str]:
    """MindSpore at its default log level (warnings shown), unlike the other command tests."""
    return {k: v for k, v in os.environ.items() if k != "GLOG_v"} | {"PYTHONPATH": str(REPO)}


@pytest.mark.slow  # ~4-5 s: a Python process importing MindSpore and training a step
def test_no_deprecation_warnings_from_our_calls(tmp_path):
    probe = (
        "import numpy as np\n"
        "from training.config import TrainConfig\n"
        "from training.context import set_mode_and_device\n"
        "from training.model import create_model\n"
        "from training.train import make_optimizer\n"
        "set_mode_and_device('graph', 'CPU')\n"
        "net = create_model('w18_small_v1', 10)\n"
        "make_optimizer(net, TrainConfig(optimizer='adam'), np.full(4, 1e-3, np.float32))\n"
        "print('built')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=_quiet_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stdout.strip() == "built", result.stderr
    assert "deprecated" not in result.stderr, result.stderr  # device_target, FusedSparseAdam


@pytest.mark.slow  # ~9 s: hrnet eval in a process of its own
def test_eval_shows_progress_and_no_deprecation_warning(image_folder, tmp_path):
    ckpt = save_checkpoint(
        create_model(ARCH, CLASSES),
        tmp_path / "m.ckpt",
        ModelMetadata(arch=ARCH, num_classes=CLASSES, input_size=32),
    )
    args = [
        "eval",
        "--ckpt",
        str(ckpt),
        "--data",
        str(image_folder),
        "--batch-size",
        "8",
        "--mode",
        "pynative",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "hrnet", *args],
        cwd=tmp_path,
        env=_quiet_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"eval: +100%\|.*\| 4/4 ", result.stderr), result.stderr  # 30 images, 8 per batch
    assert "deprecated" not in result.stderr, result.stderr
