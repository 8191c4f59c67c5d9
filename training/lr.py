"""Per-step learning-rate schedules.

Every scheme is a pure function of the global step, so a run resumed at any epoch gets exactly
the values the uninterrupted run would have used (the seed read its values from a module global
and ignored `lr_scheme`; here the scheme and every value come from the config).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

SCHEMES = ("linear", "cosine", "step")


def learning_rates(
    scheme: str,
    lr: float,
    lr_init: float,
    lr_end: float,
    warmup_epochs: float,
    total_epochs: int,
    steps_per_epoch: int,
    begin_epoch: int = 0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> np.ndarray:
    """The LR of every step from `begin_epoch` to the end of training, as float32.

    Warmup (all schemes) rises linearly from `lr_init` at step 0 to `lr` at the end of warmup.
    Then: `linear` falls linearly to `lr_end` at the last step (the seed's recipe); `cosine` follows
    half a cosine from `lr` to `lr_end`; `step` multiplies `lr` by `gamma` at each milestone epoch.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown lr_scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if steps_per_epoch < 1 or total_epochs < 1:
        raise ValueError(
            f"need steps_per_epoch >= 1 and total_epochs >= 1, got {steps_per_epoch}, {total_epochs}"
        )
    if not 0 <= begin_epoch <= total_epochs:
        raise ValueError(f"begin_epoch {begin_epoch} is outside 0..{total_epochs}")
    total = total_epochs * steps_per_epoch
    warmup = round(warmup_epochs * steps_per_epoch)
    values = np.empty(total, dtype=np.float64)
    for step in range(total):
        values[step] = _lr_at(
            scheme, step, total, warmup, steps_per_epoch, lr, lr_init, lr_end, milestones, gamma
        )
    return values[begin_epoch * steps_per_epoch :].astype(np.float32)


def _lr_at(
    scheme: str,
    step: int,
    total: int,
    warmup: int,
    steps_per_epoch: int,
    lr: float,
    lr_init: float,
    lr_end: float,
    milestones: Sequence[int],
    gamma: float,
) -> float:
    if step < warmup:
        return lr_init + (lr - lr_init) * step / warmup
    decay_steps = total - warmup
    progress = (step - warmup) / max(decay_steps - 1, 1)
    if scheme == "linear":
        return lr + (lr_end - lr) * progress
    if scheme == "cosine":
        return lr_end + (lr - lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step // steps_per_epoch
    return lr * gamma ** sum(1 for m in milestones if epoch >= m)
