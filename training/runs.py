"""A training run's output folder: file names, the checkpoints in it, and its two logs.

Kept free of MindSpore so that code which only reads a run folder (the demo finding the final
checkpoint, a test reading the logs) does not load it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

CKPT_DIR = "checkpoints"
CKPT_PATTERN = re.compile(r"^hrnet_(?P<arch>\w+)-e(?P<epoch>\d+)\.ckpt$")
BEST_CKPT = "best.ckpt"
BEST_JSON = "best.json"
CONFIG_YAML = "config.yaml"
TEXT_LOG = "log.txt"
JSON_LOG = "log.jsonl"
EXPORTS_DIR = "exports"  # where `hrnet export` puts a run's exports by default
TRAINED = (TEXT_LOG, JSON_LOG, BEST_CKPT, BEST_JSON)  # any of them: a run trained here


def checkpoint_path(out_dir: Path, arch: str, epoch: int) -> Path:
    """Where the checkpoint written after `epoch` epochs goes; `list_checkpoints` finds it."""
    return out_dir / CKPT_DIR / f"hrnet_{arch}-e{epoch:04d}.ckpt"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(epoch, path) of the run's epoch checkpoints, oldest first; temporary files never match."""
    folder = out_dir / CKPT_DIR
    found = []
    for path in folder.glob("*.ckpt") if folder.is_dir() else []:
        match = CKPT_PATTERN.match(path.name)
        if match:
            found.append((int(match["epoch"]), path))
    return sorted(found)


def run_folder(ckpt: Path) -> Path | None:
    """The training run a checkpoint belongs to (its best.ckpt, or one of its checkpoints/), if any."""
    folder = ckpt.parent.parent if ckpt.parent.name == CKPT_DIR else ckpt.parent
    return folder if (folder / CONFIG_YAML).is_file() else None


def previous_run(out_dir: Path) -> list[Path]:
    """What an earlier run left in `out_dir` and what our commands derived from it in their default
    places (eval results, exports/); empty when nothing was trained there."""
    if not any((out_dir / name).exists() for name in TRAINED) and not list_checkpoints(out_dir):
        return []
    names = (*TRAINED, CONFIG_YAML, CKPT_DIR, EXPORTS_DIR)
    found = [out_dir / name for name in names if (out_dir / name).exists()]
    return found + sorted(out_dir.glob(f"{BEST_CKPT}.*"))  # best.ckpt.eval.json


def clear_run(out_dir: Path) -> list[Path]:
    """Remove `previous_run(out_dir)`, nothing else; what was removed."""
    removed = previous_run(out_dir)
    for path in removed:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return removed


def read_best_top1(out_dir: Path) -> float:
    """The val top-1 of the run's best checkpoint so far; -1 before any, so the first eval wins."""
    path = out_dir / BEST_JSON
    return json.loads(path.read_text())["Top_1_Acc"] if path.is_file() else -1.0


def epoch_line(epoch: int, epochs: int, epoch_ms: float, steps: int, avg_loss: float, lr: float) -> str:
    """The seed's line: `epoch: [ 1/120], epoch time: 2404040.882, steps: 10009, per step time: 240.188,
    avg loss: 4.093, lr:[0.005000]` (times in milliseconds)."""
    width = len(str(epochs))
    return (
        f"epoch: [{epoch:>{width}}/{epochs}], epoch time: {epoch_ms:.3f}, steps: {steps}, "
        f"per step time: {epoch_ms / steps:.3f}, avg loss: {avg_loss:.3f}, lr:[{lr:.6f}]"
    )


class RunLog:
    """The seed's text lines in log.txt and the same figures as JSON lines in log.jsonl (rank 0 only)."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.text = out_dir / TEXT_LOG
        self.jsonl = out_dir / JSON_LOG

    def line(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)
            with open(self.text, "a", encoding="utf-8") as handle:
                handle.write(text + "\n")

    def event(self, kind: str, **fields: Any) -> None:
        if self.enabled:
            with open(self.jsonl, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"event": kind, "time": round(time.time(), 3), **fields}) + "\n")
