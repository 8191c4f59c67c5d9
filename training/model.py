"""HRNet-C image classifiers in MindSpore.

The architecture is data: `ARCHS` holds one `HRNetSpec` per published variant, and one builder
turns any spec into a network. Child cell names and SequentialCell/CellList indices mirror the
official PyTorch checkpoints (`conv1`, `layer1.0.downsample.0`, `transition1.1.0.0`,
`stage3.0.fuse_layers.2.0.1.1`, `incre_modules`, `downsamp_modules`, `final_layer`,
`classifier`), so converting official weights is a rename of BatchNorm parameters only. Where
PyTorch holds `None` (an unchanged branch, the diagonal of a fuse matrix) we hold a
parameter-free `nn.Identity`, which keeps the indices of the neighbours intact.
"""

from __future__ import annotations

from dataclasses import dataclass

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import Normal, TruncatedNormal, Zero

from core.onednn import cap_onednn_isa

BN_MOMENTUM = 0.9  # MindSpore convention: running = momentum * running + (1 - momentum) * batch
BN_EPS = 1e-5
CONV_INIT_SIGMA = 0.027  # the seed's TruncatedNormal for every convolution
DENSE_INIT_SIGMA = 0.01
HEAD_CHANNELS = (32, 64, 128, 256)  # incre_modules planes; x4 by the Bottleneck expansion
FINAL_CHANNELS = 2048


@dataclass(frozen=True)
class StageSpec:
    num_modules: int
    block: str  # "BASIC" or "BOTTLENECK"
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]

    @property
    def num_branches(self) -> int:
        return len(self.num_channels)


@dataclass(frozen=True)
class HRNetSpec:
    stage1: StageSpec
    stage2: StageSpec
    stage3: StageSpec
    stage4: StageSpec
    stem_width: int = 64


def _wide(width: int) -> HRNetSpec:
    """The W18..W64 family: W48's layout with every branch width scaled."""
    w = width
    return HRNetSpec(
        stage1=StageSpec(1, "BOTTLENECK", (4,), (64,)),
        stage2=StageSpec(1, "BASIC", (4, 4), (w, 2 * w)),
        stage3=StageSpec(4, "BASIC", (4, 4, 4), (w, 2 * w, 4 * w)),
        stage4=StageSpec(3, "BASIC", (4, 4, 4, 4), (w, 2 * w, 4 * w, 8 * w)),
    )


ARCHS: dict[str, HRNetSpec] = {
    "w18_small_v1": HRNetSpec(
        stage1=StageSpec(1, "BOTTLENECK", (1,), (32,)),
        stage2=StageSpec(1, "BASIC", (2, 2), (16, 32)),
        stage3=StageSpec(1, "BASIC", (2, 2, 2), (16, 32, 64)),
        stage4=StageSpec(1, "BASIC", (2, 2, 2, 2), (16, 32, 64, 128)),
    ),
    "w18_small_v2": HRNetSpec(
        stage1=StageSpec(1, "BOTTLENECK", (2,), (64,)),
        stage2=StageSpec(1, "BASIC", (2, 2), (18, 36)),
        stage3=StageSpec(3, "BASIC", (2, 2, 2), (18, 36, 72)),
        stage4=StageSpec(2, "BASIC", (2, 2, 2, 2), (18, 36, 72, 144)),
    ),
    **{f"w{w}": _wide(w) for w in (18, 30, 32, 40, 44, 48, 64)},
}


# timm's names that differ from ours by more than the `hrnet_` prefix.
TIMM_ALIASES = {"w18_small": "w18_small_v1"}


def canonical_arch(name: str) -> str:
    """The `ARCHS` key for `w48`, `W48`, `hrnet_w48`, `w18-small-v1` or timm's `hrnet_w18_small`."""
    key = name.lower().replace("-", "_").removeprefix("hrnet_")
    key = TIMM_ALIASES.get(key, key)
    if key not in ARCHS:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHS)}")
    return key


def arch_spec(name: str) -> HRNetSpec:
    return ARCHS[canonical_arch(name)]


def conv(cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(
        cin,
        cout,
        kernel,
        stride=stride,
        pad_mode="pad",
        padding=kernel // 2,
        has_bias=bias,
        weight_init=TruncatedNormal(sigma=CONV_INIT_SIGMA),
        bias_init=Zero() if bias else None,
    )


def bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=BN_MOMENTUM, eps=BN_EPS)


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.SequentialCell:
    cells: list[nn.Cell] = [conv(cin, cout, kernel, stride), bn(cout)]
    if relu:
        cells.append(nn.ReLU())
    return nn.SequentialCell(cells)


class BasicBlock(nn.Cell):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Cell | None = None):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 3, stride)
        self.bn1 = bn(planes)
        self.conv2 = conv(planes, planes, 3)
        self.bn2 = bn(planes)
        self.relu = nn.ReLU()
        self.downsample = downsample if downsample is not None else nn.Identity()

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


class Bottleneck(nn.Cell):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Cell | None = None):
        super().__init__()
        self.conv1 = conv(inplanes, planes, 1)
        self.bn1 = bn(planes)
        self.conv2 = conv(planes, planes, 3, stride)
        self.bn2 = bn(planes)
        self.conv3 = conv(planes, planes * self.expansion, 1)
        self.bn3 = bn(planes * self.expansion)
        self.relu = nn.ReLU()
        self.downsample = downsample if downsample is not None else nn.Identity()

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.downsample(x))


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def make_layer(
    block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, blocks: int, stride: int = 1
) -> nn.SequentialCell:
    """A residual stack; the first block projects with a 1x1 conv + BN when the shape changes."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = conv_bn(inplanes, planes * block.expansion, 1, stride, relu=False)
    layers: list[nn.Cell] = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.SequentialCell(layers)


class Upsample(nn.Cell):
    """Nearest-neighbour upsampling by an integer factor.

    Written as reshape + broadcast rather than a Resize op: the graph then holds no size that
    depends on the batch, so MINDIR and ONNX exports keep a truly dynamic batch dimension.
    """

    def __init__(self, scale: int):
        super().__init__()
        self.scale = scale

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        _, c, h, w = x.shape
        s = self.scale
        x = ops.reshape(x, (-1, c, h, 1, w, 1))
        x = ops.tile(x, (1, 1, 1, s, 1, s))
        return ops.reshape(x, (-1, c, h * s, w * s))


class HighResolutionModule(nn.Cell):
    """Parallel branches followed by all-to-all fusion (SUM)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: tuple[int, ...],
        in_channels: list[int],
        num_channels: tuple[int, ...],
        multi_scale_output: bool = True,
    ):
        super().__init__()
        self.num_branches = len(num_channels)
        self.in_channels = list(in_channels)
        self.branches = nn.CellList(
            [
                make_layer(block, self.in_channels[i], num_channels[i], num_blocks[i])
                for i in range(self.num_branches)
            ]
        )
        self.in_channels = [c * block.expansion for c in num_channels]
        self.relu = nn.ReLU()
        outputs = self.num_branches if multi_scale_output else 1
        self.fuse_layers = (
            nn.CellList([self._fuse_row(i) for i in range(outputs)]) if self.num_branches > 1 else None
        )

    def _fuse_row(self, i: int) -> nn.CellList:
        ch = self.in_channels
        row: list[nn.Cell] = []
        for j in range(self.num_branches):
            if j > i:
                row.append(nn.SequentialCell([conv(ch[j], ch[i], 1), bn(ch[i]), Upsample(2 ** (j - i))]))
            elif j == i:
                row.append(nn.Identity())
            else:
                steps = [conv_bn(ch[j], ch[j], 3, 2) for _ in range(i - j - 1)]
                steps.append(conv_bn(ch[j], ch[i], 3, 2, relu=False))
                row.append(nn.SequentialCell(steps))
        return nn.CellList(row)

    def construct(self, xs: list[ms.Tensor]) -> list[ms.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]  # noqa: B905 (graph mode has no strict=)
        if self.fuse_layers is None:
            return xs
        fused = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[0] if i == 0 else row[0](xs[0])
            for j in range(1, self.num_branches):
                y = y + (xs[j] if i == j else row[j](xs[j]))
            fused.append(self.relu(y))
        return fused


def make_transition(pre: list[int], cur: tuple[int, ...]) -> nn.CellList:
    """Adapt the previous stage's branches to the next: change widths, and add one strided branch."""
    layers: list[nn.Cell] = []
    for i, cout in enumerate(cur):
        if i < len(pre):
            layers.append(conv_bn(pre[i], cout, 3) if cout != pre[i] else nn.Identity())
        else:
            steps = [
                conv_bn(pre[-1], cout if k == i - len(pre) else pre[-1], 3, 2)
                for k in range(i + 1 - len(pre))
            ]
            layers.append(nn.SequentialCell(steps))
    return nn.CellList(layers)


def make_stage(spec: StageSpec, in_channels: list[int]) -> tuple[nn.SequentialCell, list[int]]:
    block = BLOCKS[spec.block]
    modules = []
    channels = in_channels
    for _ in range(spec.num_modules):
        module = HighResolutionModule(block, spec.num_blocks, channels, spec.num_channels)
        channels = module.in_channels
        modules.append(module)
    return nn.SequentialCell(modules), channels


class HRNet(nn.Cell):
    """HRNet-C: four multi-resolution stages and the incre/downsamp/final classification head."""

    def __init__(self, spec: HRNetSpec, num_classes: int = 1000):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        # Every training, evaluation, export and conversion path builds its network here, before
        # MindSpore runs its first convolution: the one moment the oneDNN cap can still apply.
        cap_onednn_isa()
        self.num_classes = num_classes
        stem = spec.stem_width
        self.conv1 = conv(3, stem, 3, 2)
        self.bn1 = bn(stem)
        self.conv2 = conv(stem, stem, 3, 2)
        self.bn2 = bn(stem)
        self.relu = nn.ReLU()

        s1 = spec.stage1
        block1 = BLOCKS[s1.block]
        self.layer1 = make_layer(block1, stem, s1.num_channels[0], s1.num_blocks[0])
        channels = [s1.num_channels[0] * block1.expansion]

        self.transition1 = make_transition(channels, spec.stage2.num_channels)
        self.stage2, channels = make_stage(spec.stage2, list(spec.stage2.num_channels))
        self.transition2 = make_transition(channels, spec.stage3.num_channels)
        self.stage3, channels = make_stage(spec.stage3, list(spec.stage3.num_channels))
        self.transition3 = make_transition(channels, spec.stage4.num_channels)
        self.stage4, channels = make_stage(spec.stage4, list(spec.stage4.num_channels))

        self.incre_modules = nn.CellList(
            [make_layer(Bottleneck, c, HEAD_CHANNELS[i], 1) for i, c in enumerate(channels)]
        )
        head = [c * Bottleneck.expansion for c in HEAD_CHANNELS]
        self.downsamp_modules = nn.CellList(
            [
                nn.SequentialCell([conv(head[i], head[i + 1], 3, 2, bias=True), bn(head[i + 1]), nn.ReLU()])
                for i in range(len(channels) - 1)
            ]
        )
        self.final_layer = nn.SequentialCell(
            [conv(head[-1], FINAL_CHANNELS, 1, bias=True), bn(FINAL_CHANNELS), nn.ReLU()]
        )
        self.classifier = nn.Dense(
            FINAL_CHANNELS, num_classes, weight_init=Normal(sigma=DENSE_INIT_SIGMA), bias_init=Zero()
        )

    def forward_features(self, x: ms.Tensor) -> ms.Tensor:
        """The stem, the four stages and the head convolutions: [N, 2048, H/32, W/32]."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = self.stage2([t(x) for t in self.transition1])
        ys = self.stage3(self._transit(self.transition2, ys))
        ys = self.stage4(self._transit(self.transition3, ys))
        y = self.incre_modules[0](ys[0])
        for i, down in enumerate(self.downsamp_modules):
            y = self.incre_modules[i + 1](ys[i + 1]) + down(y)
        return self.final_layer(y)

    @staticmethod
    def _transit(transition: nn.CellList, ys: list[ms.Tensor]) -> list[ms.Tensor]:
        # Existing branches pass through their (usually identity) adapter; the new one grows from the lowest.
        return [t(ys[i]) if i < len(ys) else t(ys[-1]) for i, t in enumerate(transition)]

    def forward_head(self, features: ms.Tensor) -> ms.Tensor:
        return self.classifier(ops.mean(features, axis=(2, 3)))

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.forward_head(self.forward_features(x))


def create_model(arch: str, num_classes: int = 1000) -> HRNet:
    """Build a freshly initialised network for one of `ARCHS`."""
    return HRNet(arch_spec(arch), num_classes=num_classes)
