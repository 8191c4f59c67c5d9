"""`hrnet info`: how big and how costly an architecture is, before anyone trains or serves it."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import mindspore as ms
import numpy as np
from mindspore import nn

from core.errors import CommandError
from training.model import ARCHS, canonical_arch, create_model


@dataclass(frozen=True)
class ModelCost:
    arch: str
    num_classes: int
    input_size: int
    trainable_params: int
    all_params: int  # with BatchNorm running statistics, i.e. what a checkpoint holds
    macs: int  # multiply-accumulates of convolutions and the classifier, per image


def count_params(net: nn.Cell) -> tuple[int, int]:
    trainable = sum(int(np.prod(p.shape)) for p in net.trainable_params())
    total = sum(int(np.prod(p.shape)) for p in net.get_parameters())
    return trainable, total


PROXY_SIZE = 64  # small enough for a fast eager pass, large enough that no feature map rounds


def count_macs(net: nn.Cell, input_size: int) -> int:
    """Multiply-accumulates for one image, from the real output shapes of every Conv2d and Dense.

    Forward hooks see the shapes the network actually produces, which a formula over the config
    would have to re-derive. Hooks need PyNative mode, where a 224-pixel W48 pass takes minutes on
    a small CPU, so the pass runs at PROXY_SIZE and each convolution's output side is rescaled:
    every HRNet op is a same-padded conv (output = ceil(input / stride)) or an exact upsampling,
    so a map at 1/2^d of the input has ceil(size / 2^d) pixels per side at any input size.
    """
    if input_size % 32:
        raise ValueError(
            f"input size must be a multiple of 32 (HRNet fuses maps down to 1/32), got {input_size}"
        )
    proxy = min(input_size, PROXY_SIZE)
    per_pixel: list[tuple[int, int, int]] = []  # (MACs per output pixel, proxy height, proxy width)
    dense_macs = 0

    def conv_hook(cell: nn.Conv2d, _inputs: tuple, output: ms.Tensor) -> None:
        kh, kw = cell.kernel_size
        _, channels, height, width = output.shape
        per_pixel.append((channels * (cell.in_channels // cell.group) * kh * kw, height, width))

    def dense_hook(cell: nn.Dense, _inputs: tuple, output: ms.Tensor) -> None:
        nonlocal dense_macs
        dense_macs += int(np.prod(output.shape)) * cell.in_channels

    handles = []
    for _, cell in net.cells_and_names():
        if isinstance(cell, nn.Conv2d):
            handles.append(cell.register_forward_hook(conv_hook))
        elif isinstance(cell, nn.Dense):
            handles.append(cell.register_forward_hook(dense_hook))
    previous_mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        net.set_train(False)
        net(ms.Tensor(np.zeros((1, 3, proxy, proxy), np.float32)))
    finally:
        ms.set_context(mode=previous_mode)
        for handle in handles:
            handle.remove()
    return dense_macs + sum(
        macs * math.ceil(input_size * height / proxy) * math.ceil(input_size * width / proxy)
        for macs, height, width in per_pixel
    )


def model_cost(arch: str, num_classes: int = 1000, input_size: int = 224) -> ModelCost:
    net = create_model(arch, num_classes)
    trainable, total = count_params(net)
    return ModelCost(
        canonical_arch(arch), num_classes, input_size, trainable, total, count_macs(net, input_size)
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default="w48", help=f"one of {', '.join(ARCHS)} (default w48)")
    parser.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    parser.add_argument(
        "--input-size", type=int, default=224, help="square input side in pixels (default 224)"
    )


def run(args: argparse.Namespace) -> int:
    if args.num_classes < 1:
        raise CommandError(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.input_size < 32 or args.input_size % 32:
        raise CommandError(f"--input-size must be a positive multiple of 32, got {args.input_size}")
    try:
        cost = model_cost(args.arch, args.num_classes, args.input_size)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    print(f"arch               hrnet_{cost.arch}")
    print(f"classes            {cost.num_classes}")
    print(f"input              3x{cost.input_size}x{cost.input_size}")
    print(f"trainable params   {cost.trainable_params:,} ({cost.trainable_params / 1e6:.1f}M)")
    print(f"all params         {cost.all_params:,} (with BatchNorm running statistics)")
    print(f"MACs per image     {cost.macs:,} ({cost.macs / 1e9:.2f} G)")
    return 0
