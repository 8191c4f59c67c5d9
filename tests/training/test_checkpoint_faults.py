"""A training process killed while it writes a checkpoint leaves the previous one loadable."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from training.checkpoint import read_checkpoint

# The same save_checkpoint `hrnet train` uses, over and over into one file, ~160 MB each time so
# that a write is long enough to be caught in the middle.
WRITER = """
import sys
import mindspore as ms
import numpy as np
from core.metadata import ModelMetadata
from training.checkpoint import save_checkpoint
meta = ModelMetadata(arch="w18_small_v1", num_classes=10, input_size=32)
for epoch in range(1, 1000):
    params = [{"name": "w", "data": ms.Tensor(np.full((40_000_000,), epoch, np.float32))}]
    save_checkpoint(params, sys.argv[1], meta, epoch=epoch)
    print(epoch, flush=True)
"""


def test_killed_mid_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "run" / "hrnet_w18_small_v1-e0001.ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "1"  # one complete write
        deadline = time.monotonic() + 60
        while not any(p.name.endswith(".tmp") or ".tmp." in p.name for p in target.parent.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "no write in progress seen"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)  # in the middle of writing the next epoch
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    checkpoint = read_checkpoint(target)
    epoch = checkpoint.epoch
    assert epoch >= 1
    weights = checkpoint.params["w"].asnumpy()
    assert weights.shape == (40_000_000,) and np.all(weights == epoch)  # complete, not half of two
    leftovers = [p.name for p in target.parent.iterdir() if p != target]
    assert all(name.startswith(".") for name in leftovers), leftovers  # never a *.ckpt resume could pick
