"""Checkpoint files: MindSpore .ckpt with the model card and progress counters inside.

Keeping the metadata inside the checkpoint (MindSpore's `append_dict` stores strings) means a
single file is enough to evaluate or export: no separate labels file can go missing or disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mindspore as ms
from mindspore import nn

from core.atomic import atomic_path
from core.metadata import METADATA_KEY, MetadataError, ModelMetadata

EPOCH_KEY = "epoch_num"
STEP_KEY = "step_num"


@dataclass
class Checkpoint:
    params: dict[str, ms.Parameter]
    metadata: ModelMetadata | None
    epoch: int  # epochs completed when it was written
    step: int  # optimizer steps completed when it was written


def save_checkpoint(
    obj: nn.Cell | list, path: str | Path, metadata: ModelMetadata, epoch: int = 0, step: int = 0
) -> Path:
    """Write atomically; `obj` is a Cell (its parameters, optimizer state too for a train cell) or a list."""
    path = Path(path)
    with atomic_path(path) as tmp:
        # MindSpore appends ".ckpt" to names without it; the temporary name must keep that suffix.
        tmp_ckpt = tmp.with_name(tmp.name + ".ckpt")
        try:
            ms.save_checkpoint(
                obj,
                str(tmp_ckpt),
                append_dict={METADATA_KEY: metadata.to_json(), EPOCH_KEY: epoch, STEP_KEY: step},
            )
            tmp_ckpt.replace(tmp)
        finally:
            tmp_ckpt.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        raw = ms.load_checkpoint(str(path))
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable MindSpore checkpoint: {exc}") from exc
    meta_json = raw.pop(METADATA_KEY, None)
    metadata = ModelMetadata.from_json(meta_json) if isinstance(meta_json, str) else None
    epoch = raw.pop(EPOCH_KEY, None)
    step = raw.pop(STEP_KEY, None)
    return Checkpoint(
        params=raw,
        metadata=metadata,
        epoch=int(epoch.asnumpy()) if epoch is not None else 0,
        step=int(step.asnumpy()) if step is not None else 0,
    )


def load_into(net: nn.Cell, params: dict[str, ms.Parameter]) -> None:
    """Load network weights strictly: every network parameter must be present with its shape.

    Extra entries (optimizer moments, the learning-rate step) are ignored; they belong to training.
    """
    own = {p.name: p for p in net.get_parameters()}
    missing = sorted(name for name in own if name not in params)
    wrong = sorted(
        f"{name}: checkpoint {tuple(params[name].shape)} != network {tuple(p.shape)}"
        for name, p in own.items()
        if name in params and tuple(params[name].shape) != tuple(p.shape)
    )
    if missing or wrong:
        problems = [f"missing {name}" for name in missing] + [f"shape {w}" for w in wrong]
        raise MetadataError("checkpoint does not fit the network: " + "; ".join(problems))
    ms.load_param_into_net(net, {name: params[name] for name in own}, strict_load=True)
