"""The seed's label-smoothed softmax cross entropy (on-value 1 - s, off-value s / (classes - 1))."""

from __future__ import annotations

import mindspore as ms
from mindspore import nn, ops


class LabelSmoothingCrossEntropy(nn.Cell):
    """Mean cross entropy against smoothed one-hot targets; smoothing 0 is plain cross entropy.

    The logits are cast to float32 first so the loss stays accurate when the network runs in fp16 (AMP O2/O3).
    """

    def __init__(self, num_classes: int, smoothing: float = 0.0):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        if num_classes < 2 and smoothing > 0:
            raise ValueError("label smoothing needs at least 2 classes")
        self.num_classes = num_classes
        self.on_value = ms.Tensor(1.0 - smoothing, ms.float32)
        self.off_value = ms.Tensor(smoothing / max(num_classes - 1, 1), ms.float32)
        self.cross_entropy = nn.SoftmaxCrossEntropyWithLogits(sparse=False, reduction="mean")

    def construct(self, logits: ms.Tensor, labels: ms.Tensor) -> ms.Tensor:
        target = ops.one_hot(labels, self.num_classes, self.on_value, self.off_value)
        return self.cross_entropy(ops.cast(logits, ms.float32), target)
