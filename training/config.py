"""Training configuration: one dataclass with working defaults, YAML files, command-line overrides.

Every key of the seed's `src/config.py` table has a field here (README maps the names). A YAML file
sets any subset of the fields; each field is also a `--flag` of `hrnet train`, and a flag given on
the command line wins over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from core.metadata import IMAGENET_MEAN, IMAGENET_STD

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
AMP_LEVELS = ("O0", "O2", "O3")
OPTIMIZERS = ("rmsprop", "sgd", "adam")


class ConfigError(ValueError):
    """A config file or flag has an unknown key or a value out of range."""


@dataclass
class TrainConfig:
    # data
    data_path: str = ""  # ImageFolder train directory (seed: data_path)
    eval_data_path: str = ""  # ImageFolder val directory; empty disables evaluation during training
    dataset: str = "imagefolder"  # a name for the logs only
    num_classes: int = 0  # 0: the number of class folders in data_path
    num_workers: int = 8  # parallel workers of the mindspore.dataset pipeline
    input_size: int = 224
    resize_size: int = 0  # eval short side before the centre crop; 0: input_size * 256 / 224
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomCropDecodeResize area range
    crop_ratio: tuple[float, float] = (0.75, 1.333)  # RandomCropDecodeResize aspect range
    hflip_prob: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN  # 0..1 scale
    std: tuple[float, float, float] = IMAGENET_STD
    # model
    arch: str = "w48"
    conv_init: str = "TruncatedNormal"  # or HeNormal
    dense_init: str = "RandomNormal"  # or XavierUniform
    # schedule
    batch_size: int = 16  # per device; the global batch is batch_size x devices
    epochs: int = 120  # seed: total_epoch; the LR schedule spans this many epochs
    end_epoch: int = 0  # stop after this epoch (seed: end_epoch); 0: epochs
    begin_epoch: int = 0  # with `checkpoint`, the epoch to continue from; --resume reads it from the file
    steps_per_epoch: int = 0  # cap on steps per epoch (quick runs); 0: the whole shard
    lr_scheme: str = "linear"
    lr: float = 0.01
    lr_init: float = 0.0001
    lr_end: float = 0.00001
    warmup_epochs: float = 2.0
    lr_scale_batch: int = 0  # global batch the LRs are for; they scale by batch x devices / this; 0: off
    lr_milestones: tuple[int, ...] = (30, 60, 90)  # epochs, step scheme
    lr_gamma: float = 0.1  # step scheme
    # optimisation
    optimizer: str = "rmsprop"
    momentum: float = 0.9  # seed: opt_momentum
    rmsprop_decay: float = 0.9
    eps: float = 0.001  # rmsprop and adam
    nesterov: bool = False  # sgd
    weight_decay: float = 0.00001  # seed: wd; never applied to BatchNorm gamma/beta or biases
    loss_scale: float = 1024.0  # fixed loss scale, no overflow skipping (seed)
    label_smoothing: float = 0.1  # seed: use_label_smooth + label_smooth_factor; 0 disables
    # runtime
    device_target: str = "CPU"
    mode: str = "graph"  # or pynative
    amp_level: str = "O0"
    seed: int = 1
    # output
    output_dir: str = "runs/train"  # seed: train_path
    checkpoint: str = ""  # weights to start from (seed: checkpoint_path); use --resume to continue a run
    save_checkpoint: bool = True  # seed: save_ckpt
    save_checkpoint_epochs: int = 1
    keep_checkpoint_max: int = 10
    eval_interval: int = 10  # epochs; the last epoch is always evaluated
    eval_batch_size: int = 0  # 0: batch_size
    log_every_steps: int = 0  # also write a JSONL record every N steps; 0: per epoch only
    progress: bool = True  # tqdm bar within each epoch (rank 0)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.device_target in DEVICE_TARGETS, f"device_target must be one of {DEVICE_TARGETS}"),
            (self.amp_level in AMP_LEVELS, f"amp_level must be one of {AMP_LEVELS}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.mode in ("graph", "pynative"), "mode must be graph or pynative"),
            (self.lr_scheme in ("linear", "cosine", "step"), "lr_scheme must be linear, cosine or step"),
            (
                self.conv_init in ("TruncatedNormal", "HeNormal"),
                "conv_init must be TruncatedNormal or HeNormal",
            ),
            (
                self.dense_init in ("RandomNormal", "XavierUniform"),
                "dense_init must be RandomNormal or XavierUniform",
            ),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (0 <= self.end_epoch <= self.epochs, "end_epoch must be in 0..epochs"),
            (0 <= self.begin_epoch < self.epochs, "begin_epoch must be in 0..epochs-1"),
            (self.input_size >= 32 and self.input_size % 32 == 0, "input_size must be a multiple of 32"),
            (
                self.resize_size == 0 or self.resize_size >= self.input_size,
                "resize_size must be >= input_size",
            ),
            (0.0 <= self.label_smoothing < 1.0, "label_smoothing must be in [0, 1)"),
            (self.loss_scale >= 1.0, "loss_scale must be >= 1"),
            (self.keep_checkpoint_max >= 1, "keep_checkpoint_max must be >= 1"),
            (self.save_checkpoint_epochs >= 1, "save_checkpoint_epochs must be >= 1"),
            (self.eval_interval >= 1, "eval_interval must be >= 1"),
            (self.lr_scale_batch >= 0, "lr_scale_batch must be >= 0"),
            (self.num_workers >= 1, "num_workers must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    @property
    def last_epoch(self) -> int:
        return self.end_epoch or self.epochs


_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML or command-line value into the field's type (lists become tuples)."""
    default = _FIELDS[name].default
    if isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        item_type = type(default[0]) if default else int
        return tuple(item_type(v) for v in items)
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(f"{name}: expected true or false, got {value!r}")
            return value.lower() in ("1", "true", "yes")
        return bool(value)
    try:
        return type(default)(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {value!r} as {type(default).__name__}") from exc


def resolve_config_path(name: str) -> Path:
    """A path, or the name of a bundled config (`hrnet_digits` or `hrnet_digits.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = CONFIG_DIR / (name if name.endswith(".yaml") else f"{name}.yaml")
    if bundled.is_file():
        return bundled
    raise ConfigError(
        f"config {name!r} not found (bundled: {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})"
    )


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if path:
        source = resolve_config_path(str(path))
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys")
        values.update(data)
    values.update(overrides or {})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(unknown)}")
    return TrainConfig(**{name: _coerce(name, value) for name, value in values.items()})


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per field; they default to None so only flags actually given override the file."""
    group = parser.add_argument_group("config overrides (each wins over the config file)")
    for f in fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        group.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, default=None, metavar="V", help=f"default {shown}"
        )


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in _FIELDS if getattr(args, name, None) is not None}


def to_yaml(config: TrainConfig) -> str:
    data = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return yaml.safe_dump(data, sort_keys=False)
