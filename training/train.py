"""`hrnet train`: the seed's HRNet recipe on one device or data-parallel under `msrun`.

The loop is MindSpore's `TrainOneStepCell` (graph mode by default) driven by a small Python loop
that owns everything the seed left to callbacks: per-step LR from the config, the seed's epoch log
line plus a JSONL twin, atomic checkpoints with optimizer state (keep the last N, plus the best by
val top-1), and `--resume` from the newest checkpoint at the same epoch, LR position and
optimizer state. Under `msrun` every rank seeds identically, so all start from the same weights;
the data is sharded by rank, gradients are averaged, and only rank 0 writes files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
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
    epoch_line,
    list_checkpoints,
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
        return nn.Adam(groups, learning_rate=lr, beta1=cfg.momentum, eps=cfg.eps, loss_scale=cfg.loss_scale)
    return nn.Momentum(
        groups, learning_rate=lr, momentum=cfg.momentum, use_nesterov=cfg.nesterov, loss_scale=cfg.loss_scale
    )


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


def _restore(
    net: nn.Cell, opt: nn.Optimizer, path: Path, metadata: ModelMetadata, with_optimizer: bool
) -> int:
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
    load_into(net, checkpoint.params)
    if with_optimizer:
        state = {
            p.name: checkpoint.params[p.name]
            for p in opt.get_parameters()
            if p.name in checkpoint.params and p.name not in NOT_SAVED
        }
        ms.load_param_into_net(opt, state, strict_load=False)
    return checkpoint.epoch


def train(config: TrainConfig, resume: bool = False) -> TrainResult:
    cfg = config
    started = time.perf_counter()
    ms.set_context(
        mode=ms.GRAPH_MODE if cfg.mode == "graph" else ms.PYNATIVE_MODE, device_target=cfg.device_target
    )
    rank, world = init_distributed()
    main = rank == 0
    ms.set_seed(cfg.seed)  # every rank builds the same initial weights
    ds.config.set_seed(cfg.seed)  # every rank shuffles the same way, so the shards are disjoint
    out = Path(cfg.output_dir)
    if main:
        (out / CKPT_DIR).mkdir(parents=True, exist_ok=True)
        for stale in (out / CKPT_DIR).glob(".*.tmp*"):  # left by a run killed while writing
            stale.unlink()
        atomic_write_text(out / CONFIG_YAML, to_yaml(cfg))
    runlog = RunLog(out, main)

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
    # Linear scaling rule: the configured LRs are meant for lr_scale_batch; other device counts scale them.
    lr_factor = cfg.batch_size * world / cfg.lr_scale_batch if cfg.lr_scale_batch else 1.0
    lrs = learning_rates(
        cfg.lr_scheme,
        cfg.lr * lr_factor,
        cfg.lr_init * lr_factor,
        cfg.lr_end * lr_factor,
        cfg.warmup_epochs,
        cfg.epochs,
        steps_per_epoch,
        0,
        cfg.lr_milestones,
        cfg.lr_gamma,
    )

    net = create_model(metadata.arch, metadata.num_classes)
    apply_init(net, cfg)
    loss_fn = LabelSmoothingCrossEntropy(metadata.num_classes, cfg.label_smoothing)
    if cfg.amp_level != "O0":
        net = ms.amp.auto_mixed_precision(net, cfg.amp_level)
    opt = make_optimizer(net, cfg, lrs)
    # Fixed loss scale as in the seed: the loss gradient is scaled by `sens`, the optimizer divides it back.
    step_cell = nn.TrainOneStepCell(nn.WithLossCell(net, loss_fn), opt, sens=cfg.loss_scale)

    begin_epoch = cfg.begin_epoch
    source = None
    if resume and list_checkpoints(out):
        source = list_checkpoints(out)[-1][1]
        begin_epoch = _restore(net, opt, source, metadata, with_optimizer=True)
    elif cfg.checkpoint:
        source = Path(cfg.checkpoint)
        _restore(net, opt, source, metadata, with_optimizer=False)
    if begin_epoch >= cfg.last_epoch:
        raise ConfigError(
            f"nothing to do: {begin_epoch} epochs are done and the run ends at {cfg.last_epoch}"
        )
    opt.global_step.set_data(ms.Tensor([begin_epoch * steps_per_epoch], ms.int32))
    first_lr = float(np.asarray(opt.get_lr().asnumpy()).reshape(-1)[0])

    best_path = out / BEST_CKPT
    best_top1 = read_best_top1(out)
    eval_data = None
    if cfg.eval_data_path and main:
        eval_data = eval_dataset(
            cfg.eval_data_path, metadata, cfg.eval_batch_size or cfg.batch_size, cfg.num_workers
        )
    runlog.event(
        "start",
        rank_size=world,
        begin_epoch=begin_epoch,
        epochs=cfg.epochs,
        end_epoch=cfg.last_epoch,
        steps_per_epoch=steps_per_epoch,
        global_batch=cfg.batch_size * world,
        global_step=begin_epoch * steps_per_epoch,
        lr_factor=lr_factor,
        first_lr=first_lr,
        resumed_from=str(source or ""),
    )
    log.info(
        "rank %d/%d: %s, %d classes, %d steps/epoch of %d images, epochs %d..%d%s",
        rank,
        world,
        metadata.arch,
        metadata.num_classes,
        steps_per_epoch,
        cfg.batch_size,
        begin_epoch + 1,
        cfg.last_epoch,
        f", from {source}" if source else "",
    )

    batches = dataset.repeat().create_tuple_iterator(num_epochs=1)
    label_counts = np.zeros(metadata.num_classes, dtype=np.int64)
    last_ckpt, last_eval = None, None
    for epoch in range(begin_epoch, cfg.last_epoch):
        net.set_train(True)
        tic = time.perf_counter()
        loss_sum = 0.0
        bar = tqdm(
            total=steps_per_epoch,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            leave=False,
            file=sys.stderr,
            disable=not (main and cfg.progress),
            dynamic_ncols=True,
        )
        for i in range(steps_per_epoch):
            image, label = next(batches)
            if epoch == begin_epoch:
                label_counts += np.bincount(label.asnumpy(), minlength=metadata.num_classes)
            loss = float(step_cell(image, label).asnumpy())
            loss_sum += loss
            step = epoch * steps_per_epoch + i + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lrs[step - 1]:.2e}", refresh=False)
            if cfg.log_every_steps and step % cfg.log_every_steps == 0:
                runlog.event("step", epoch=epoch + 1, step=step, loss=loss, lr=float(lrs[step - 1]))
        bar.close()
        epoch_ms = (time.perf_counter() - tic) * 1000
        lr_now = float(lrs[(epoch + 1) * steps_per_epoch - 1])
        avg_loss = loss_sum / steps_per_epoch
        runlog.line(epoch_line(epoch + 1, cfg.epochs, epoch_ms, steps_per_epoch, avg_loss, lr_now))
        runlog.event(
            "epoch",
            epoch=epoch + 1,
            epochs=cfg.epochs,
            epoch_time_ms=round(epoch_ms, 3),
            steps=steps_per_epoch,
            per_step_time_ms=round(epoch_ms / steps_per_epoch, 3),
            avg_loss=avg_loss,
            lr=lr_now,
            global_step=(epoch + 1) * steps_per_epoch,
        )
        done = epoch + 1
        final = done == cfg.last_epoch
        if main and cfg.save_checkpoint and (done % cfg.save_checkpoint_epochs == 0 or final):
            last_ckpt = checkpoint_path(out, metadata.arch, done)
            save_checkpoint(
                checkpoint_entries(net, opt), last_ckpt, metadata, epoch=done, step=done * steps_per_epoch
            )
            for _, old in list_checkpoints(out)[: -cfg.keep_checkpoint_max]:
                old.unlink()
            runlog.event("checkpoint", epoch=done, path=str(last_ckpt))
        if eval_data is not None and (done % cfg.eval_interval == 0 or final):
            last_eval = score(net, eval_data, loss_fn)
            runlog.line(f"epoch {done} eval: {last_eval}")
            runlog.event("eval", epoch=done, **last_eval)
            if last_eval["Top_1_Acc"] > best_top1 and cfg.save_checkpoint:
                best_top1 = last_eval["Top_1_Acc"]
                save_checkpoint(net, best_path, metadata, epoch=done, step=done * steps_per_epoch)
                atomic_write_text(out / BEST_JSON, json.dumps({"epoch": done, **last_eval}) + "\n")
    batches.stop()
    digest = weights_digest(net)
    # Every rank reports (msrun keeps each rank's output in its own worker log): same digest = same weights.
    log.info(
        "rank %d/%d: %d images in epoch %d, label counts %s, trainable weights sha256 %s",
        rank,
        world,
        int(label_counts.sum()),
        begin_epoch + 1,
        label_counts.tolist(),
        digest,
    )
    seconds = time.perf_counter() - started
    runlog.event(
        "end",
        epochs_done=cfg.last_epoch,
        seconds=round(seconds, 3),
        weights_sha256=digest,
        best_top1=best_top1,
        last_checkpoint=str(last_ckpt or ""),
    )
    return TrainResult(
        out,
        begin_epoch,
        cfg.last_epoch,
        last_ckpt,
        best_path if best_path.is_file() else None,
        best_top1,
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
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, overrides_from_args(args))
        if not cfg.data_path:
            raise ConfigError("no training data: set data_path in the config or pass --data-path")
        result = train(cfg, resume=args.resume)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    if result.last_eval is not None:
        print({key: result.last_eval[key] for key in ("Loss", "Top_1_Acc", "Top_5_Acc")})
    print(
        f"trained epochs {result.begin_epoch + 1}..{result.epochs_done} in {result.seconds:.1f} s; "
        f"checkpoints in {result.output_dir / CKPT_DIR}"
    )
    return 0
