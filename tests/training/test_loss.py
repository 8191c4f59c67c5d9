"""The label-smoothed cross entropy against a hand computation."""

import math

import mindspore as ms
import numpy as np
import pytest

from training.loss import LabelSmoothingCrossEntropy


def test_label_smoothing_matches_hand_computation():
    logits = np.array([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, 0.0]], np.float32)
    labels = np.array([0, 2], np.int32)
    # Row 0: log-sum-exp of (2, 1, 0, -1); smoothing 0.1 puts 0.9 on the label and 0.1/3 on each other class.
    lse0 = math.log(math.exp(2) + math.exp(1) + math.exp(0) + math.exp(-1))
    row0 = -(0.9 * (2 - lse0) + (0.1 / 3) * ((1 - lse0) + (0 - lse0) + (-1 - lse0)))
    lse1 = math.log(2 * math.exp(0.5) + math.exp(3) + math.exp(0))
    row1 = -(0.9 * (3 - lse1) + (0.1 / 3) * ((0.5 - lse1) * 2 + (0 - lse1)))
    loss = LabelSmoothingCrossEntropy(4, 0.1)(ms.Tensor(logits), ms.Tensor(labels))
    assert float(loss.asnumpy()) == pytest.approx((row0 + row1) / 2, rel=1e-5)


def test_no_smoothing_is_negative_log_likelihood():
    logits = np.array([[1.0, 3.0, 0.0]], np.float32)
    expected = -(3.0 - math.log(math.exp(1) + math.exp(3) + 1))
    loss = LabelSmoothingCrossEntropy(3, 0.0)(ms.Tensor(logits), ms.Tensor(np.array([1], np.int32)))
    assert float(loss.asnumpy()) == pytest.approx(expected, rel=1e-6)


def test_fp16_logits_are_scored_in_fp32():
    logits = ms.Tensor(np.array([[10.0, -10.0]], np.float16))
    loss = LabelSmoothingCrossEntropy(2, 0.1)(logits, ms.Tensor(np.array([0], np.int32)))
    assert loss.dtype == ms.float32 and float(loss.asnumpy()) == pytest.approx(0.1 * 20, rel=1e-3)


def test_rejects_bad_smoothing():
    with pytest.raises(ValueError):
        LabelSmoothingCrossEntropy(10, 1.0)
