"""`hrnet convert`: official HRNet-Image-Classification / timm weights to MindSpore, and back.

Our cells carry the official module paths (see training/model.py), so the two state dicts differ
only in BatchNorm parameter names and in PyTorch's `num_batches_tracked` counters. The name table
is derived from the MindSpore network itself, which makes the mapping strict for free: every
tensor the network needs must be present with its shape, nothing else may be, and the error
names every offending key at once.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
from mindspore import Parameter, Tensor, nn
from safetensors import safe_open
from safetensors.numpy import save_file

from core.atomic import atomic_path
from core.errors import CommandError
from core.metadata import METADATA_KEY, ModelMetadata
from training.checkpoint import load_into, read_checkpoint, save_checkpoint
from training.model import canonical_arch, create_model

log = logging.getLogger(__name__)

# MindSpore BatchNorm parameter -> PyTorch BatchNorm entry
BN_NAMES = {
    "gamma": "weight",
    "beta": "bias",
    "moving_mean": "running_mean",
    "moving_variance": "running_var",
}
BATCHES_TRACKED = "num_batches_tracked"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
OFFICIAL_INPUT_SIZE = 224  # the published weights were validated at Resize(256) + CenterCrop(224)
SHOWN_PER_KIND = 3  # problems quoted of each kind; a wrong architecture has ~1,500


class ConversionError(ValueError):
    """The weights do not fit the architecture, or the file cannot be read; names every offending key."""


def official_name(name: str) -> str:
    """The PyTorch state-dict key of one of our parameter names."""
    module, _, leaf = name.rpartition(".")
    return f"{module}.{BN_NAMES[leaf]}" if leaf in BN_NAMES else name


def name_table(net: nn.Cell) -> dict[str, Parameter]:
    """Official key -> our parameter, for every parameter of `net`."""
    return {official_name(p.name): p for p in net.get_parameters()}


def read_state_dict(path: Path) -> tuple[dict[str, np.ndarray], ModelMetadata | None]:
    """Tensors of a .safetensors or PyTorch file, and our model card when the file carries one."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path), None
    raise ConversionError(f"{path}: expected a .safetensors or {'/'.join(TORCH_SUFFIXES)} file")


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], ModelMetadata | None]:
    try:
        with safe_open(str(path), framework="numpy") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safetensors handle, not a dict)
            header = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ConversionError(f"{path} is not a readable safetensors file: {exc}") from exc
    card = header.get(METADATA_KEY)
    return tensors, ModelMetadata.from_json(card) if card else None


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ModuleNotFoundError:
        raise ConversionError(
            f"reading {path.name} needs PyTorch (pip install torch); the .safetensors file needs no torch"
        ) from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only refusals all surface differently
        raise ConversionError(f"{path} is not a loadable PyTorch state dict: {exc}") from exc
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):  # saved from DataParallel
        state = {key.removeprefix("module."): value for key, value in state.items()}
    return {key: value.detach().cpu().numpy() for key, value in state.items()}


def map_official(tensors: dict[str, np.ndarray], net: nn.Cell) -> dict[str, Parameter]:
    """Our parameters from an official state dict; strict: any missing, extra or mis-shaped key is
    an error that counts each kind and quotes the first few of each."""
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[2] != BATCHES_TRACKED}
    table = name_table(net)
    kinds = {
        "missing": [key for key in table if key not in state],
        "unexpected": [key for key in state if key not in table],
        "of another shape": [
            f"{key}: file {tuple(state[key].shape)} != network {tuple(param.shape)}"
            for key, param in table.items()
            if key in state and tuple(state[key].shape) != tuple(param.shape)
        ],
    }
    total = sum(map(len, kinds.values()))
    if total:
        parts = [f"{len(keys)} {kind} ({_first(keys)})" for kind, keys in kinds.items() if keys]
        raise ConversionError(f"{total} problem(s) mapping the weights: " + "; ".join(parts))
    return {
        param.name: Parameter(Tensor(np.asarray(state[key], dtype=np.float32)), name=param.name)
        for key, param in table.items()
    }


def _first(keys: list[str]) -> str:
    more = len(keys) - SHOWN_PER_KIND
    return ", ".join(keys[:SHOWN_PER_KIND]) + (f", and {more} more" if more > 0 else "")


def infer_num_classes(tensors: dict[str, np.ndarray]) -> int:
    weight = tensors.get("classifier.weight")
    if weight is None or weight.ndim != 2:
        raise ConversionError(
            "missing classifier.weight (a [classes, 2048] matrix): is this an HRNet classifier?"
        )
    return int(weight.shape[0])


def convert_official(
    src: Path,
    arch: str | None = None,
    out: Path | None = None,
    num_classes: int | None = None,
    labels: tuple[str, ...] = (),
    force: bool = False,
) -> Path:
    """Official or timm weights -> a MindSpore checkpoint carrying its model card.

    `arch` may be left out for a file with our model card (one `to_official` wrote); `out`
    defaults to the input's name with `.ckpt`, beside it.
    """
    src = Path(src)
    out = Path(out) if out else src.with_suffix(".ckpt")
    if out.exists() and not force:
        raise ConversionError(f"{out} exists (pass --force to overwrite)")
    tensors, card = read_state_dict(src)
    if arch is None:
        if card is None:
            raise ConversionError(f"{src} carries no model card: give its architecture with --arch")
        arch = card.arch
    arch = canonical_arch(arch)
    classes = num_classes or (card.num_classes if card else infer_num_classes(tensors))
    card_says = canonical_arch(card.arch) if card else arch
    if card is None or card_says != arch or card.num_classes != classes:
        card = ModelMetadata(
            arch=arch, num_classes=classes, input_size=OFFICIAL_INPUT_SIZE, extra={"source": src.name}
        )
    if labels:
        card = replace(card, labels=labels)
    net = create_model(arch, classes)
    try:
        params = map_official(tensors, net)
    except ConversionError as exc:
        hint = f"; the file's model card says {card_says}: leave out --arch" if card_says != arch else ""
        raise ConversionError(f"{exc} (as {arch}{hint})") from None
    load_into(net, params)
    save_checkpoint(net, out, card)
    log.info("wrote %s (%s, %d classes, %d tensors)", out, arch, classes, len(name_table(net)))
    return out


def to_official(ckpt: Path, out: Path, force: bool = False) -> Path:
    """A MindSpore checkpoint -> safetensors with the official key names, loadable strictly by PyTorch."""
    out = Path(out)
    if out.exists() and not force:
        raise ConversionError(f"{out} exists (pass --force to overwrite)")
    loaded = read_checkpoint(ckpt)
    if loaded.metadata is None:
        raise ConversionError(f"{ckpt} carries no metadata; cannot tell its architecture")
    net = create_model(loaded.metadata.arch, loaded.metadata.num_classes)
    load_into(net, loaded.params)
    tensors: dict[str, np.ndarray] = {}
    for key, param in name_table(net).items():
        tensors[key] = param.asnumpy().astype(np.float32)
        module, _, leaf = key.rpartition(".")
        if leaf == "running_var":  # PyTorch's BatchNorm also owns a counter; strict loading wants it
            tensors[f"{module}.{BATCHES_TRACKED}"] = np.array(loaded.step, dtype=np.int64)
    with atomic_path(out, overwrite=force) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: loaded.metadata.to_json()})
    log.info("wrote %s (%d tensors, official key names)", out, len(tensors))
    return out


def read_labels(path: Path) -> tuple[str, ...]:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConversionError(f"cannot read labels file {path}: {exc}") from exc
    return tuple(line.strip() for line in lines if line.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--from",
        dest="src",
        type=Path,
        required=True,
        help="official/timm .pth or .safetensors; or our .ckpt with --to-official",
    )
    parser.add_argument(
        "--arch",
        help="architecture of the official weights (w18_small_v1 ... w64); "
        "default: the model card in a file we wrote",
    )
    parser.add_argument(
        "--out", type=Path, help="MindSpore checkpoint to write (default: beside --from, with .ckpt)"
    )
    parser.add_argument(
        "--to-official",
        type=Path,
        metavar="FILE.safetensors",
        help="write our checkpoint as safetensors with the official key names instead",
    )
    parser.add_argument(
        "--num-classes", type=int, help="expected classes (default: read from classifier.weight)"
    )
    parser.add_argument("--labels", type=Path, help="text file with one class label per line")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")


def run(args: argparse.Namespace) -> int:
    try:
        if args.to_official:
            if args.out or args.arch or args.num_classes or args.labels:
                raise CommandError("--to-official takes only --from CKPT (the checkpoint knows the rest)")
            path = to_official(args.src, args.to_official, force=args.force)
        else:
            labels = read_labels(args.labels) if args.labels else ()
            path = convert_official(
                args.src, args.arch, args.out, num_classes=args.num_classes, labels=labels, force=args.force
            )
    except (ValueError, FileNotFoundError) as exc:  # ConversionError, MetadataError, unknown architecture
        raise CommandError(str(exc)) from exc
    print(path)
    return 0
