"""LR schedules: the seed's linear warmup/decay, cosine, step; values at the edges and any begin_epoch."""

import numpy as np
import pytest

from training.lr import learning_rates

SEED = dict(scheme="linear", lr=0.01, lr_init=1e-4, lr_end=1e-5, warmup_epochs=2, total_epochs=120)


def test_seed_linear_warmup_start_peak_and_end():
    spe = 50
    lrs = learning_rates(**SEED, steps_per_epoch=spe)
    assert lrs.shape == (120 * spe,) and lrs.dtype == np.float32
    assert lrs[0] == pytest.approx(1e-4)  # warmup starts at lr_init
    assert lrs[spe] == pytest.approx(1e-4 + (0.01 - 1e-4) / 2)  # halfway through the 2-epoch warmup
    assert lrs[2 * spe] == pytest.approx(0.01)  # peak right after warmup
    assert lrs.max() == pytest.approx(0.01)
    assert lrs[-1] == pytest.approx(1e-5)  # decays to lr_end at the last step
    assert np.all(np.diff(lrs[: 2 * spe + 1]) > 0) and np.all(np.diff(lrs[2 * spe :]) < 0)


def test_seed_linear_formula_in_decay():
    spe = 10
    lrs = learning_rates(**SEED, steps_per_epoch=spe)
    warmup, total = 2 * spe, 120 * spe
    for step in (warmup, warmup + 1, 600, total - 2, total - 1):
        expected = 0.01 + (1e-5 - 0.01) * (step - warmup) / (total - warmup - 1)
        assert lrs[step] == pytest.approx(expected, rel=1e-5)


def test_cosine_edges_and_midpoint():
    lrs = learning_rates("cosine", 0.1, 0.0, 0.0, 1, 11, steps_per_epoch=100)
    assert lrs[0] == 0.0 and lrs[100] == pytest.approx(0.1)
    assert lrs[100 + 499] == pytest.approx(0.05, rel=2e-3)
    assert lrs[-1] == pytest.approx(0.0, abs=1e-8)


def test_step_scheme_is_the_pytorch_recipe():
    lrs = learning_rates(
        "step", 0.05, 0.05, 0.0, 0, 100, steps_per_epoch=3, milestones=(30, 60, 90), gamma=0.1
    )
    for epoch, expected in (
        (0, 0.05),
        (29, 0.05),
        (30, 0.005),
        (59, 0.005),
        (60, 5e-4),
        (90, 5e-5),
        (99, 5e-5),
    ):
        assert lrs[epoch * 3] == pytest.approx(expected) and lrs[epoch * 3 + 2] == pytest.approx(expected)


@pytest.mark.parametrize("scheme", ["linear", "cosine", "step"])
@pytest.mark.parametrize("begin_epoch", [0, 1, 2, 7, 29])
def test_any_begin_epoch_continues_the_same_schedule(scheme, begin_epoch):
    args = dict(
        scheme=scheme,
        lr=0.01,
        lr_init=1e-4,
        lr_end=1e-5,
        warmup_epochs=2,
        total_epochs=30,
        steps_per_epoch=7,
        milestones=(5, 20),
    )
    full = learning_rates(**args)
    tail = learning_rates(**args, begin_epoch=begin_epoch)
    np.testing.assert_array_equal(tail, full[begin_epoch * 7 :])


def test_rejects_unknown_scheme_and_bad_ranges():
    with pytest.raises(ValueError, match="lr_scheme"):
        learning_rates("exponential", 0.1, 0.0, 0.0, 0, 10, 10)
    with pytest.raises(ValueError, match="begin_epoch"):
        learning_rates("linear", 0.1, 0.0, 0.0, 0, 10, 10, begin_epoch=11)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        learning_rates("linear", 0.1, 0.0, 0.0, 0, 10, 0)
