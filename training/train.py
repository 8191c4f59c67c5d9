"""`hrnet train`: the seed's HRNet recipe on one device or data-parallel under `msrun`.

The loop is MindSpore's `TrainOneStepCell` (graph mode by default) driven by a small Python loop
that owns everything the seed left to callbacks: per-step LR from the config, the seed's epoch log
line plus a JSONL twin, atomic checkpoints with optimizer state (keep the last N, plus the best by
val top-1), and `--resume` from the newest checkpoint at the same epoch, LR position and
optimizer state. Under `msrun` every rank seeds identically, so all start from the same weights;
the data is sharded by rank, gradients are averaged, and only rank 0 writes files.

`train` runs the phases below in order; each takes what the earlier ones made, so each can be
built and checked on its own: run setup, data, LR schedule, model, restore, then per epoch
`train_one_epoch`, the `CheckpointSaver` and `validate`, and the end report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mindspore as ms
import mindspore.dataset as ds
import numpy as np
from mindspore import nn
from mindspore.common.initializer import HeNormal, XavierUniform, initializer
from tqdm import tqdm

from core.atomic import atomic_write_text
from core.errors import CommandError
from core.metadata import ModelMetadata
from training.checkpoint import load_into, read_checkpoint, save_checkpoint
from training.config import (
    ConfigError,
    TrainConfig,
    add_config_arguments,
    load_config,
    overrides_from_args,
    to_yaml,
)
from training.context import set_mode_and_device, without_mindspore_warning
from training.data import class_names, eval_dataset, train_dataset, train_transforms
from training.evaluate import score
from training.loss import LabelSmoothingCrossEntropy
from training.lr import learning_rates
from training.model import canonical_arch, create_model
from training.runs import (
    BEST_CKPT,
    BEST_JSON,
    CKPT_DIR,
    CONFIG_YAML,
    RunLog,
    checkpoint_path,
    clear_run,
    epoch_line,
    list_checkpoints,
    previous_run,
    read_best_top1,
)

log = logging.getLogger("hrnet.train")

NOT_SAVED = ("learning_rate",)  # rebuilt from the config: a resumed run may extend the schedule


@dataclass
class TrainResult:
    output_dir: Path
    begin_epoch: int  # epochs already done when this run started (non-zero after --resume)
    epochs_done: int
    last_checkpoint: Path | None
    best_checkpoint: Path | None
    best_top1: float
    last_eval: dict[str, float] | None
    seconds: float


# --- run setup -------------------------------------------------------------------------------


@dataclass
class RunContext:
    """This process's place in the job: every rank trains, only rank 0 (`main`) writes files."""

    rank: int
    world: int
    out: Path
    log: RunLog

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> tuple[int, int]:
    """(rank, world size). Under msrun: joins the group and sets data parallel with averaged gradients.

    msrun also runs this script in its scheduler process (MS_ROLE=MS_SCHED), which must only serve
    the cluster: it joins, and leaves when the workers are done, without training anything itself.
    """
    role = os.environ.get("MS_ROLE")
    if role not in ("MS_WORKER", "MS_SCHED"):
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init

    init()
    if role == "MS_SCHED":
        raise SystemExit(0)
    rank, size = get_rank(), get_group_size()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(
        parallel_mode=ms.ParallelMode.DATA_PARALLEL, gradients_mean=True, device_num=size
    )
    return rank, size


def check_start(cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
    """Before anything is written: the datasets exist, and `output_dir` holds no earlier run unless
    it is resumed or replaced, so a forgotten `--resume` never mixes two runs' files.

    Under msrun every rank checks before joining the group, and rank 0 writes only after all have
    joined, so no rank mistakes this run's first files for an earlier run.
    """
    class_names(cfg.data_path)
    if cfg.eval_data_path:
        class_names(cfg.eval_data_path)
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir, --overwrite replaces it: pick one")
    previous = previous_run(Path(cfg.output_dir))
    if previous and not (resume or overwrite):
        names = ", ".join(p.name for p in previous[:4])
        raise ConfigError(
            f"{cfg.output_dir} holds an earlier run ({names}): pass --resume to continue it, "
            "--overwrite to replace it, or another --output-dir"
        )


def setup_run(cfg: TrainConfig, overwrite: bool = False) -> RunContext:
    """MindSpore's context, the msrun group, the same seeds on every rank, and rank 0's output folder
    (emptied of the earlier run first with `overwrite`)."""
    set_mode_and_device(cfg.mode, cfg.device_target)
    rank, world = init_distributed()
    ms.set_seed(cfg.seed)  # every rank builds the same initial weights
    ds.config.set_seed(cfg.seed)  # every rank shuffles the same way, so the shards are disjoint
    out = Path(cfg.output_dir)
    if rank == 0:
        if overwrite:
            for path in clear_run(out):
                log.info("removed %s (--overwrite)", path)
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (out / CKPT_DIR).glob(".*.tmp*"):  # left by a run killed while writing
            stale.unlink()
        atomic_write_text(out / CONFIG_YAML, to_yaml(cfg))
    return RunContext(rank, world, out, RunLog(out, enabled=rank == 0))


# --- data and LR schedule --------------------------------------------------------------------


@dataclass
class TrainData:
    metadata: ModelMetadata  # the model card every checkpoint carries
    dataset: ds.Dataset  # this rank's shard in full batches
    steps_per_epoch: int


def load_data(cfg: TrainConfig, rank: int, world: int) -> TrainData:
    """The classes of `data_path` (checked against `num_classes`), this rank's shard and its step count."""
    labels = class_names(cfg.data_path)
    if cfg.num_classes and cfg.num_classes != len(labels):
        raise ConfigError(
            f"num_classes is {cfg.num_classes} but {cfg.data_path} has {len(labels)} class folders"
        )
    metadata = ModelMetadata(
        arch=canonical_arch(cfg.arch),
        num_classes=len(labels),
        input_size=cfg.input_size,
        resize_size=cfg.resize_size,
        labels=tuple(labels),
        mean=cfg.mean,
        std=cfg.std,
    )
    transforms = train_transforms(
        cfg.input_size, cfg.mean, cfg.std, cfg.crop_scale, cfg.crop_ratio, cfg.hflip_prob
    )
    dataset = train_dataset(cfg.data_path, cfg.batch_size, transforms, cfg.num_workers, world, rank)
    shard_steps = dataset.get_dataset_size()
    if shard_steps < 1:
        raise ConfigError(
            f"{cfg.data_path} has fewer images than batch_size x devices = {cfg.batch_size * world}"
        )
    steps_per_epoch = min(shard_steps, cfg.steps_per_epoch) if cfg.steps_per_epoch else shard_steps
    return TrainData(metadata, dataset, steps_per_epoch)


def load_eval_data(cfg: TrainConfig, metadata: ModelMetadata) -> ds.Dataset | None:
    """The val set scored during training; None when `eval_data_path` is empty."""
    if not cfg.eval_data_path:
        return None
    return eval_dataset(cfg.eval_data_path, metadata, cfg.eval_batch_size or cfg.batch_size, cfg.num_workers)


def lr_factor(cfg: TrainConfig, world: int) -> float:
    """Linear scaling rule: the configured LRs are meant for a global batch of lr_scale_batch."""
    return cfg.batch_size * world / cfg.lr_scale_batch if cfg.lr_scale_batch else 1.0


def lr_schedule(cfg: TrainConfig, factor: float, steps_per_epoch: int) -> np.ndarray:
    """The LR of every step of all `epochs`, indexed by global step (a resumed run picks up its place)."""
    return learning_rates(
        cfg.lr_scheme,
        cfg.lr * factor,
        cfg.lr_init * factor,
        cfg.lr_end * factor,
        cfg.warmup_epochs,
        cfg.epochs,
        steps_per_epoch,
        0,
        cfg.lr_milestones,
        cfg.lr_gamma,
    )


# --- model and optimizer ---------------------------------------------------------------------


@dataclass
class Learner:
    """What one training step needs: the network, its loss, the optimizer and the cell that steps them."""

    net: nn.Cell
    loss_fn: nn.Cell
    opt: nn.Optimizer
    step_cell: nn.Cell


def apply_init(net: nn.Cell, cfg: TrainConfig) -> None:
    """The model initialises like the seed (TruncatedNormal convs, RandomNormal dense); others replace it."""
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.Conv2d) and cfg.conv_init == "HeNormal":
            cell.weight.set_data(
                initializer(HeNormal(mode="fan_out", nonlinearity="relu"), cell.weight.shape)
            )
        elif isinstance(cell, nn.Dense) and cfg.dense_init == "XavierUniform":
            cell.weight.set_data(initializer(XavierUniform(), cell.weight.shape))


def make_optimizer(net: nn.Cell, cfg: TrainConfig, lrs: np.ndarray) -> nn.Optimizer:
    """Weight decay on conv and dense weights only: BatchNorm gamma/beta and biases are not decayed."""
    params = net.trainable_params()
    decay = [p for p in params if len(p.shape) > 1]
    no_decay = [p for p in params if len(p.shape) <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
        {"order_params": params},
    ]
    lr = ms.Tensor(lrs, ms.float32)
    if cfg.optimizer == "rmsprop":
        return nn.RMSProp(
            groups,
            learning_rate=lr,
            decay=cfg.rmsprop_decay,
            momentum=cfg.momentum,
            epsilon=cfg.eps,
            loss_scale=cfg.loss_scale,
        )
    if cfg.optimizer == "adam":
        with without_mindspore_warning("'FusedSparseAdam' is deprecated"):
            return nn.Adam(
                groups, learning_rate=lr, beta1=cfg.momentum, eps=cfg.eps, loss_scale=cfg.loss_scale
            )
    return nn.Momentum(
        groups, learning_rate=lr, momentum=cfg.momentum, use_nesterov=cfg.nesterov, loss_scale=cfg.loss_scale
    )


def build_learner(cfg: TrainConfig, metadata: ModelMetadata, lrs: np.ndarray) -> Learner:
    net = create_model(metadata.arch, metadata.num_classes)
    apply_init(net, cfg)
    loss_fn = LabelSmoothingCrossEntropy(metadata.num_classes, cfg.label_smoothing)
    if cfg.amp_level != "O0":
        net = ms.amp.auto_mixed_precision(net, cfg.amp_level)
    opt = make_optimizer(net, cfg, lrs)
    # Fixed loss scale as in the seed: the loss gradient is scaled by `sens`, the optimizer divides it back.
    step_cell = nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn), opt, sens=cfg.loss_scale)
    return Learner(net, loss_fn, opt, step_cell)


# --- restore ---------------------------------------------------------------------------------


@dataclass
class Start:
    begin_epoch: int  # epochs already done
    source: Path | None  # the checkpoint the weights came from; None: fresh weights


def _restore(learner: Learner, path: Path, metadata: ModelMetadata, with_optimizer: bool) -> int:
    """Load weights (and optimizer state when resuming); returns the epochs the checkpoint had completed."""
    checkpoint = read_checkpoint(path)
    if checkpoint.metadata is not None and (checkpoint.metadata.arch, checkpoint.metadata.num_classes) != (
        metadata.arch,
        metadata.num_classes,
    ):
        raise ConfigError(
            f"{path} holds {checkpoint.metadata.arch} with {checkpoint.metadata.num_classes} classes, "
            f"the config asks for {metadata.arch} with {metadata.num_classes}"
        )
    load_into(learner.net, checkpoint.params)
    if with_optimizer:
        state = {
            p.name: checkpoint.params[p.name]
            for p in learner.opt.get_parameters()
            if p.name in checkpoint.params and p.name not in NOT_SAVED
        }
        ms.load_param_into_net(learner.opt, state, strict_load=False)
    return checkpoint.epoch


def restore(cfg: TrainConfig, learner: Learner, data: TrainData, out: Path, resume: bool) -> Start:
    """`--resume`: the newest checkpoint in `out` with its optimizer state and epoch; else `checkpoint`'s
    weights alone. Either way the optimizer's step counter is set to where the LR schedule continues."""
    begin_epoch, source = cfg.begin_epoch, None
    checkpoints = list_checkpoints(out)
    if resume and checkpoints:
        source = checkpoints[-1][1]
        begin_epoch = _restore(learner, source, data.metadata, with_optimizer=True)
    elif cfg.checkpoint:
        source = Path(cfg.checkpoint)
        _restore(learner, source, data.metadata, with_optimizer=False)
    if begin_epoch >= cfg.last_epoch:
        raise ConfigError(
            f"nothing to do: {begin_epoch} epochs are done and the run ends at {cfg.last_epoch}"
        )
    learner.opt.global_step.set_data(ms.Tensor([begin_epoch * data.steps_per_epoch], ms.int32))
    return Start(begin_epoch, source)


# --- per epoch: train, save, validate --------------------------------------------------------


@dataclass
class EpochStats:
    avg_loss: float
    epoch_ms: float
    label_counts: np.ndarray  # images per class this rank trained on in the epoch


def train_one_epoch(
    learner: Learner,
    batches: Iterator[tuple[ms.Tensor, ms.Tensor]],
    epoch: int,
    lrs: np.ndarray,
    data: TrainData,
    cfg: TrainConfig,
    run: RunContext,
) -> EpochStats:
    """`steps_per_epoch` optimizer steps from `batches`, then the seed's epoch line and its JSONL twin.

    `epoch` counts from 0; the logs count from 1, like the seed's.
    """
    steps, num_classes = data.steps_per_epoch, data.metadata.num_classes
    learner.net.set_train(True)
    tic = time.perf_counter()
    loss_sum = 0.0
    label_counts = np.zeros(num_classes, dtype=np.int64)
    bar = tqdm(
        total=steps,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        file=sys.stderr,
        disable=not (run.main and cfg.progress),
        dynamic_ncols=True,
    )
    for i in range(steps):
        image, label = next(batches)
        label_counts += np.bincount(label.asnumpy(), minlength=num_classes)
        loss = float(learner.step_cell(image, label).asnumpy())
        loss_sum += loss
        step = epoch * steps + i + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lrs[step - 1]:.2e}", refresh=False)
        if cfg.log_every_steps and step % cfg.log_every_steps == 0:
            run.log.event("step", epoch=epoch + 1, step=step, loss=loss, lr=float(lrs[step - 1]))
    bar.close()
    epoch_ms = (time.perf_counter() - tic) * 1000
    lr_now = float(lrs[(epoch + 1) * steps - 1])
    avg_loss = loss_sum / steps
    run.log.line(epoch_line(epoch + 1, cfg.epochs, epoch_ms, steps, avg_loss, lr_now))
    run.log.event(
        "epoch",
        epoch=epoch + 1,
        epochs=cfg.epochs,
        epoch_time_ms=round(epoch_ms, 3),
        steps=steps,
        per_step_time_ms=round(epoch_ms / steps, 3),
        avg_loss=avg_loss,
        lr=lr_now,
        global_step=(epoch + 1) * steps,
    )
    return EpochStats(avg_loss, epoch_ms, label_counts)


def checkpoint_entries(net: nn.Cell, opt: nn.Optimizer) -> list[dict[str, Any]]:
    """The network's parameters under their own names, then the optimizer state (moments, global_step)."""
    own = {p.name for p in net.get_parameters()}
    entries = [{"name": p.name, "data": p} for p in net.get_parameters()]
    entries += [
        {"name": p.name, "data": p}
        for p in opt.get_parameters()
        if p.name not in own and p.name not in NOT_SAVED
    ]
    return entries


@dataclass
class CheckpointSaver:
    """Epoch checkpoints (every `every` epochs and the last, the newest `keep` kept) with optimizer state,
    and best.ckpt + best.json whenever val top-1 beats the best so far, which a resumed run reads back.

    Disabled (`enabled` False: not rank 0, or `save_checkpoint` off) it writes nothing and keeps the
    best top-1 it read.
    """

    out: Path
    metadata: ModelMetadata
    steps_per_epoch: int
    log: RunLog
    every: int = 1
    keep: int = 10
    enabled: bool = True
    last: Path | None = field(default=None, init=False)  # the newest epoch checkpoint written
    best_top1: float = field(init=False)

    def __post_init__(self) -> None:
        self.best_top1 = read_best_top1(self.out)

    @property
    def best(self) -> Path | None:
        path = self.out / BEST_CKPT
        return path if path.is_file() else None

    def epoch_end(self, learner: Learner, epoch: int, final: bool) -> Path | None:
        """After `epoch` epochs (counted from 1): the checkpoint written, or None when none is due."""
        if not self.enabled or not (epoch % self.every == 0 or final):
            return None
        path = checkpoint_path(self.out, self.metadata.arch, epoch)
        entries = checkpoint_entries(learner.net, learner.opt)
        save_checkpoint(entries, path, self.metadata, epoch=epoch, step=epoch * self.steps_per_epoch)
        for _, old in list_checkpoints(self.out)[: -self.keep]:
            old.unlink()
        self.log.event("checkpoint", epoch=epoch, path=str(path))
        self.last = path
        return path

    def offer_best(self, net: nn.Cell, scores: dict[str, float], epoch: int) -> bool:
        """Save `net` as best.ckpt (weights only) when `scores` beat the best top-1 so far."""
        if not self.enabled or scores["Top_1_Acc"] <= self.best_top1:
            return False
        self.best_top1 = scores["Top_1_Acc"]
        save_checkpoint(
            net, self.out / BEST_CKPT, self.metadata, epoch=epoch, step=epoch * self.steps_per_epoch
        )
        atomic_write_text(self.out / BEST_JSON, json.dumps({"epoch": epoch, **scores}) + "\n")
        return True


def validate(
    learner: Learner, eval_data: ds.Dataset, epoch: int, runlog: RunLog, progress: bool = False
) -> dict[str, float]:
    """Every val image once, as `hrnet eval` scores it, so the two figures compare."""
    scores = score(learner.net, eval_data, learner.loss_fn, progress=progress, desc=f"eval {epoch}")
    runlog.line(f"epoch {epoch} eval: {scores}")
    runlog.event("eval", epoch=epoch, **scores)
    return scores


# --- reports ---------------------------------------------------------------------------------


def report_start(
    cfg: TrainConfig, run: RunContext, data: TrainData, learner: Learner, start: Start, factor: float
) -> None:
    """The start event (rank 0) and each rank's one-line plan; the first LR is read from the optimizer."""
    steps = data.steps_per_epoch
    first_lr = float(np.asarray(learner.opt.get_lr().asnumpy()).reshape(-1)[0])
    run.log.event(
        "start",
        rank_size=run.world,
        begin_epoch=start.begin_epoch,
        epochs=cfg.epochs,
        end_epoch=cfg.last_epoch,
        steps_per_epoch=steps,
        global_batch=cfg.batch_size * run.world,
        global_step=start.begin_epoch * steps,
        lr_factor=factor,
        first_lr=first_lr,
        resumed_from=str(start.source or ""),
    )
    log.info(
        "rank %d/%d: %s, %d classes, %d steps/epoch of %d images, epochs %d..%d%s",
        run.rank,
        run.world,
        data.metadata.arch,
        data.metadata.num_classes,
        steps,
        cfg.batch_size,
        start.begin_epoch + 1,
        cfg.last_epoch,
        f", from {start.source}" if start.source else "",
    )


def weights_digest(net: nn.Cell) -> str:
    """SHA-256 over the trainable parameters in name order: equal digests mean bit-identical weights.

    BatchNorm running statistics are left out: as in the seed (no SyncBN), each rank averages its own
    batches, and only rank 0's are saved.
    """
    digest = hashlib.sha256()
    for param in sorted(net.trainable_params(), key=lambda p: p.name):
        digest.update(param.name.encode())
        digest.update(np.ascontiguousarray(param.asnumpy()).tobytes())
    return digest.hexdigest()


def report_end(
    cfg: TrainConfig,
    run: RunContext,
    learner: Learner,
    start: Start,
    label_counts: np.ndarray,
    saver: CheckpointSaver,
    started: float,
) -> float:
    """Each rank's first-epoch label counts and weights digest, then the end event; returns the seconds."""
    digest = weights_digest(learner.net)
    # Every rank reports (msrun keeps each rank's output in its own worker log): same digest = same weights.
    log.info(
        "rank %d/%d: %d images in epoch %d, label counts %s, trainable weights sha256 %s",
        run.rank,
        run.world,
        int(label_counts.sum()),
        start.begin_epoch + 1,
        label_counts.tolist(),
        digest,
    )
    seconds = time.perf_counter() - started
    run.log.event(
        "end",
        epochs_done=cfg.last_epoch,
        seconds=round(seconds, 3),
        weights_sha256=digest,
        best_top1=saver.best_top1,
        last_checkpoint=str(saver.last or ""),
    )
    return seconds


# --- the run ---------------------------------------------------------------------------------


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainResult:
    cfg = config
    started = time.perf_counter()
    check_start(cfg, resume, overwrite)
    run = setup_run(cfg, overwrite)
    data = load_data(cfg, run.rank, run.world)
    factor = lr_factor(cfg, run.world)
    lrs = lr_schedule(cfg, factor, data.steps_per_epoch)
    learner = build_learner(cfg, data.metadata, lrs)
    start = restore(cfg, learner, data, run.out, resume)
    saver = CheckpointSaver(
        run.out,
        data.metadata,
        data.steps_per_epoch,
        run.log,
        every=cfg.save_checkpoint_epochs,
        keep=cfg.keep_checkpoint_max,
        enabled=run.main and cfg.save_checkpoint,
    )
    eval_data = load_eval_data(cfg, data.metadata) if run.main else None
    report_start(cfg, run, data, learner, start, factor)

    batches = data.dataset.repeat().create_tuple_iterator(num_epochs=1)
    label_counts = np.zeros(data.metadata.num_classes, dtype=np.int64)
    last_eval = None
    for epoch in range(start.begin_epoch, cfg.last_epoch):
        stats = train_one_epoch(learner, batches, epoch, lrs, data, cfg, run)
        if epoch == start.begin_epoch:
            label_counts = stats.label_counts
        done = epoch + 1
        final = done == cfg.last_epoch
        saver.epoch_end(learner, done, final)
        if eval_data is not None and (done % cfg.eval_interval == 0 or final):
            last_eval = validate(learner, eval_data, done, run.log, cfg.progress)
            saver.offer_best(learner.net, last_eval, done)
    batches.stop()
    seconds = report_end(cfg, run, learner, start, label_counts, saver, started)
    return TrainResult(
        run.out,
        start.begin_epoch,
        cfg.last_epoch,
        saver.last,
        saver.best,
        saver.best_top1,
        last_eval,
        seconds,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file or bundled name: hrnet_w48_imagenet, hrnet_w48_imagenet_gpu, "
        "hrnet_w48_pytorch, hrnet_digits",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest checkpoint in output_dir (epoch, LR position, optimizer)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the earlier run in output_dir (its checkpoints, logs, best.*, config.yaml and "
        "exports/); without this or --resume such a folder is refused",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, overrides_from_args(args))
        if not cfg.data_path:
            raise ConfigError("no training data: set data_path in the config or pass --data-path")
        result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    if result.last_eval is not None:
        print({key: result.last_eval[key] for key in ("Loss", "Top_1_Acc", "Top_5_Acc")})
    print(
        f"trained epochs {result.begin_epoch + 1}..{result.epochs_done} in {result.seconds:.1f} s; "
        f"checkpoints in {result.output_dir / CKPT_DIR}"
    )
    return 0
